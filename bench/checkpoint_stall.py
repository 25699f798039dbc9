"""Training-loop stall per checkpoint: background upload vs synchronous upload, to real S3.

    .venv/bin/python bench/checkpoint_stall.py [--mb 256] [--rounds 3] [--link-mibps 0 100]

Drives `kubedpo_trainer.checkpoint.CheckpointWriter` (the trainer's code) with `--mb` MiB of
float32 tensors in a safetensors file, uploading to a local SeaweedFS, once straight and once
through a proxy that limits uploads to `--link-mibps` MiB/s over one shared link (local S3 takes
uploads at memory speed, a remote store does not). Between checkpoints the "training loop" runs
real torch compute (matmuls calibrated to `--step-ms`), so the table also shows how much a
background upload slows the steps it overlaps (CPU and GIL contention on this 2-core box).

Per mode: the stall is what `save()` blocks the loop per checkpoint (local write, plus the upload
when synchronous, plus waiting for the previous upload if it is still in flight); the wall is
`rounds` x (steps + checkpoint) including the final wait for the last upload, as the trainer
does before it exports.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kubedpo_trainer import checkpoint as ckpt  # noqa: E402
from kubedpo_trainer import storage  # noqa: E402
from kubedpo_trainer.config import S3Config  # noqa: E402
from tests.support.faultproxy import FaultProxy  # noqa: E402
from tests.support.seaweed import SeaweedFS  # noqa: E402

MiB = 2**20


# --- a store behind a slow uplink -------------------------------------------------------------


class Link:
    """One shared link of `bytes_per_s`: each request body waits for its turn and its send time."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s, self.free_at, self.lock = bytes_per_s, 0.0, threading.Lock()

    def transmit(self, nbytes: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.free_at = max(now, self.free_at) + nbytes / self.bytes_per_s
            done = self.free_at
        time.sleep(max(0.0, done - time.monotonic()))


class LinkProxy(FaultProxy):
    """The tests' fault proxy, with every request body delayed by a shared `Link`."""

    def __init__(self, upstream: str, bytes_per_s: float) -> None:
        self.link = Link(bytes_per_s)  # before super().__init__, which builds the handler class
        super().__init__(upstream, max_lifetime=1800)

    def _handler_class(self) -> Any:
        base, link = super()._handler_class(), self.link

        class Limited(base):  # type: ignore[misc, valid-type]
            def _read_body(self) -> bytes:
                body = super()._read_body()
                link.transmit(len(body))
                return body

        return Limited


def serve_proxy(upstream: str, mibps: float) -> None:
    """Run in its own process (its threads must not take the measured loop's GIL); stop on stdin EOF."""
    with LinkProxy(upstream, mibps * MiB) as proxy:
        print(proxy.endpoint, flush=True)
        sys.stdin.read()


# --- the simulated training loop ----------------------------------------------------------------


def calibrated_step(step_ms: float) -> Any:
    """A fixed amount of torch compute that takes about `step_ms` on an idle machine."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)

    def work(reps: int) -> None:
        for _ in range(reps):
            torch.mm(a, b)

    work(20)
    t0 = time.perf_counter()
    work(50)
    reps = max(1, round(50 * step_ms / 1000 / (time.perf_counter() - t0)))
    return lambda: work(reps)


def snapshot(step: int, state: dict[str, torch.Tensor]) -> ckpt.Snapshot:
    return ckpt.Snapshot(step, 0, {"model.safetensors": lambda p: save_file(state, str(p))})


def run_mode(uri: str, state: dict[str, torch.Tensor], background: bool, args: argparse.Namespace,
             step: Any, staging: Path) -> dict[str, float]:
    w = ckpt.CheckpointWriter(uri, 0, 1, keep_last=2, staging=staging, background=background)
    stalls, step_times, uploads = [], [], []
    upload = w._upload

    def timed_upload(*a: Any) -> None:  # how long the upload itself takes, on whichever thread
        t = time.perf_counter()
        upload(*a)
        uploads.append(time.perf_counter() - t)

    w._upload = timed_upload  # type: ignore[method-assign]
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for _ in range(args.steps):
            s = time.perf_counter()
            step()
            step_times.append(time.perf_counter() - s)
        stalls.append(w.save(snapshot(r + 1, state)))
    w.wait()
    wall = time.perf_counter() - t0
    if ckpt.latest_complete(uri) != args.rounds:
        raise SystemExit(f"{uri}: newest complete checkpoint is {ckpt.latest_complete(uri)}, not {args.rounds}")
    return {"stall": statistics.mean(stalls), "upload": statistics.mean(uploads),
            "step_ms": 1000 * statistics.mean(step_times), "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve-proxy", nargs=2, metavar=("UPSTREAM", "MIBPS"), help=argparse.SUPPRESS)
    p.add_argument("--mb", type=int, default=256, help="Checkpoint size in MiB.")
    p.add_argument("--rounds", type=int, default=3, help="Checkpoints per mode.")
    p.add_argument("--steps", type=int, default=30, help="Training steps between checkpoints.")
    p.add_argument("--step-ms", type=float, default=100.0, help="Compute per simulated step.")
    p.add_argument("--torch-threads", type=int, default=0, help="torch threads for the steps (0: torch's default).")
    p.add_argument("--link-mibps", type=float, nargs="+", default=[0, 100],
                   help="Upload links to measure in MiB/s; 0 = straight to local SeaweedFS.")
    args = p.parse_args()
    if args.serve_proxy:
        return serve_proxy(args.serve_proxy[0], float(args.serve_proxy[1]))
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    n = args.mb * MiB // 4
    state = {f"layer{i}.weight": torch.randn(n // 8) for i in range(8)}
    step = calibrated_step(args.step_ms)
    base_ms = 1000 * statistics.mean(_timed(step) for _ in range(20))
    rows = []
    with SeaweedFS() as s3, tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ.update(s3.env())
        bucket = s3.new_bucket("bench")
        for mibps in args.link_mibps:
            proxy = None
            endpoint = s3.endpoint
            if mibps:
                proxy = subprocess.Popen([sys.executable, __file__, "--serve-proxy", s3.endpoint, str(mibps)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                endpoint = proxy.stdout.readline().strip()  # type: ignore[union-attr]
            try:
                storage.configure(S3Config(endpoint_url=endpoint))
                for background in (True, False):
                    uri = f"s3://{bucket}/{mibps:g}/{'bg' if background else 'sync'}/"
                    rows.append((mibps, background, run_mode(uri, state, background, args, step, Path(tmp))))
            finally:
                if proxy is not None:
                    proxy.communicate("", timeout=30)  # EOF on stdin stops it
    print(f"{args.mb} MiB checkpoint, {args.rounds} checkpoints, {args.steps} steps of ~{base_ms:.0f} ms "
          f"(idle, {torch.get_num_threads()} torch threads) between them; wall includes the final wait for the last upload\n")
    print("| upload link | upload | stall per checkpoint (s) | upload itself (s) | mean step (ms) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for mibps, background, r in rows:
        link = f"{mibps:g} MiB/s (proxy)" if mibps else "local SeaweedFS"
        print(f"| {link} | {'background' if background else 'synchronous'} | {r['stall']:.3f} | "
              f"{r['upload']:.2f} | {r['step_ms']:.0f} | {r['wall']:.2f} |")
    print()
    for mibps in args.link_mibps:
        bg, sync = (r for m, _, r in rows if m == mibps)
        link = f"{mibps:g} MiB/s link" if mibps else "local SeaweedFS"
        print(f"{link}: stall ratio background/synchronous {bg['stall'] / sync['stall']:.3f}, "
              f"wall ratio {bg['wall'] / sync['wall']:.3f}")


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
