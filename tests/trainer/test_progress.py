"""The step logger's rate and ETA: counted from where this process started, not from step 0."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from kubedpo_trainer.metrics import TrainerMetrics
from kubedpo_trainer.progress import StepLogger


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eta_after_a_resume_counts_from_the_resume_point() -> None:
    """Resumed at step 1000 of 2000, 10 steps in 1 s: 10 steps/s, so ~99 s left (not 1 s, which a
    rate of 1010 steps over 1 s would give)."""
    clock = Clock()
    logger = StepLogger(0, 2000, TrainerMetrics("j", "ns", 0), start_step=1000, clock=clock)
    clock.now += 1.0
    row = logger.train(1010, {"loss": 0.5}, epoch=0.5, tokens_total=5000.0)
    assert row["steps_per_second"] == pytest.approx(10.0)
    assert row["eta_seconds"] == pytest.approx(99.0)
    assert row["tokens_per_second"] == pytest.approx(5000.0)  # tokens of this process, over its time
    assert "job_tokens_per_second" not in row  # not known: no made-up figure


def test_job_tokens_per_second_is_all_ranks_over_rank_0s_time() -> None:
    clock = Clock()
    metrics = TrainerMetrics("j", "ns", 0)
    logger = StepLogger(0, 100, metrics, start_step=0, clock=clock)
    clock.now += 4.0
    row = logger.train(8, {}, epoch=0.1, tokens_total=1000.0, job_tokens_total=3000.0)
    assert row["tokens_per_second"] == pytest.approx(250.0) and row["job_tokens_per_second"] == pytest.approx(750.0)
    assert row["job_tokens"] == 3000.0
    text = generate_latest(metrics.registry).decode()
    assert 'kubedpo_job_tokens_per_second{dpojob="j",namespace="ns",rank="0"} 750.0' in text


def test_fresh_run_rate_and_eta() -> None:
    clock = Clock()
    logger = StepLogger(0, 100, TrainerMetrics("j", "ns", 0), start_step=0, clock=clock)
    clock.now += 5.0
    row = logger.train(10, {}, epoch=0.1, tokens_total=0.0)
    assert row["steps_per_second"] == pytest.approx(2.0) and row["eta_seconds"] == pytest.approx(45.0)
