"""The reference cache: exact numbers, reuse, resume after a kill, new key when inputs change, S3.

In-process on the tiny model (1 CPU process; accelerate's gather is then the identity). The
precompute's own table without a cache is the yardstick: cached, resumed and packed tables
must equal it (packed: 1e-5, a different kernel shape; read back: exactly).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from accelerate import Accelerator

from kubedpo_trainer import reference_cache, storage
from kubedpo_trainer.config import parse_config
from kubedpo_trainer.models import load_models, load_tokenizer
from kubedpo_trainer.tiny import write_preference_task

N_TRAIN, N_EVAL = 48, 8


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    train, eval_ = write_preference_task(tmp_path_factory.mktemp("refcache"), N_TRAIN, N_EVAL, seed=5, shards=2)
    return {"model": str(tiny.model_dir), "train": train, "eval": eval_}


def _cfg(task: dict[str, str], tmp: Path, cache: str | None, **training):
    return parse_config({
        "model": {"uri": task["model"]},
        "data": {"train": task["train"], "eval": task["eval"], "maxLength": 64, "maxPromptLength": 32,
                 **training.pop("data", {})},
        "training": {"referenceLogps": "precompute", "batchSize": 4, "referenceCacheUri": cache, **training},
        "output": {"uri": str(tmp / "out")},
    })


def _precompute(cfg) -> dict[str, tuple[float, float]]:
    acc = Accelerator(cpu=True)
    return reference_cache.precompute(cfg, acc, load_models(cfg, acc), load_tokenizer(cfg, acc)).table


def _computed(caplog: pytest.LogCaptureFixture) -> list[tuple[int, int]]:
    """(reused, computed) per split from the precompute's log lines."""
    out = []
    for r in caplog.records:
        msg = r.getMessage()
        if "rows reused from the cache" in msg:
            words = msg.split(": ", 1)[1].split()
            out.append((int(words[0]), int(words[6])))
    return out


@pytest.mark.slow  # reference passes over the tiny splits
def test_cache_is_exact_reused_and_keyed(task, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kubedpo_trainer.reference_cache")
    plain = _precompute(_cfg(task, tmp_path, None))
    assert len(plain) == N_TRAIN + N_EVAL
    cache = str(tmp_path / "cache")
    first = _precompute(_cfg(task, tmp_path, cache))
    assert first == plain
    assert _computed(caplog)[-2:] == [(0, N_TRAIN), (0, N_EVAL)]
    folders = sorted(p.name for p in Path(cache).iterdir())
    assert [f.split("-")[0] for f in folders] == ["eval", "train"]
    assert all((Path(cache) / f / "table.json.gz").exists() and not (Path(cache) / f / "parts").exists()
               for f in folders)
    again = _precompute(_cfg(task, tmp_path, cache))  # a restarted attempt, the next epoch or round
    assert again == plain
    assert _computed(caplog)[-2:] == [(N_TRAIN, 0), (N_EVAL, 0)]
    _precompute(_cfg(task, tmp_path, cache, data={"maxPromptLength": 16}))  # other truncation: new key
    assert _computed(caplog)[-2:] == [(0, N_TRAIN), (0, N_EVAL)]
    assert len(list(Path(cache).iterdir())) == 4


@pytest.mark.slow  # reference passes over the tiny splits
def test_killed_precompute_resumes_from_its_parts(task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kubedpo_trainer.reference_cache")
    plain = _precompute(_cfg(task, tmp_path, None))
    monkeypatch.setattr(reference_cache, "FLUSH_ROWS", 8)
    real, calls = reference_cache._forward, []

    def dies_on_the_fifth(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")  # what SIGKILL leaves: whatever parts were written
        return real(*args, **kw)

    monkeypatch.setattr(reference_cache, "_forward", dies_on_the_fifth)
    cache = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        _precompute(_cfg(task, tmp_path, cache))
    monkeypatch.setattr(reference_cache, "_forward", real)
    resumed = _precompute(_cfg(task, tmp_path, cache))
    assert resumed == plain
    reused, computed = _computed(caplog)[-2]  # train split
    assert reused == 16 and computed == N_TRAIN - 16  # 4 batches of 4 ran, 2 parts of 8 were written


@pytest.mark.slow  # reference passes over the tiny splits
def test_packed_precompute_equals_padded(task, tmp_path: Path) -> None:
    plain = _precompute(_cfg(task, tmp_path, None))
    packed = _precompute(_cfg(task, tmp_path, None, packing={"maxTokens": 200, "sharePrompt": True}))
    assert packed.keys() == plain.keys()
    for k, (c, r) in plain.items():
        assert packed[k] == pytest.approx((c, r), abs=1e-4, rel=1e-5)


@pytest.mark.slow
def test_cache_on_s3_beside_the_checkpoints(task, s3, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kubedpo_trainer.reference_cache")
    data = {k: s3.uri(f"data/{k}/") for k in ("train", "eval")}
    for k, uri in data.items():
        storage.upload_dir(task[k], uri)
    s3_task = {**task, **data}
    cfg = _cfg(s3_task, tmp_path, None)
    cfg.checkpoint.uri = s3.uri("run/ckpt/")
    first = _precompute(cfg)
    assert _computed(caplog)[-2:] == [(0, N_TRAIN), (0, N_EVAL)]
    assert any(o.uri.endswith("table.json.gz") for o in storage.list_objects(s3.uri("run/ckpt/reference-cache/")))
    assert _precompute(cfg) == first
    assert _computed(caplog)[-2:] == [(N_TRAIN, 0), (N_EVAL, 0)]
