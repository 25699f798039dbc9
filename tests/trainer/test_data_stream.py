"""The data stream: exactly-once partitioning across ranks, exact resume, bounded memory,
prompt masking and counted truncation, and the same rows from JSONL, JSONL.gz and Parquet."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from kubedpo_trainer.config import DataConfig
from kubedpo_trainer.data.collate import collate
from kubedpo_trainer.data.formats import parse_row, read_rows
from kubedpo_trainer.data.stream import PreferenceStream
from kubedpo_trainer.data.tokenize import DataStats, tokenize_row


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny.model_dir)


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"Words: cat dog {i}.", "chosen": " animal", "rejected": " color", "margin": i} for i in range(n)]


def _write_shards(folder: Path, rows: list[dict], shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        part = rows[s::shards]
        (folder / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def _ids(batches) -> list[str]:
    return [rid for b in batches for rid in b["row_ids"]]


def _take(stream: PreferenceStream, steps: int) -> list[dict]:
    return [b for g in stream.batches(until_step=steps, accumulation=1) for b in g.batches]


def test_two_ranks_partition_every_row_exactly_once(tok, tmp_path: Path) -> None:
    _write_shards(tmp_path / "d", _rows(48), shards=3)
    cfg = DataConfig(train=str(tmp_path / "d"), shuffle_buffer=8, max_length=64)
    streams = [PreferenceStream(cfg, cfg.train, tok, r, 2, batch_size=4) for r in range(2)]
    assert streams[0].batches_per_epoch() == streams[1].batches_per_epoch() == 6
    seen = [_ids(_take(s, 6)) for s in streams]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0] + seen[1]) == len(set(seen[0] + seen[1])) == 48


def test_one_shard_many_ranks_and_next_epoch_reshuffles(tok, tmp_path: Path) -> None:
    _write_shards(tmp_path / "d", _rows(24), shards=1)
    cfg = DataConfig(train=str(tmp_path / "d"), shuffle_buffer=24, max_length=64)
    s = PreferenceStream(cfg, cfg.train, tok, 1, 3, batch_size=2)
    ids = _ids(_take(s, 8))  # 2 epochs of 4 batches
    assert len(set(ids[:8])) == 8 and set(ids[:8]) == set(ids[8:])
    assert ids[:8] != ids[8:]  # the buffer RNG is seeded per epoch


def test_exact_resume_from_json_state(tok, tmp_path: Path) -> None:
    _write_shards(tmp_path / "d", _rows(64), shards=3)
    cfg = DataConfig(train=str(tmp_path / "d"), shuffle_buffer=16, max_length=64)
    full = _ids(_take(PreferenceStream(cfg, cfg.train, tok, 0, 2, batch_size=4), 10))  # crosses an epoch
    first = PreferenceStream(cfg, cfg.train, tok, 0, 2, batch_size=4)
    head = _ids(_take(first, 3))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = PreferenceStream(cfg, cfg.train, tok, 0, 2, batch_size=4)
    resumed.load_state_dict(state)
    tail = _ids(b for g in resumed.batches(until_step=10, accumulation=1, start_step=3) for b in g.batches)
    assert head + tail == full


def test_buffer_bounds_memory(tok, tmp_path: Path) -> None:
    _write_shards(tmp_path / "d", _rows(200), shards=2)
    cfg = DataConfig(train=str(tmp_path / "d"), shuffle_buffer=5, max_length=64)
    s = PreferenceStream(cfg, cfg.train, tok, 0, 1, batch_size=4)
    for _ in _take(s, 20):
        assert len(s.state_dict()["position"]["buffer"]) <= 5


def test_state_rejects_changed_data(tok, tmp_path: Path) -> None:
    _write_shards(tmp_path / "d", _rows(16), shards=2)
    cfg = DataConfig(train=str(tmp_path / "d"), max_length=64)
    state = PreferenceStream(cfg, cfg.train, tok, 0, 1, batch_size=4).state_dict()
    _write_shards(tmp_path / "d", _rows(16), shards=3)
    with pytest.raises(Exception, match="data changed"):
        PreferenceStream(cfg, cfg.train, tok, 0, 1, batch_size=4).load_state_dict(state)


def test_loss_mask_covers_exactly_the_response_tokens(tok) -> None:
    cfg = DataConfig(train="unused", max_length=64)
    stats = DataStats()
    row = tokenize_row(parse_row({"prompt": "Words: cat.", "chosen": " animal", "rejected": " fruit color"}), "r",
                       tok, cfg, stats)
    b = collate([row], tok.pad_token_id)
    for i, resp in enumerate((row.chosen_ids, row.rejected_ids)):
        masked = b["input_ids"][i][b["loss_mask"][i]].tolist()
        assert masked == resp and resp[-1] == tok.eos_token_id
        n = len(row.prompt_ids)
        assert b["input_ids"][i][:n].tolist() == row.prompt_ids and not b["loss_mask"][i][:n].any()
    assert not b["loss_mask"][b["attention_mask"] == 0].any()  # padding never counts


def test_truncation_is_counted_never_silent(tok) -> None:
    cfg = DataConfig(train="unused", max_length=12, max_prompt_length=5, truncation_side="left")
    stats = DataStats()
    long_prompt = "Words: " + " ".join(["cat"] * 20) + "."
    row = tokenize_row(parse_row({"prompt": long_prompt, "chosen": " animal " * 20, "rejected": " color"}), "r",
                       tok, cfg, stats)
    assert len(row.prompt_ids) == 5 and row.prompt_ids == tok(long_prompt)["input_ids"][-5:]  # kept the end
    assert len(row.prompt_ids) + len(row.chosen_ids) == 12
    assert stats.truncated_prompts == 1 and stats.truncated_responses == 1


def test_jsonl_gz_and_parquet_give_the_same_rows(tmp_path: Path) -> None:
    rows = _rows(7)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=3)
    for name in ("a.jsonl", "a.jsonl.gz", "a.parquet"):
        got = [raw for _, _, raw in read_rows(str(tmp_path / name))]
        assert got == rows, name
        assert [raw for _, _, raw in read_rows(str(tmp_path / name), start_row=4)] == rows[4:], name


def test_formats_conversational_and_implicit(tok) -> None:
    conv = parse_row({"prompt": [{"role": "user", "content": "Words: cat."}],
                      "chosen": [{"role": "assistant", "content": "animal"}],
                      "rejected": [{"role": "assistant", "content": "color"}]})
    row = tokenize_row(conv, "c", tok, DataConfig(train="x", max_length=64), DataStats())
    text = tok.decode(row.prompt_ids + row.chosen_ids)
    assert "Words: cat." in text and text.rstrip().endswith(tok.eos_token) and "animal" in text
    imp = parse_row({"chosen": "Words: cat. Answer: animal", "rejected": "Words: cat. Answer: color"})
    assert imp.prompt == "Words: cat. Answer:" and imp.chosen == " animal" and imp.rejected == " color"
