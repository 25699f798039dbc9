"""Issue 10, integrity: a damaged checkpoint is skipped for the newest one that verifies.

Checkpoints are written by the real CheckpointWriter (real safetensors weights, torch.save'd
optimizer/scheduler/RNG state, JSON state files) into a real SeaweedFS bucket, then damaged the
way an outside review did (truncated, deleted, garbage, flipped tensor bytes) with a raw S3
client. The end-to-end restart through the trainer is in test_resume.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from kubedpo_trainer import checkpoint as ckpt
from kubedpo_trainer.errors import InputError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))


def _snapshot(step: int, rank: int, sharded: bool = False) -> ckpt.Snapshot:
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    weights = ckpt.trainable_state(model)
    opt_state = opt.state_dict()
    rng = ckpt.rng_state()
    files = {
        f"rng-rank{rank}.pt": lambda p: torch.save(rng, p),
        f"data-rank{rank}.json": lambda p: Path(p).write_text(json.dumps({"rows": step * 8, "rank": rank})),
    }
    if sharded:
        def write_shards(p: Path) -> None:  # stands in for DCP's folder: one shard file per rank
            p.mkdir()
            torch.save({"w": torch.full((64,), float(rank))}, p / f"__{rank}_0.distcp")
            if rank == 0:
                (p / ".metadata").write_bytes(b"meta" * 16)
        files[ckpt.SHARDED_DIR] = write_shards
    if rank == 0:
        if not sharded:
            files["model.safetensors"] = lambda p: ckpt.save_trainable_state(weights, p)
            files["optimizer.pt"] = lambda p: torch.save(opt_state, p)
        files["scheduler.pt"] = lambda p: torch.save({"last_epoch": step, "base_lrs": [1e-3]}, p)
        files["trainer_state.json"] = lambda p: Path(p).write_text(json.dumps({"step": step, "world_size": 1}))
    return ckpt.Snapshot(step, rank, files)


def _write(uri: str, tmp: Path, steps: tuple[int, ...], world: int = 1, sharded: bool = False) -> None:
    writers = [ckpt.CheckpointWriter(uri, r, world, keep_last=10, staging=tmp / "staging", marker_timeout_s=30)
               for r in range(world)]
    for step in steps:
        for w in reversed(writers):  # rank 0 last: it waits for the others' markers
            w.save(_snapshot(step, w.rank, sharded), wait=True)


def _flip_tensor_bytes(data: bytes) -> bytes:
    """Flip bytes in the middle of the tensor payload (after safetensors' JSON header)."""
    header = 8 + int.from_bytes(data[:8], "little")
    mid = header + (len(data) - header) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 4]) + data[mid + 4 :]


DAMAGE = {
    "truncated-weights": ("model.safetensors", lambda b: b[: len(b) // 2]),
    "deleted-optimizer": ("optimizer.pt", None),
    "deleted-scheduler": ("scheduler.pt", None),
    "truncated-state": ("trainer_state.json", lambda b: b[:3]),
    "garbage-state": ("data-rank0.json", lambda b: os.urandom(len(b))),
    "flipped-tensor-bytes": ("model.safetensors", _flip_tensor_bytes),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_newest_verified(
        s3, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture) -> None:
    uri = s3.uri("run/ckpt/")
    _write(uri, tmp_path, (5, 10))
    name, damage = DAMAGE[case]
    key = f"run/ckpt/step-000010/{name}"
    client = s3.client()
    if damage is None:
        client.delete_object(Bucket=s3.bucket, Key=key)
    else:
        body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        client.put_object(Bucket=s3.bucket, Key=key, Body=damage(body))
    assert ckpt.latest_complete(uri) == 10  # COMPLETE is still there: only verification can tell
    with caplog.at_level(logging.WARNING, logger="kubedpo_trainer.checkpoint"):
        found = ckpt.newest_verified(uri, tmp_path / "resume")
    assert found is not None and found.step == 5
    warning = next(r.getMessage() for r in caplog.records if "fails verification" in r.getMessage())
    assert "step-000010" in warning and name in warning
    # The fallback really is loadable: weights, optimizer and RNG state, all with weights_only=True.
    model = _model()
    ckpt.load_trainable_state(model, found.local / "model.safetensors")
    torch.optim.AdamW(model.parameters()).load_state_dict(ckpt.load_torch(found.local / "optimizer.pt"))
    ckpt.set_rng_state(ckpt.load_torch(found.local / "rng-rank0.pt"))


def test_every_checkpoint_damaged_is_an_input_error_naming_them(tmp_path: Path) -> None:
    uri = str(tmp_path / "ckpt")
    _write(uri, tmp_path, (5, 10))
    for step in (5, 10):
        (Path(ckpt.step_dir(uri, step)) / "optimizer.pt").unlink()
    with pytest.raises(InputError, match=r"no checkpoint passes verification.*step-000010.*optimizer.pt: missing"
                                         r".*step-000005"):
        ckpt.newest_verified(uri, tmp_path / "resume")


def test_manifest_covers_every_ranks_sharded_files(tmp_path: Path) -> None:
    """FSDP: each rank's DCP shard is listed in COMPLETE; a flipped byte in rank 1's shard is caught."""
    uri = str(tmp_path / "ckpt")
    _write(uri, tmp_path, (5, 10), world=2, sharded=True)
    record = json.loads((Path(ckpt.step_dir(uri, 10)) / ckpt.COMPLETE).read_text())
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata", "rng-rank1.pt",
            "data-rank1.json", "scheduler.pt"} <= set(record["files"])
    shard = Path(ckpt.step_dir(uri, 10)) / "sharded" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))
    found = ckpt.newest_verified(uri, tmp_path / "resume")
    assert found is not None and found.step == 5 and found.has(ckpt.SHARDED_DIR) and not found.has("optimizer.pt")


def test_checkpoint_without_manifest_still_resumes(tmp_path: Path) -> None:
    """COMPLETE as written before manifests ({"step": N}): used, with a warning that it is unverified."""
    uri = str(tmp_path / "ckpt")
    _write(uri, tmp_path, (5,))
    (Path(ckpt.step_dir(uri, 5)) / ckpt.COMPLETE).write_text(json.dumps({"step": 5}))
    found = ckpt.newest_verified(uri, tmp_path / "resume")
    assert found is not None and found.step == 5 and found.files is None and found.has("optimizer.pt")


class _RunsCode:
    def __reduce__(self):  # what a hostile optimizer.pt would hold
        return (os.system, ("touch pwned",))


def test_state_files_load_without_running_pickled_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"state": {}, "param_groups": [], "x": _RunsCode()}, tmp_path / "optimizer.pt")
    with pytest.raises(InputError, match="optimizer.pt: not loadable"):
        ckpt.load_torch(tmp_path / "optimizer.pt")
    assert not (tmp_path / "pwned").exists()
