"""The stream: every row once per epoch across ranks, equal batch counts, exact resume from JSON
state (also with another number of ranks at the same global batch), reads of only the rows a
rank needs, bounded memory, bad-record policy, prefetch wait time, eval batches, shard names."""

from __future__ import annotations

import bz2
import gzip
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from kubedpo_trainer import storage
from kubedpo_trainer.config import DataConfig
from kubedpo_trainer.data.stream import PreferenceStream
from kubedpo_trainer.errors import InputError


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny.model_dir)


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"Words: cat dog {i}.", "chosen": " animal", "rejected": " color", "margin": i}
            for i in range(n)]


def _write(folder: Path, rows: list[dict], shards: int, kind: str = "jsonl") -> list[str]:
    """Shards part-<s>.<kind>; returns the row id of every row (line or Parquet row index)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for s in range(shards):
        part = rows[s::shards]
        path = folder / f"part-{s}.{'jsonl.gz' if kind == 'gz' else kind}"
        text = "".join(json.dumps(r) + "\n" for r in part)
        if kind == "jsonl":
            path.write_text(text)
        elif kind == "gz":
            path.write_bytes(gzip.compress(text.encode()))
        else:
            pq.write_table(pa.Table.from_pylist(part), path, row_group_size=4)
        ids += [f"{path}:{i if kind == 'parquet' else i + 1}" for i in range(len(part))]
    return ids


def _cfg(folder: Path, **kw) -> DataConfig:
    return DataConfig(train=str(folder), max_length=64,
                      **{"shuffle_buffer": 8, "block_rows": 4, "index_uri": str(folder.parent / "index"), **kw})


def _stream(cfg: DataConfig, tok, rank: int = 0, world: int = 1, b: int = 4, acc: int = 1) -> PreferenceStream:
    return PreferenceStream(cfg, cfg.train, tok, rank, world, batch_size=b, accumulation=acc)


def _take(stream: PreferenceStream, steps: int, start: int = 0) -> list[dict]:
    return [b for g in stream.batches(until_step=steps, accumulation=stream.accumulation, start_step=start)
            for b in g.batches]


def _ids(batches) -> list[str]:
    return [rid for b in batches for rid in b["row_ids"]]


@pytest.mark.parametrize(("n", "shards", "b"), [(48, 3, 4), (21, 1, 2), (50, 4, 3)])
def test_two_ranks_partition_rows_exactly_once_with_equal_batch_counts(tokenizer, tmp_path, n, shards, b) -> None:
    all_ids = _write(tmp_path / "d", _rows(n), shards)
    cfg = _cfg(tmp_path / "d")
    streams = [_stream(cfg, tokenizer, r, 2, b) for r in range(2)]
    nb = streams[0].batches_per_epoch()
    assert nb == streams[1].batches_per_epoch() == (n // 2) // b  # every rank stops at the same count
    seen = [_ids(_take(s, nb)) for s in streams]
    assert len(seen[0]) == len(seen[1]) == nb * b
    assert not set(seen[0]) & set(seen[1])  # no overlap
    union = seen[0] + seen[1]
    assert len(set(union)) == len(union) and set(union) <= set(all_ids)
    if n % (2 * b) == 0:
        assert set(union) == set(all_ids)  # nothing dropped when the rows divide evenly


def test_each_epoch_covers_every_row_again_in_a_new_order(tokenizer, tmp_path) -> None:
    all_ids = _write(tmp_path / "d", _rows(24), 2)
    s = _stream(_cfg(tmp_path / "d", shuffle_buffer=24), tokenizer, b=4)
    ids = _ids(_take(s, 12))  # two epochs of 6 batches
    assert sorted(ids[:24]) == sorted(ids[24:]) == sorted(all_ids)
    assert ids[:24] != ids[24:]
    assert s.epoch == 1 and s.epoch_progress() == 2.0  # epoch of the last consumed batch, all of it done


@pytest.mark.parametrize("kind", ["jsonl", "gz", "parquet"])
def test_exact_resume_from_json_state(tokenizer, tmp_path, kind: str) -> None:
    _write(tmp_path / "d", _rows(60), 3, kind)
    cfg = _cfg(tmp_path / "d", shuffle_buffer=6)
    full = _take(_stream(cfg, tokenizer, 1, 2), 10)  # 7 batches per epoch: crosses into epoch 1
    for k in (3, 8):
        first = _stream(cfg, tokenizer, 1, 2)
        head = _take(first, k)
        text = json.dumps(first.state_dict())
        assert '"prompt"' not in text  # the buffer is stored as references, not row contents
        resumed = _stream(cfg, tokenizer, 1, 2)
        resumed.load_state_dict(json.loads(text))
        assert resumed.stats.rows == first.stats.rows > 0
        tail = _take(resumed, 10, start=k)
        assert _ids(head + tail) == _ids(full)
        for a, b in zip(tail, full[k:], strict=True):
            assert a["input_ids"].equal(b["input_ids"]) and a["margin"].equal(b["margin"])


def test_resume_and_later_streams_read_the_index_and_only_their_rows(tokenizer, tmp_path, monkeypatch) -> None:
    """Once indexed, a stream never reads a shard whole again: a resumed rank fetches byte ranges
    of its own rows only (bounded GETs, none from the shard's start)."""
    _write(tmp_path / "d", _rows(200), 1)
    shard = tmp_path / "d" / "part-0.jsonl"
    cfg = _cfg(tmp_path / "d", shuffle_buffer=2)
    first = _stream(cfg, tokenizer, b=2)
    _take(first, 40)
    state = json.loads(json.dumps(first.state_dict()))
    whole: list[str] = []
    ranges: list[tuple[int, int]] = []
    real_open, real_range = storage.open_range, storage.read_range
    monkeypatch.setattr(storage, "open_range", lambda uri, start=0, etag=None: whole.append(uri) or
                        real_open(uri, start, etag))
    monkeypatch.setattr(storage, "read_range", lambda uri, a, b, etag=None: (uri == str(shard) and
                        ranges.append((a, b))) or real_range(uri, a, b, etag))
    resumed = _stream(cfg, tokenizer, b=2)
    resumed.load_state_dict(state)
    _take(resumed, 41, start=40)
    assert str(shard) not in whole  # no full read: rows and their offsets come from the index
    assert ranges and min(a for a, _ in ranges) > 0
    assert sum(b - a for a, b in ranges) < shard.stat().st_size / 20  # one batch of 2 rows, not the shard


def test_calling_batches_again_continues_after_the_last_consumed_batch(tokenizer, tmp_path) -> None:
    _write(tmp_path / "d", _rows(40), 2)
    cfg = _cfg(tmp_path / "d")
    full = _ids(_take(_stream(cfg, tokenizer), 8))
    s = _stream(cfg, tokenizer)
    head = _ids(_take(s, 3))  # the prefetch thread has read ahead of these
    assert head + _ids(_take(s, 8, start=3)) == full


def test_memory_is_bounded_by_the_window_and_the_caches(tokenizer, tmp_path) -> None:
    _write(tmp_path / "d", _rows(400), 2)
    s = _stream(_cfg(tmp_path / "d", shuffle_buffer=7), tokenizer)
    blocks = 0
    for g in s.batches(until_step=60, accumulation=1):
        assert len(g.batches) == 1
        assert s._order is not None and len(s._order._windows) <= 2  # one window permutation (and the last)
        blocks = max(blocks, len(s.index._blocks))
    assert 0 < blocks <= s.index.max_blocks  # index offsets are cached by block, never whole


def test_state_is_refused_when_data_or_global_batch_changed(tokenizer, tmp_path) -> None:
    _write(tmp_path / "d", _rows(16), 2)
    cfg = _cfg(tmp_path / "d")
    state = _stream(cfg, tokenizer).state_dict()
    with pytest.raises(InputError, match="exact resume needs the same global batch size"):
        _stream(cfg, tokenizer, b=2).load_state_dict(state)  # 2 x 1 x 1 != 4 x 1 x 1
    _stream(cfg, tokenizer, rank=1, world=2, b=2).load_state_dict(state)  # 2 x 1 x 2: the same G
    _write(tmp_path / "d", _rows(16), 3)
    with pytest.raises(InputError, match=r"part-0.jsonl: shard changed in place \(size 710 -> 532.*data changed.*\(2 more changes\)"):
        _stream(cfg, tokenizer).load_state_dict(state)


def test_resume_with_another_number_of_ranks_keeps_every_row_exactly_once(tokenizer, tmp_path) -> None:
    """2 ranks (batch 2) -> 1 rank (batch 2, accumulation 2) -> 2 ranks: G = 4 throughout, and the
    concatenated history is the uninterrupted run's order, every row once per epoch."""
    all_ids = _write(tmp_path / "d", _rows(48), 3)
    cfg = _cfg(tmp_path / "d")

    def run(streams: list[PreferenceStream], until: int, start: int) -> list[str]:
        per_rank = [_take(s, until, start) for s in streams]  # micro-batches of each rank
        return [rid for step in zip(*per_rank, strict=True) for b in step for rid in b["row_ids"]]

    base = run([_stream(cfg, tokenizer, r, 2, 2) for r in range(2)], 12, 0)
    assert sorted(base) == sorted(all_ids)  # 48 rows / G 4 = 12 steps, nothing dropped
    two = [_stream(cfg, tokenizer, r, 2, 2) for r in range(2)]
    head = run(two, 5, 0)
    states = [s.state_dict() for s in two]
    one = _stream(cfg, tokenizer, 0, 1, 2, acc=2)
    one.load_state_dict(states)
    assert one.stats.rows == sum(s.stats.rows for s in two)  # rank 0 carries the old ranks' counts
    mid = [rid for b in _take(one, 9, 5) for rid in b["row_ids"]]
    again = [_stream(cfg, tokenizer, r, 2, 2) for r in range(2)]
    for s in again:
        s.load_state_dict([one.state_dict()])
    tail = run(again, 12, 9)
    assert head + mid + tail == base


def _with_bad_line(folder: Path) -> Path:
    folder.mkdir(parents=True)
    path = folder / "part-0.jsonl"
    lines = [json.dumps(r) for r in _rows(12)]
    lines[6] = '{"prompt": "Words: x.", "chosen": " animal"}'  # line 7: no 'rejected'
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_row_fails_naming_file_and_line(tokenizer, tmp_path) -> None:
    path = _with_bad_line(tmp_path / "d")
    s = _stream(_cfg(tmp_path / "d", on_bad_record="fail"), tokenizer, b=2)
    with pytest.raises(InputError, match=f"^{path}:7: missing field 'rejected'"):
        _take(s, 6)


def test_bad_row_skipped_counted_and_padded_with_weight_zero(tokenizer, tmp_path) -> None:
    path = _with_bad_line(tmp_path / "d")
    streams = [_stream(_cfg(tmp_path / "d", on_bad_record="skip"), tokenizer, r, 2, 3) for r in range(2)]
    batches = [_take(s, 2) for s in streams]  # 12 rows / (2 ranks x 3) = 2 global batches
    ids = _ids(batches[0] + batches[1])
    assert f"{path}:7" not in ids and len(ids) == 12
    assert sorted(s.stats.bad_records for s in streams) == [0, 1]
    pads = [(i, b) for bs in batches for b in bs for i, rid in enumerate(b["row_ids"]) if rid.startswith("pad:")]
    assert len(pads) == 1 and all(b["weight"][i] == 0.0 for i, b in pads)
    real = [rid for rid in ids if not rid.startswith("pad:")]
    assert sorted(real) == sorted(f"{path}:{i}" for i in range(1, 13) if i != 7)


def test_prefetch_runs_ahead_and_wait_time_is_measured(tokenizer, tmp_path) -> None:
    _write(tmp_path / "d", _rows(64), 2)
    s = PreferenceStream(_cfg(tmp_path / "d"), str(tmp_path / "d"), tokenizer, 0, 1, batch_size=4, prefetch=3,
                         accumulation=2)
    groups = s.batches(until_step=4, accumulation=2)
    first = next(groups)
    assert first.wait_seconds > 0 and len(first.batches) == 2
    time.sleep(0.5)  # the step: the thread fills the queue meanwhile
    assert next(groups).wait_seconds < 0.25
    groups.close()


def test_eval_batches_cover_each_row_once_in_order_and_respect_the_cap(tokenizer, tmp_path) -> None:
    all_ids = _write(tmp_path / "d", _rows(11), 1)
    cfg = _cfg(tmp_path / "d")
    per_rank = [[rid for b in PreferenceStream.for_eval(cfg, cfg.train, tokenizer, r, 2, 4).eval_batches()
                 for rid in b["row_ids"]] for r in range(2)]
    assert per_rank == [all_ids[0::2], all_ids[1::2]]  # file order, last partial batch kept
    capped = DataConfig(**{**cfg.model_dump(), "eval_max_rows": 5})
    got = [rid for r in range(2) for b in PreferenceStream.for_eval(capped, cfg.train, tokenizer, r, 2, 4)
           .eval_batches() for rid in b["row_ids"]]
    assert sorted(got) == sorted(all_ids[:5])


@pytest.mark.parametrize("name", ["part.json", "PART.JSONL", "part.ndjson", "part.jsonl.bz2", "part.NDJSON.GZ"])
def test_json_lines_under_other_names_are_read(tokenizer, tmp_path, name: str) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    text = "".join(json.dumps(r) + "\n" for r in _rows(8)).encode()
    low = name.lower()
    data = bz2.compress(text) if low.endswith(".bz2") else gzip.compress(text) if low.endswith(".gz") else text
    (folder / name).write_bytes(data)
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / "README.md").write_text("notes")
    ids = _ids(_take(_stream(_cfg(folder), tokenizer, b=4), 2))
    assert sorted(ids) == sorted(f"{folder / name}:{i}" for i in range(1, 9))


@pytest.mark.parametrize(("name", "data", "match"), [
    ("part.csv", b"prompt,chosen,rejected\n", "part.csv: not a supported data shard"),
    ("part.jsonl.zst", b"\x28\xb5\x2f\xfd", "part.jsonl.zst: not a supported data shard"),
    ("part.json", b'[{"prompt": "a", "chosen": "b", "rejected": "c"}]\n', "part.json: a .json shard must be JSON Lines"),
])
def test_unsupported_shards_are_refused_naming_the_file(tokenizer, tmp_path, name: str, data: bytes, match: str) -> None:
    _write(tmp_path / "d", _rows(8), 1)
    (tmp_path / "d" / name).write_bytes(data)
    with pytest.raises(InputError, match=match):
        _stream(_cfg(tmp_path / "d"), tokenizer).rows_per_epoch()
