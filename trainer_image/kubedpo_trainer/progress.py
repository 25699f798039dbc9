"""What a person (logs, progress bar) and Prometheus see of the loop, from rank 0.

One JSON log line per logging step, so `kubectl logs` is greppable and machine-readable; on a
terminal a live display instead (`console.py`, never in pod logs); the same values set as gauges.
Rank 0 keeps the logged rows to draw the training curves (`curves.py`) at the end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import storage
from .config import resolve_log_format
from .console import RichDisplay, summary_rows
from .curves import FILENAME as CURVES_FILENAME
from .curves import render_png
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
        self.history: dict[str, list[dict[str, float]]] = {"train": [], "eval": []}  # rank 0 only
        self._display = None
        self._summary: list[tuple[str, str]] = []
        if rank == 0 and resolve_log_format() == "rich":
            self._display = RichDisplay(total_steps, start_step)

    def train(self, step: int, values: Mapping[str, float], epoch: float, tokens_total: float,
              extra: Mapping[str, float] | None = None, job_tokens_total: float | None = None) -> dict[str, float]:
        """One logging step. `tokens_total`: this rank's non-padding tokens since the (re)start;
        `job_tokens_total`: all ranks' (summed by the caller, a collective), which gives
        job_tokens_per_second, the figure status.progress.tokensPerSecond reports."""
        elapsed = max(self._clock() - self._t0, 1e-9)
        rate = (step - self._step0) / elapsed  # optimizer steps per second since the (re)start
        row: dict[str, float] = {
            "step": step,
            "total_steps": self.total_steps,
            "epoch": epoch,
            **values,
            "steps_per_second": rate,
            "tokens_per_second": (tokens_total - self._tokens0) / elapsed,
            **({} if job_tokens_total is None else {"job_tokens": job_tokens_total,
                                                    "job_tokens_per_second": job_tokens_total / elapsed}),
            "eta_seconds": (self.total_steps - step) / rate if rate > 0 else float("nan"),
            **(extra or {}),
        }
        self.metrics.set(row)
        if self.rank == 0:
            self.history["train"].append(dict(row))
            if self._display is not None:
                self._display.train(row)
            else:
                log.info("%s", json.dumps({"event": "train", **_round(row)}))
        return row

    def eval(self, step: int, values: Mapping[str, float]) -> None:
        self.metrics.set(values)
        if self.rank == 0:
            self.history["eval"].append({"step": step, **values})
            if self._display is not None:
                self._display.eval(step, values)
            else:
                log.info("%s", json.dumps({"event": "eval", "step": step, **_round(values)}))

    def finish(self, summary: Mapping[str, Any], output_uri: str) -> str | None:
        """Rank 0: write the training-curve PNG into the output folder; returns its URI.

        Called before the model export, so the output's completion marker stays the last write.
        """
        if self.rank != 0:
            return None
        uri = storage.join(output_uri, CURVES_FILENAME)
        try:
            storage.write_bytes(uri, render_png(self.history["train"], self.history["eval"]))
        except ImportError as err:  # a slim image without matplotlib: say so, train anyway
            log.warning("training curves not drawn (%s); the JSON lines hold the same values", err)
            uri = ""
        else:
            log.info("training curves written to %s", uri)
        self._summary = summary_rows(summary, output_uri, uri or None)
        if self.history["train"]:
            last = self.history["train"][-1]
            rate = last.get("job_tokens_per_second", last.get("tokens_per_second", 0.0))  # all ranks
            self._summary.insert(2, ("tokens/s", f"{rate:,.0f}"))
        return uri or None

    def close(self) -> None:
        if self._display is not None:
            self._display.close(self._summary)


def _round(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}
