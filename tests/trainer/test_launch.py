"""The pod launcher keeps the trainer's exit-code contract that torchrun would erase."""

from __future__ import annotations

import pytest

from kubedpo_trainer.errors import EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED, EXIT_RETRIABLE, combine_exit_codes
from kubedpo_trainer.launch import LaunchPlan, worker_env


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([0, 0], EXIT_OK),
        ([0, 2], EXIT_CONFIG),
        ([1, 2], EXIT_CONFIG),
        ([75, 75], EXIT_PREEMPTED),
        ([75, 0], EXIT_PREEMPTED),
        ([75, 1], EXIT_RETRIABLE),
        ([0, 137], EXIT_RETRIABLE),
    ],
)
def test_combine_exit_codes(codes: list[int], expected: int) -> None:
    assert combine_exit_codes(codes) == expected


def test_worker_env_global_rank_from_node_rank() -> None:
    plan = LaunchPlan(nnodes=3, nproc_per_node=4, node_rank=2, master_addr="job-0.svc", master_port=1234)
    env = worker_env(plan, local_rank=1, base={"PATH": "/bin"})
    assert env["RANK"] == "9" and env["WORLD_SIZE"] == "12" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "4" and env["MASTER_ADDR"] == "job-0.svc" and env["MASTER_PORT"] == "1234"
    assert env["PATH"] == "/bin"
