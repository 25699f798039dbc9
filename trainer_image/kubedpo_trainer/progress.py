"""What a person (logs, progress bar) and Prometheus see of the loop, from rank 0.

One JSON log line per logging step, so `kubectl logs` is greppable and machine-readable; a tqdm
bar only when stderr is a terminal (never in pod logs); the same values set as gauges.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from .metrics import TrainerMetrics

log = logging.getLogger("kubedpo_trainer.progress")


class StepLogger:
    """Rate, throughput and ETA count from `start_step` (where a resumed run picked up) and from
    this logger's creation: steps done before a restart took no time in this process.
    `clock` is injectable for tests."""

    def __init__(self, rank: int, total_steps: int, metrics: TrainerMetrics, start_step: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rank, self.total_steps, self.metrics = rank, total_steps, metrics
        self._clock = clock
        self._t0, self._step0 = clock(), start_step
        self._tokens0 = 0.0
        self.metrics.set({"total_steps": total_steps, "step": start_step})
        self._bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="dpo", dynamic_ncols=True)

    def train(self, step: int, values: Mapping[str, float], epoch: float, tokens_total: float,
              extra: Mapping[str, float] | None = None) -> dict[str, float]:
        elapsed = max(self._clock() - self._t0, 1e-9)
        rate = (step - self._step0) / elapsed  # optimizer steps per second since the (re)start
        row: dict[str, float] = {
            "step": step,
            "total_steps": self.total_steps,
            "epoch": epoch,
            **values,
            "steps_per_second": rate,
            "tokens_per_second": (tokens_total - self._tokens0) / elapsed,
            "eta_seconds": (self.total_steps - step) / rate if rate > 0 else float("nan"),
            **(extra or {}),
        }
        self.metrics.set(row)
        if self.rank == 0:
            log.info("%s", json.dumps({"event": "train", **_round(row)}))
            if self._bar is not None:
                self._bar.n = step
                self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                                      acc=f"{values.get('rewards_accuracies', float('nan')):.2f}")
        return row

    def eval(self, step: int, values: Mapping[str, float]) -> None:
        self.metrics.set(values)
        if self.rank == 0:
            log.info("%s", json.dumps({"event": "eval", "step": step, **_round(values)}))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _round(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}
