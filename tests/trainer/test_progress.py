"""The step logger's rate and ETA: counted from where this process started, not from step 0."""

from __future__ import annotations

import pytest

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


def test_fresh_run_rate_and_eta() -> None:
    clock = Clock()
    logger = StepLogger(0, 100, TrainerMetrics("j", "ns", 0), start_step=0, clock=clock)
    clock.now += 5.0
    row = logger.train(10, {}, epoch=0.1, tokens_total=0.0)
    assert row["steps_per_second"] == pytest.approx(2.0) and row["eta_seconds"] == pytest.approx(45.0)
