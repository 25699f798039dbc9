"""A checkpoint counts only once every rank's part is uploaded and COMPLETE is written last."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from kubedpo_trainer import checkpoint as ckpt
from kubedpo_trainer.errors import StorageError


def _snap(step: int, rank: int, payload: str) -> ckpt.Snapshot:
    return ckpt.Snapshot(step, rank, {f"data-rank{rank}.json": lambda p: Path(p).write_text(payload)})


def test_complete_only_after_every_rank(tmp_path: Path) -> None:
    uri = str(tmp_path / "ckpt")
    w0 = ckpt.CheckpointWriter(uri, 0, 2, keep_last=3, staging=tmp_path / "s", marker_timeout_s=10)
    w1 = ckpt.CheckpointWriter(uri, 1, 2, keep_last=3, staging=tmp_path / "s")
    w0.save(_snap(5, 0, "r0"))  # rank 0 uploads in the background and waits for rank 1's marker
    assert ckpt.latest_complete(uri) is None
    w1.save(_snap(5, 1, "r1"), wait=True)
    w0.wait()
    assert ckpt.latest_complete(uri) == 5
    step = Path(ckpt.step_dir(uri, 5))
    assert (step / "data-rank0.json").read_text() == "r0" and (step / "data-rank1.json").read_text() == "r1"


def test_completion_is_reported_only_once_complete(tmp_path: Path) -> None:
    """What feeds kubedpo_last_checkpoint_step and so status.lastCheckpoint: never a partial upload."""
    uri = str(tmp_path / "ckpt")
    seen: list[tuple[int, int | None]] = []
    w0 = ckpt.CheckpointWriter(uri, 0, 2, keep_last=3, staging=tmp_path / "s", marker_timeout_s=10,
                               on_complete=lambda step: seen.append((step, ckpt.latest_complete(uri))))
    w1 = ckpt.CheckpointWriter(uri, 1, 2, keep_last=3, staging=tmp_path / "s")
    w0.save(_snap(7, 0, "r0"))
    threading.Event().wait(0.3)
    assert seen == []  # rank 1 has not uploaded: nothing to report
    w1.save(_snap(7, 1, "r1"), wait=True)
    w0.wait()
    assert seen == [(7, 7)]


def test_incomplete_checkpoint_is_never_chosen(tmp_path: Path) -> None:
    uri = str(tmp_path / "ckpt")
    w = ckpt.CheckpointWriter(uri, 0, 1, keep_last=3, staging=tmp_path / "s")
    w.save(_snap(10, 0, "a"), wait=True)
    # A pod killed mid-upload leaves files but no COMPLETE marker.
    cut = Path(ckpt.step_dir(uri, 20))
    cut.mkdir(parents=True)
    (cut / "data-rank0.json").write_text("partial")
    assert ckpt.complete_steps(uri) == [10]
    assert ckpt.latest_complete(uri) == 10


def test_keep_last_prunes_oldest(tmp_path: Path) -> None:
    uri = str(tmp_path / "ckpt")
    w = ckpt.CheckpointWriter(uri, 0, 1, keep_last=2, staging=tmp_path / "s")
    for step in (1, 2, 3, 4):
        w.save(_snap(step, 0, str(step)))
    w.wait()
    assert ckpt.complete_steps(uri) == [3, 4]
    assert not Path(ckpt.step_dir(uri, 1)).exists()


def test_prune_drops_dead_partial_uploads_but_not_newer_ones(tmp_path: Path) -> None:
    uri = str(tmp_path / "ckpt")
    w = ckpt.CheckpointWriter(uri, 0, 1, keep_last=2, staging=tmp_path / "s")
    w.save(_snap(1, 0, "1"), wait=True)
    for dead in (2, 9):  # 2: killed mid-upload long ago; 9: still uploading on another rank
        Path(ckpt.step_dir(uri, dead)).mkdir(parents=True)
        (Path(ckpt.step_dir(uri, dead)) / "data-rank1.json").write_text("partial")
    w.save(_snap(3, 0, "3"), wait=True)
    assert ckpt.all_steps(uri) == [1, 3, 9]


def test_missing_rank_times_out_without_complete(tmp_path: Path) -> None:
    uri = str(tmp_path / "ckpt")
    w0 = ckpt.CheckpointWriter(uri, 0, 2, keep_last=3, staging=tmp_path / "s", marker_timeout_s=0.5)
    w0.save(_snap(7, 0, "r0"))
    with pytest.raises(StorageError, match="rank 1 never finished"):
        w0.wait()
    assert ckpt.latest_complete(uri) is None


def test_background_save_does_not_block_on_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop pays for the local write only; a slow upload runs on the writer's thread."""
    release = threading.Event()
    real_upload = ckpt.storage.upload_dir

    def slow_upload(local, uri):  # stands in for a slow network store
        release.wait(5)
        real_upload(local, uri)

    monkeypatch.setattr(ckpt.storage, "upload_dir", slow_upload)
    w = ckpt.CheckpointWriter(str(tmp_path / "ckpt"), 0, 1, keep_last=3, staging=tmp_path / "s")
    blocked = w.save(_snap(1, 0, "x"))
    assert blocked < 1.0 and ckpt.latest_complete(str(tmp_path / "ckpt")) is None
    release.set()
    w.wait()
    assert ckpt.latest_complete(str(tmp_path / "ckpt")) == 1


def test_trainable_state_round_trip_with_tied_weights(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    a, b = Tied(), Tied()
    state = ckpt.trainable_state(a)
    assert len(state) == 1  # stored once
    ckpt.save_trainable_state(state, tmp_path / "w.safetensors")
    b._tied_weights_keys = ["head.weight"]
    ckpt.load_trainable_state(b, tmp_path / "w.safetensors")
    assert torch.equal(a.emb.weight, b.emb.weight) and torch.equal(b.head.weight, a.emb.weight)


def test_operator_reports_the_folder_the_trainer_writes(tmp_path: Path) -> None:
    """status.lastCheckpoint names the same step folder the writer uploads to (one naming owner)."""
    from kubedpo_operator.progress import progress_patch

    for root in (str(tmp_path / "ckpt"), "s3://runs/ckpt/", "s3://runs/ckpt"):
        patch = progress_patch({"step": 1234567.0, "last_checkpoint_step": 1234567.0}, root, "now")
        assert patch["lastCheckpoint"]["uri"].rstrip("/") == ckpt.step_dir(root, 1234567).rstrip("/")
