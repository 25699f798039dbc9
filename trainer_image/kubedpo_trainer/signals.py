"""SIGTERM as a request, not a crash: the loop finishes its step, checkpoints, and exits 75.

Kubernetes sends SIGTERM to every pod of a preempted or evicted gang at about the same time,
but ranks may be at different points of a step; the loop therefore agrees on stopping with one
all-reduce per step (see `train.Trainer._agree`), so every rank saves the same step.

The handler is installed first thing (`install`, before torch is even imported), so a SIGTERM
during start-up (model download, row count, resume) is a preemption too: before the loop runs
there is nothing to checkpoint, so the handler raises `Preempted` in the main thread, which
interrupts a blocked read or lock wait there. Whatever the phase, a watchdog ends the process
with exit 75 before `checkpoint.preemptionGraceSeconds` run out, checkpoint or not: a step stuck
on a stalled read, or a `Preempted` swallowed by some library's retry loop, must not outlive the
grace period, after which the kubelet's SIGKILL would turn a free restart into a failure.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from .errors import EXIT_PREEMPTED, Preempted

log = logging.getLogger(__name__)


def watchdog_delay(grace_s: float) -> float:
    """Seconds after SIGTERM at which the watchdog exits: inside the grace, with time to spare
    for logging and process exit (10 %, at least 1 s and at most 5 s, before it ends)."""
    return max(0.5, grace_s - min(5.0, max(1.0, grace_s * 0.1)))


STARTUP_EXIT_S = 2.0  # before the loop: the time a raised Preempted gets to unwind before the watchdog exits


class StopRequest:
    """Set by SIGTERM; read by the training loop between steps.

    Python runs a signal handler on the main thread only, and only between bytecodes: a main
    thread blocked in C (a gloo collective, joining a stalled download's worker threads) would
    never see it. So the C-level handler also writes to a wakeup pipe, and a small thread reading
    it arms the watchdog whatever the main thread is doing.
    """

    def __init__(self, grace_s: float = 25.0, exit_now: Callable[[int], None] = os._exit) -> None:
        self.requested_at: float | None = None
        self.grace_s = grace_s
        self.in_loop = False
        self._exit_now = exit_now
        self._installed = False
        self._lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def request(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        """The Python-level handler (main thread)."""
        name = signal.Signals(signum).name
        if self._arrived() and self.in_loop:
            log.warning("received %s: finishing the step, then checkpointing", name)
        if not self.in_loop:
            raise Preempted(f"received {name} before training started: nothing to checkpoint yet")

    def install(self) -> None:
        """Take SIGTERM from now on (idempotent); call as early as possible, on the main thread."""
        if self._installed:
            return
        signal.signal(signal.SIGTERM, self.request)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch_pipe, args=(read_fd,), name="sigterm-watch", daemon=True).start()
        self._installed = True

    def training_started(self) -> None:
        """From here on a SIGTERM lets the loop finish its step and checkpoint."""
        self.install()
        self.in_loop = True
        if self.requested_at is not None:  # arrived while a library swallowed our Preempted
            log.warning("SIGTERM arrived during start-up: stopping before the first step")

    def _watch_pipe(self, read_fd: int) -> None:
        while True:
            data = os.read(read_fd, 64)
            if not data:
                return
            if signal.SIGTERM in data:
                self._arrived()

    def _arrived(self) -> bool:
        """Record the first SIGTERM and arm the watchdog; True the first time."""
        with self._lock:
            if self.requested_at is not None:
                return False
            self.requested_at = time.monotonic()
        self._start_watchdog()
        return True

    def _start_watchdog(self) -> None:
        in_loop = self.in_loop
        delay = watchdog_delay(self.grace_s) if in_loop else min(STARTUP_EXIT_S, watchdog_delay(self.grace_s))

        def fire() -> None:
            if in_loop:
                log.error("preempted: still running %.1fs after SIGTERM (checkpoint.preemptionGraceSeconds=%.0f), "
                          "exiting %d now; the restart resumes from the last complete checkpoint",
                          delay, self.grace_s, EXIT_PREEMPTED)
            else:
                log.error("received SIGTERM before training started: nothing to checkpoint yet (exit %d)",
                          EXIT_PREEMPTED)
            logging.shutdown()
            sys.stderr.flush()
            self._exit_now(EXIT_PREEMPTED)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        timer.name = "preemption-watchdog"
        timer.start()
