"""SIGTERM as a request, not a crash: the loop finishes its step, checkpoints, and exits 75.

Kubernetes sends SIGTERM to every pod of a preempted or evicted gang at about the same time,
but ranks may be at different points of a step; the loop therefore agrees on stopping with one
all-reduce per step (see `train.Trainer._agree`), so every rank saves the same step.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

log = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGTERM/SIGINT; read by the training loop between steps."""

    def __init__(self) -> None:
        self.requested_at: float | None = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def request(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            log.warning("received %s: finishing the step, then checkpointing", signal.Signals(signum).name)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.request)
