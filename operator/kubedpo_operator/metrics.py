"""The operator's own Prometheus metrics (one registry per operator instance, no globals)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .api import PHASES


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("kubedpo_operator_jobs", "DPOJobs by phase (as last seen by this operator).",
                          ["phase"], registry=self.registry)
        self.restarts = Counter("kubedpo_operator_restarts_total", "Gang restarts started, by reason.",
                                ["reason"], registry=self.registry)
        self.transitions = Counter("kubedpo_operator_transitions_total", "Phase transitions, by phase.",
                                   ["phase"], registry=self.registry)
        self.errors = Counter("kubedpo_operator_reconcile_errors_total", "Handler errors, by handler.",
                              ["handler"], registry=self.registry)
        self.duration = Histogram("kubedpo_operator_reconcile_seconds", "Handler duration, by handler.",
                                  ["handler"], registry=self.registry,
                                  buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self._phases: dict[tuple[str, str], str] = {}
        for p in PHASES:
            self.jobs.labels(phase=p).set(0)

    def observe_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Track one job's phase (None: deleted) and refresh the by-phase gauge."""
        key = (namespace, name)
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        for p in PHASES:
            self.jobs.labels(phase=p).set(sum(1 for v in self._phases.values() if v == p))

    @contextmanager
    def timed(self, handler: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        except Exception:
            self.errors.labels(handler=handler).inc()
            raise
        finally:
            self.duration.labels(handler=handler).observe(time.perf_counter() - t0)

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
