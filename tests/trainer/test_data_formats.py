"""TRL's preference row formats and the shard readers (JSONL, JSONL.gz, Parquet)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubedpo_trainer.data.formats import BadRecord, parse_row
from kubedpo_trainer.data.index import IndexStore
from kubedpo_trainer.data.rows import RowFetcher
from kubedpo_trainer.data.shards import list_shards
from kubedpo_trainer.errors import InputError

USER = {"role": "user", "content": "Words: cat dog."}


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_standard_row_with_margin_and_weight() -> None:
    row = parse_row({"prompt": "Q?", "chosen": " yes", "rejected": " no", "margin": 2, "weight": 0.5})
    assert (row.prompt, row.chosen, row.rejected, row.margin, row.weight) == ("Q?", " yes", " no", 2.0, 0.5)
    assert not row.conversational
    plain = parse_row({"prompt": "Q?", "chosen": " yes", "rejected": " no", "margin": None})
    assert (plain.margin, plain.weight) == (0.0, 1.0)  # absent or null: the neutral values


def test_conversational_row() -> None:
    raw = {"prompt": [USER], "chosen": [_msg("assistant", "animal")], "rejected": [_msg("assistant", "color")]}
    row = parse_row(raw, "conversational")
    assert row.conversational and row.prompt == [USER] and row.chosen == raw["chosen"]
    assert parse_row(raw) == row  # auto recognises it


def test_implicit_strings_split_at_longest_common_prefix_space_goes_to_response() -> None:
    row = parse_row({"chosen": "Words: cat. Answer: animal", "rejected": "Words: cat. Answer: color"})
    assert (row.prompt, row.chosen, row.rejected) == ("Words: cat. Answer:", " animal", " color")
    # The shared prefix may end inside a word: the split is by characters, like TRL's extract_prompt.
    row = parse_row({"chosen": "It is blue", "rejected": "It is black"}, "implicit")
    assert (row.prompt, row.chosen, row.rejected) == ("It is bl", "ue", "ack")


def test_implicit_message_lists_split_after_common_leading_messages() -> None:
    sys = _msg("system", "Be brief.")
    chosen = [sys, USER, _msg("assistant", "animal")]
    rejected = [sys, USER, _msg("assistant", "color"), _msg("user", "sure?")]
    row = parse_row({"chosen": chosen, "rejected": rejected})
    assert row.prompt == [sys, USER] and row.chosen == chosen[2:] and row.rejected == rejected[2:]


def test_chosen_equal_rejected_is_allowed() -> None:
    row = parse_row({"prompt": "Q?", "chosen": " same", "rejected": " same"})
    assert row.chosen == row.rejected == " same"


@pytest.mark.parametrize(
    ("raw", "fmt", "says"),
    [
        ({"prompt": "Q", "rejected": " no"}, "auto", "missing field 'chosen'"),
        ({"prompt": "Q", "chosen": 3, "rejected": " no"}, "auto", "field 'chosen' must be"),
        ({"prompt": "Q", "chosen": [{"role": "user"}], "rejected": " no"}, "auto", "chosen[0]"),
        ({"chosen": "Q yes", "rejected": "Q"}, "auto", "empty 'rejected' response after the shared prefix"),
        ({"prompt": "Q", "chosen": " yes", "rejected": " no", "weight": "high"}, "auto", "'weight' must be a finite"),
        ({"prompt": "Q", "chosen": " yes", "rejected": " no", "margin": float("nan")}, "auto", "'margin'"),
        ({"prompt": "Q", "chosen": " yes", "rejected": " no", "weight": -1}, "auto", "'weight' must be >= 0"),
        ({"prompt": [USER], "chosen": " yes", "rejected": " no"}, "auto", "all be strings or all message"),
        ({"chosen": " yes", "rejected": " no"}, "standard", "missing field 'prompt'"),
        ({"prompt": "Q", "chosen": " yes", "rejected": " no"}, "conversational", "needs message lists"),
        ({"prompt": "Q", "chosen": " yes", "rejected": " no"}, "implicit", "derives the prompt"),
        ({"chosen": "same", "rejected": "same"}, "auto", "after the shared prefix"),
        (["not", "an", "object"], "auto", "expected a JSON object"),
    ],
)
def test_bad_rows_say_what_is_wrong(raw, fmt, says) -> None:
    with pytest.raises(BadRecord, match=re.escape(says)):
        parse_row(raw, fmt)


# --- readers --------------------------------------------------------------------------------


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}", "margin": float(i)} for i in range(n)]


def _write_all(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    paths = {"jsonl": tmp_path / "a.jsonl", "gz": tmp_path / "a.jsonl.gz", "parquet": tmp_path / "a.parquet"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(paths["gz"], "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"], row_group_size=3)
    return paths


def _read_all(path: Path, tmp: Path, rows: list[int] | None = None) -> list[tuple[str, object]]:
    """Index the shard and fetch `rows` (default: all) the way the stream does: (row id, raw)."""
    shards = list_shards(str(path))
    store = IndexStore(str(tmp / "index"))
    entries = store.ensure(shards)
    fetcher = RowFetcher(entries, store, block_rows=4)
    return fetcher.fetch([(0, r) for r in (rows if rows is not None else range(entries[0].rows))])


def test_jsonl_gz_and_parquet_readers_agree(tmp_path: Path) -> None:
    rows = _rows(10)
    for kind, path in _write_all(tmp_path, rows).items():
        got = _read_all(path, tmp_path / kind)
        assert [raw for _, raw in got] == rows, kind
        assert [rid for rid, _ in got] == [f"{path}:{i + (kind != 'parquet')}" for i in range(10)], kind
        assert [raw for _, raw in _read_all(path, tmp_path / kind, [9, 7, 8])] == [rows[9], rows[7], rows[8]], kind


def test_jsonl_index_holds_exact_row_offsets(tmp_path: Path) -> None:
    rows = _rows(6)
    path = _write_all(tmp_path, rows)["jsonl"]
    [shard] = list_shards(str(path))
    store = IndexStore(str(tmp_path / "index"))
    [entry] = store.ensure([shard])
    offs = store.offsets(shard, 0, entry.rows)
    assert entry.rows == 6 and offs[-1] == path.stat().st_size  # offsets are exact bytes
    assert json.loads(path.read_bytes()[offs[3]:offs[4]]) == rows[3]


def test_parquet_reads_only_the_row_groups_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_all(tmp_path, _rows(10))["parquet"]  # groups of 3: [0-2] [3-5] [6-8] [9]
    read_groups: list[int] = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, *a, **k):
        read_groups.append(i)
        return real(self, i, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole-file read"))
    assert [rid for rid, _ in _read_all(path, tmp_path, [7, 8, 9])] == [f"{path}:{i}" for i in (7, 8, 9)]
    assert read_groups == [2, 3]


def test_jsonl_rows_are_physical_lines_and_bad_json_is_a_value(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text('{"a": 1}\n\n{oops\n{"a": 2}\n')
    got = _read_all(path, tmp_path)
    assert [rid for rid, _ in got] == [f"{path}:1", f"{path}:3", f"{path}:4"]  # blank line 2: no row, counted
    assert isinstance(got[1][1], BadRecord) and got[2][1] == {"a": 2}


def test_corrupt_gzip_is_an_input_error_naming_the_shard(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n' * 100)[:-30] + b"garbage")
    with pytest.raises(InputError, match=str(path)):
        _read_all(path, tmp_path)


def test_an_empty_response_after_an_explicit_prompt_is_a_pair() -> None:
    """A policy that answers nothing is a real (bad) answer: iterative DPO's judge pairs it as rejected.
    TRL accepts it too (the response is then only the EOS token); only an implicit prompt, where
    an empty rest means the two answers could not be split, stays refused."""
    row = parse_row({"prompt": "Q", "chosen": " yes", "rejected": ""}, "auto")
    assert (row.chosen, row.rejected) == (" yes", "")
