"""The stream: every row once per epoch across ranks, equal batch counts, exact resume from JSON
state, bounded memory, bad-record policy, prefetch wait time, eval batches."""

from __future__ import annotations

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
    return DataConfig(train=str(folder), max_length=64, **{"shuffle_buffer": 8, **kw})


def _stream(cfg: DataConfig, tok, rank: int = 0, world: int = 1, b: int = 4) -> PreferenceStream:
    return PreferenceStream(cfg, cfg.train, tok, rank, world, batch_size=b)


def _take(stream: PreferenceStream, steps: int, start: int = 0) -> list[dict]:
    return [b for g in stream.batches(until_step=steps, accumulation=1, start_step=start) for b in g.batches]


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


def test_resume_reads_from_the_saved_byte_not_the_start(tokenizer, tmp_path, monkeypatch) -> None:
    _write(tmp_path / "d", _rows(200), 1)
    cfg = _cfg(tmp_path / "d", shuffle_buffer=2)
    first = _stream(cfg, tokenizer, b=2)
    _take(first, 40)
    state = json.loads(json.dumps(first.state_dict()))
    starts: list[int] = []
    real = storage.open_range

    def spy(uri, start=0):
        starts.append(start)
        return real(uri, start)

    resumed = _stream(cfg, tokenizer, b=2)
    resumed.rows_per_epoch()  # the (cached) row count is one full pass by design; not a position read
    monkeypatch.setattr(storage, "open_range", spy)
    resumed.load_state_dict(state)
    _take(resumed, 41, start=40)
    assert starts and min(starts) > 0


def test_calling_batches_again_continues_after_the_last_consumed_batch(tokenizer, tmp_path) -> None:
    _write(tmp_path / "d", _rows(40), 2)
    cfg = _cfg(tmp_path / "d")
    full = _ids(_take(_stream(cfg, tokenizer), 8))
    s = _stream(cfg, tokenizer)
    head = _ids(_take(s, 3))  # the prefetch thread has read ahead of these
    assert head + _ids(_take(s, 8, start=3)) == full


def test_memory_is_bounded_by_the_shuffle_buffer(tokenizer, tmp_path) -> None:
    _write(tmp_path / "d", _rows(400), 2)
    s = _stream(_cfg(tmp_path / "d", shuffle_buffer=7), tokenizer)
    for g in s.batches(until_step=60, accumulation=1):
        assert len(g.batches) == 1 and len(s.state_dict()["position"]["buffer"]) <= 7
    assert s.peak_buffered == 7  # the buffer is used, and never holds more


def test_state_is_refused_when_data_or_layout_changed(tokenizer, tmp_path) -> None:
    _write(tmp_path / "d", _rows(16), 2)
    cfg = _cfg(tmp_path / "d")
    state = _stream(cfg, tokenizer).state_dict()
    with pytest.raises(InputError, match="exact resume needs the same"):
        _stream(cfg, tokenizer, b=2).load_state_dict(state)
    _write(tmp_path / "d", _rows(16), 3)
    with pytest.raises(InputError, match="data changed"):
        _stream(cfg, tokenizer).load_state_dict(state)


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
    batches = [_take(s, 2) for s in streams]  # 12 rows / 2 ranks / 3 = 2 batches each
    ids = _ids(batches[0] + batches[1])
    assert f"{path}:7" not in ids and len(ids) == 12
    assert [s.stats.bad_records for s in streams] == [1, 0]  # line 7 is the 7th row: rank 0's
    pads = [(i, b) for b in batches[0] for i, rid in enumerate(b["row_ids"]) if rid.startswith("pad:")]
    assert len(pads) == 1 and all(b["weight"][i] == 0.0 for i, b in pads)
    real = [rid for rid in ids if not rid.startswith("pad:")]
    assert sorted(real) == sorted(f"{path}:{i}" for i in range(1, 13) if i != 7)


def test_prefetch_runs_ahead_and_wait_time_is_measured(tokenizer, tmp_path) -> None:
    _write(tmp_path / "d", _rows(64), 2)
    s = PreferenceStream(_cfg(tmp_path / "d"), str(tmp_path / "d"), tokenizer, 0, 1, batch_size=4, prefetch=3)
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
