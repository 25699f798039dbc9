"""The shard index and ranged row reads against a real SeaweedFS: a changed shard is re-indexed,
an in-place change is refused at resume, each rank fetches about its share of the bytes, and
cut bodies and 503s on many small ranged GETs are survived."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from kubedpo_trainer import storage
from kubedpo_trainer.config import DataConfig
from kubedpo_trainer.data.stream import PreferenceStream
from kubedpo_trainer.errors import InputError
from tests.support.faultproxy import FaultProxy
from tests.support.s3 import S3Fixture


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny.model_dir)


def _rows(n: int, tag: str = "v1") -> list[dict]:
    # ~300-byte rows: short for preference data, so the index's 8 bytes a row show in the ratio.
    return [{"prompt": f"Words: cat dog {i} {tag}. " + "lorem ipsum " * 16, "chosen": " animal " * 4,
             "rejected": " color " * 4, "id": i} for i in range(n)]


def _put(s3: S3Fixture, key: str, rows: list[dict]) -> int:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    storage.write_bytes(s3.uri(key), data)
    return len(data)


def _cfg(s3: S3Fixture, **kw) -> DataConfig:
    return DataConfig(train=s3.uri("data/"), max_length=64, index_uri=s3.uri("index/"),
                      **{"shuffle_buffer": 64, "block_rows": 16, **kw})


def _stream(cfg: DataConfig, tok, rank: int = 0, world: int = 1, b: int = 4) -> PreferenceStream:
    return PreferenceStream(cfg, cfg.train, tok, rank, world, batch_size=b)


def test_changed_shard_gets_a_new_index_entry_never_the_stale_one(s3: S3Fixture, tokenizer) -> None:
    _put(s3, "data/a.jsonl", _rows(40))
    first = _stream(_cfg(s3), tokenizer)
    assert first.rows_per_epoch() == 40 and first.index.indexed_bytes > 0
    again = _stream(_cfg(s3), tokenizer)
    assert again.rows_per_epoch() == 40 and again.index.indexed_bytes == 0  # read from the index
    _put(s3, "data/a.jsonl", _rows(30, tag="v2"))  # replaced in place: new ETag and size
    changed = _stream(_cfg(s3), tokenizer)
    assert changed.rows_per_epoch() == 30 and changed.index.indexed_bytes > 0  # re-indexed
    rows = changed.read_positions(0, range(30))
    assert all("v2" in r.raw["prompt"] for r in rows)


def test_same_size_replacement_is_told_apart_by_etag(s3: S3Fixture, tokenizer) -> None:
    _put(s3, "data/a.jsonl", _rows(20, tag="v1"))
    s = _stream(_cfg(s3), tokenizer)
    s.rows_per_epoch()
    size = _put(s3, "data/a.jsonl", _rows(20, tag="v9"))  # same length, other bytes
    assert size == s.shards[0].size
    # A reader holding the old listing is refused (If-Match), never served the new bytes.
    with pytest.raises(InputError, match="a.jsonl: object was replaced"):
        s.read_positions(0, range(4))
    fresh = _stream(_cfg(s3), tokenizer)
    assert fresh.index.indexed_bytes == 0 and fresh.rows_per_epoch() == 20 and fresh.index.indexed_bytes > 0


def test_shard_changed_in_place_is_refused_at_resume_or_starts_a_new_epoch(s3: S3Fixture, tokenizer) -> None:
    _put(s3, "data/a.jsonl", _rows(40))
    _put(s3, "data/b.jsonl", _rows(40, tag="b"))
    s = _stream(_cfg(s3), tokenizer)
    list(s.batches(until_step=3, accumulation=1))
    state = json.loads(json.dumps(s.state_dict()))
    _put(s3, "data/b.jsonl", _rows(41, tag="b2"))
    with pytest.raises(InputError, match=r"data/b.jsonl: shard changed in place .*ETag .*data.onDataChange"):
        _stream(_cfg(s3), tokenizer).load_state_dict(state)
    renewed = _stream(_cfg(s3, on_data_change="newEpoch"), tokenizer)
    renewed.load_state_dict(state)
    assert renewed.epoch == 1 and renewed.epoch_progress() == 1.0


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_fetches_about_its_share_of_the_bytes(s3: S3Fixture, tokenizer, world: int) -> None:
    size = _put(s3, "data/a.jsonl", _rows(1200)) + _put(s3, "data/b.jsonl", _rows(1200, tag="b"))
    cfg = _cfg(s3, shuffle_buffer=200, block_rows=64)
    _stream(cfg, tokenizer).rows_per_epoch()  # build the index once
    for rank in range(world):
        s3.configure()  # fresh counters
        s = _stream(cfg, tokenizer, rank, world, b=4)
        for step in range(s.steps_per_epoch()):
            s.rows_for_step(0, step)
        gets, got = storage.traffic()
        assert got <= 1.2 * size / world, (rank, got, size / world)
        assert gets <= 2 * s.steps_per_epoch() * 4  # about one GET a row, plus index blocks and manifest


def test_many_small_ranged_reads_survive_cut_bodies_and_503s(s3: S3Fixture, fault_proxy: FaultProxy,
                                                             tokenizer) -> None:
    rows = _rows(200)
    _put(s3, "data/a.jsonl", rows)
    cfg = _cfg(s3)
    clean = _stream(cfg, tokenizer)
    expected = [(r.row_id, r.raw) for r in clean.read_positions(0, range(200))]
    s3.via(fault_proxy)
    fault_proxy.drop_after(100, count=4, methods=("GET",), path_contains="/data/a.jsonl")
    fault_proxy.status(503, count=3, methods=("GET",), path_contains="/data/")
    faulty = _stream(cfg, tokenizer)
    got = [(r.row_id, r.raw) for r in faulty.read_positions(0, range(200))]
    assert got == expected
    assert fault_proxy.pending() == 0 and storage.retry_count() >= 7
