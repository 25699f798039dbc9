"""Training-loop stall per checkpoint: background upload vs synchronous upload, to real S3.

    .venv/bin/python bench/checkpoint_stall.py [--mb 256] [--rounds 3] [--between-s 2]

Drives `kubedpo_trainer.checkpoint.CheckpointWriter` (the code the trainer uses) with `--mb`
MB of float32 tensors, uploading to a local SeaweedFS. The stall is what the training loop
pays per checkpoint: `save()` returns after the local write with background upload, after the
upload too with synchronous upload. Local S3 uploads at memory speed; a remote store's
slower uploads make the gap larger, not smaller.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubedpo_trainer import checkpoint as ckpt  # noqa: E402
from kubedpo_trainer import storage  # noqa: E402
from kubedpo_trainer.config import S3Config  # noqa: E402
from tests.support.seaweed import SeaweedFS  # noqa: E402


def snapshot(step: int, state: dict[str, torch.Tensor]) -> ckpt.Snapshot:
    return ckpt.Snapshot(step, 0, {"model.safetensors": lambda p: save_file(state, str(p))})


def measure(uri: str, state: dict[str, torch.Tensor], background: bool, rounds: int, step_s: float,
            staging: Path) -> tuple[float, float]:
    """(mean stall per checkpoint, wall time of `rounds` x (checkpoint + one simulated step))."""
    w = ckpt.CheckpointWriter(uri, 0, 1, keep_last=2, staging=staging, background=background)
    stalls = []
    t0 = time.perf_counter()
    for r in range(rounds):
        stalls.append(w.save(snapshot(r + 1, state)))
        time.sleep(step_s)  # the training steps until the next checkpoint
    w.wait()
    return statistics.mean(stalls), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=256, help="Checkpoint size in MB.")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--between-s", type=float, default=2.0, help="Training time between checkpoints.")
    args = p.parse_args()
    n = args.mb * 2**20 // 4
    state = {f"layer{i}.weight": torch.randn(n // 8) for i in range(8)}
    with SeaweedFS() as s3, tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ.update(s3.env())
        storage.configure(S3Config(endpoint_url=s3.endpoint))
        bucket = s3.new_bucket("bench")
        rows = []
        for background in (True, False):
            uri = f"s3://{bucket}/{'bg' if background else 'sync'}/"
            stall, wall = measure(uri, state, background, args.rounds, args.between_s, Path(tmp))
            assert ckpt.latest_complete(uri) == args.rounds
            rows.append((background, stall, wall))
    bg, sync = rows
    print(f"| checkpoint | upload | stall per checkpoint (s) | wall for {args.rounds} x (ckpt + {args.between_s:g} s "
          "of steps) (s) |")
    print("|---|---|---|---|")
    for background, stall, wall in rows:
        print(f"| {args.mb} MB | {'background' if background else 'synchronous'} | {stall:.3f} | {wall:.2f} |")
    print(f"\nstall ratio background/synchronous: {bg[1] / sync[1]:.3f}")


if __name__ == "__main__":
    main()
