"""Prometheus metrics of task generate (rank 0 serves them, with the job-wide numbers).

The generic progress gauges the operator reads for every task (`kubedpo_step`,
`kubedpo_total_steps`, `kubedpo_eta_seconds`, `kubedpo_tokens_per_second`) count prompts here
(training prompts and held-out prompts alike), plus generate's own. Its own registry: a
generate pod exports no DPO loss or reward series, which would read as zeros on a dashboard.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..metrics import LABELS, PREFIX, serve_registry

GAUGES = {
    "step": "Prompts done (generate: the progress unit is a prompt), all ranks.",
    "total_steps": "Prompts to do in this task, all ranks.",
    "eta_seconds": "Estimated seconds to the end, from this attempt's rate.",
    "tokens_per_second": "Generated tokens per second over all ranks in this attempt.",
    "attempt": "Gang restarts so far.",
    "generate_prompts_done": "Prompts with their responses written (finished units), all ranks.",
    "generate_prompts_total": "Prompts of the task (training and held-out).",
}
COUNTERS = {
    "generate_tokens": "Tokens generated, all ranks (this attempt).",
    "bad_records": "Prompt rows skipped (data.onBadRecord=skip), all ranks.",
    "truncated_prompts": "Prompts cut to data.maxPromptLength, all ranks.",
}


class GenerateMetrics:
    def __init__(self, job: str, namespace: str, rank: int) -> None:
        self.registry = CollectorRegistry()
        labels = {"dpojob": job, "namespace": namespace, "rank": str(rank)}
        self._gauges = {n: Gauge(PREFIX + n, doc, LABELS, registry=self.registry).labels(**labels)
                        for n, doc in GAUGES.items()}
        self._counters = {n: Counter(PREFIX + n, doc, LABELS, registry=self.registry).labels(**labels)
                          for n, doc in COUNTERS.items()}
        self._counted = dict.fromkeys(COUNTERS, 0.0)

    def set(self, **values: float) -> None:
        for name, value in values.items():
            self._gauges[name].set(float(value))

    def advance(self, name: str, total: float) -> None:
        """Move a counter up to a running total kept elsewhere."""
        step = total - self._counted[name]
        if step > 0:
            self._counters[name].inc(step)
            self._counted[name] = total

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        return serve_registry(self.registry, port, addr)
