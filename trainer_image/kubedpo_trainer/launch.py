"""A static, exit-code-preserving launcher: the pod's PID 1 starts one trainer per GPU.

Why not torchrun in the pod: torchrun reports any failed worker as exit code 1, which erases
the trainer's contract (2 = bad config, never retry; 75 = preempted, free restart) that the
operator's podFailurePolicy relies on, and its elastic agent is redundant with the operator's
gang restart. This launcher sets the same environment torchrun does (static rendezvous: node
rank from the Indexed Job's completion index), forwards SIGTERM to the workers, and exits with
the most meaningful worker code. Users can still run `torchrun -m kubedpo_trainer.cli` or
`accelerate launch` by hand: the trainer only reads the standard env variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import EXIT_OK, EXIT_PREEMPTED, EXIT_RETRIABLE, combine_exit_codes


@dataclass(frozen=True)
class LaunchPlan:
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def worker_env(plan: LaunchPlan, local_rank: int, base: dict[str, str]) -> dict[str, str]:
    """The variables torch.distributed's env:// init and accelerate read (as torchrun sets them)."""
    world = plan.nnodes * plan.nproc_per_node
    env = dict(base)
    env.update(
        RANK=str(plan.node_rank * plan.nproc_per_node + local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(plan.nproc_per_node),
        GROUP_RANK=str(plan.node_rank),
        NODE_RANK=str(plan.node_rank),
        MASTER_ADDR=plan.master_addr,
        MASTER_PORT=str(plan.master_port),
        TORCHELASTIC_RUN_ID=base.get("TORCHELASTIC_RUN_ID", "kubedpo"),
    )
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nproc_per_node)))
    return env


def launch(plan: LaunchPlan, argv: Sequence[str], grace_s: float = 60.0, settle_s: float = 3.0) -> int:
    """Run `python -m kubedpo_trainer.cli ARGV` once per local rank and wait for all of them.

    When one worker dies the others would block forever in a collective, so the rest are
    terminated (SIGTERM, then SIGKILL after `grace_s`) and the pod fails as a whole. They get
    `settle_s` to exit on their own first: when rank 0 fails on a bad input (exit 2), its peers
    see the broken connection and crash (exit 1) at about the same moment; cut short by our
    SIGTERM, rank 0 would lose its exit 2 and the operator would retry a hopeless run.
    """
    cmd = [sys.executable, "-m", "kubedpo_trainer.cli", *argv]
    procs: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Before the workers start: a SIGTERM that arrives while they are spawned reaches them all.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for r in range(plan.nproc_per_node):
        procs.append(subprocess.Popen(cmd, env=worker_env(plan, r, dict(os.environ))))
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        for i, p in enumerate(procs):
            if i not in codes and p.poll() is not None:
                codes[i] = _exit_code(p.returncode)
                if codes[i] not in (EXIT_OK, EXIT_PREEMPTED):
                    _let_exit(procs, settle_s)  # the rank that failed first may not be the cause
                    _stop_all(procs, grace_s)
        time.sleep(0.2)
    return combine_exit_codes([codes[i] for i in range(len(procs))])


def _exit_code(returncode: int) -> int:
    # A worker killed by a signal has a negative returncode; it is a crash, not a config error.
    return EXIT_RETRIABLE if returncode < 0 else returncode


def _let_exit(procs: list[subprocess.Popen], settle_s: float) -> None:
    deadline = time.monotonic() + settle_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def _stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
