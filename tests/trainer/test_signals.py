"""The preemption watchdog: exit 75 inside the grace period, whatever the main thread is doing.

The end-to-end cases (SIGTERM during the model download, and with a data read hung) run real
trainers in test_resume.py; these check the timing rule and the start-up behaviour in-process.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from kubedpo_trainer.errors import EXIT_PREEMPTED, Preempted
from kubedpo_trainer.signals import StopRequest, watchdog_delay


@pytest.mark.parametrize(("grace", "delay"), [(25.0, 22.5), (10.0, 9.0), (3600.0, 3595.0), (1.0, 0.5)])
def test_watchdog_fires_inside_the_grace_period(grace: float, delay: float) -> None:
    assert watchdog_delay(grace) == pytest.approx(delay)
    assert watchdog_delay(grace) < grace


def test_sigterm_in_the_loop_sets_the_flag_and_exits_75_if_the_step_never_ends() -> None:
    exited: list[int] = []
    done = threading.Event()
    stop = StopRequest(grace_s=1.5, exit_now=lambda code: (exited.append(code), done.set()))
    stop.in_loop = True
    t0 = time.monotonic()
    stop.request(signal.SIGTERM)  # no raise: the loop checkpoints at the end of its step
    assert stop.requested and exited == []
    assert done.wait(5)
    assert exited == [EXIT_PREEMPTED] and time.monotonic() - t0 < 1.5


def test_sigterm_before_the_loop_raises_preempted() -> None:
    exited: list[int] = []
    stop = StopRequest(grace_s=30, exit_now=exited.append)
    with pytest.raises(Preempted, match="before training started"):
        stop.request(signal.SIGTERM)
    assert stop.requested
