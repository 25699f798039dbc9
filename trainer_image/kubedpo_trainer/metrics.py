"""Prometheus metrics of a trainer process (names per DESIGN.md: TRL's names with '/' -> '_').

A private CollectorRegistry per trainer (no module-level globals), so tests can build several
and the endpoint serves exactly what this run logged. Only rank 0 serves by default: the
operator reads rank 0's endpoint, and one scrape target per job keeps Prometheus cheap; the
other ranks still keep their registry so `values()` works everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "kubedpo_"
# `dpojob`, not `job`: Prometheus owns `job` (the scrape job) and renames a target's own `job` to
# `exported_job` unless the scrape sets honor_labels, which annotation-based scrapers do not.
LABELS = ("dpojob", "namespace", "rank")

# TRL's per-step DPO metrics (train and eval_ variants), each a gauge set at every logging step.
DPO_GAUGES = (
    "loss",
    "rewards_chosen",
    "rewards_rejected",
    "rewards_accuracies",
    "rewards_margins",
    "logps_chosen",
    "logps_rejected",
    "logits_chosen",
    "logits_rejected",
)
TRAIN_GAUGES = (
    *DPO_GAUGES,
    *(f"eval_{n}" for n in DPO_GAUGES),
    "grad_norm",
    "learning_rate",
    "beta",
    "epoch",
    "step",
    "total_steps",
    "tokens_per_second",
    "job_tokens_per_second",
    "eta_seconds",
    "last_checkpoint_step",
    "last_checkpoint_timestamp_seconds",
    "attempt",
    "mean_token_accuracy",  # task sft: target tokens ranked first by the model
    "eval_mean_token_accuracy",
)
# Gauges that mean nothing before their event: no series until first set, so a dashboard shows
# "no data" rather than an eval accuracy or a checkpoint step of 0 before the first one.
LAZY_GAUGES = frozenset({*(f"eval_{n}" for n in DPO_GAUGES), "last_checkpoint_step",
                         "mean_token_accuracy", "eval_mean_token_accuracy",
                         "last_checkpoint_timestamp_seconds"})
# Labelled kind=allocated|reserved besides dpojob/namespace/rank; set on GPU only (no series on a
# CPU run: host memory would be another quantity under the same name).
GPU_MEMORY = "gpu_memory_bytes"
GPU_MEMORY_KINDS = ("allocated", "reserved")
COUNTERS = {
    "samples": "Preference pairs trained on (this rank).",
    "tokens": "Non-padding tokens processed (this rank).",
    "job_tokens": "Non-padding tokens processed by all ranks of the job (summed at each logging step).",
    "s3_retries": "S3 requests retried and broken streams resumed (this rank).",
    "bad_records": "Malformed data rows skipped, all ranks (data.onBadRecord=skip; summed at each logging step).",
    "truncated_prompts": "Prompts cut to data.maxPromptLength, all ranks (summed at each logging step).",
    "truncated_responses": "Responses cut to fit data.maxLength, all ranks (summed at each logging step).",
}
HISTOGRAMS = {
    "step_seconds": ("Wall time of one optimizer step.", (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)),
    "data_wait_seconds": ("Time the loop waited for the next batch.", (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5)),
    "checkpoint_seconds": ("Time the loop was blocked saving a checkpoint.", (0.1, 0.5, 1, 5, 15, 60, 300)),
}


def task_identity() -> tuple[str, str, int]:
    """(DPOJob name, namespace, attempt) from the env the operator gives every task's pods."""
    return (os.environ.get("KUBEDPO_JOB_NAME", "local"), os.environ.get("KUBEDPO_NAMESPACE", ""),
            int(os.environ.get("KUBEDPO_ATTEMPT", "0")))


def serve_registry(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> int:
    """Start a /metrics endpoint for `registry`; returns the bound port (port 0 picks a free one)."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return int(server.server_address[1])


class TrainerMetrics:
    """The metrics of one trainer process, labelled dpojob/namespace/rank (`job`: the DPOJob's name)."""

    def __init__(self, job: str, namespace: str, rank: int, unused: Iterable[str] = ()) -> None:
        """`unused`: gauges this task never sets (task sft: the reward series), exported only if set,
        so the operator's status and dashboards show no reward accuracy of 0 for an SFT run."""
        self.registry = CollectorRegistry()
        self._lazy = LAZY_GAUGES | frozenset(unused)
        self._labels = {"dpojob": job, "namespace": namespace, "rank": str(rank)}
        self._families = {
            n: Gauge(PREFIX + n, f"DPO {n.replace('_', ' ')}", LABELS, registry=self.registry) for n in TRAIN_GAUGES
        }
        self._gauges = {n: g.labels(**self._labels) for n, g in self._families.items() if n not in self._lazy}
        self._counters = {
            n: Counter(PREFIX + n, doc, LABELS, registry=self.registry).labels(**self._labels)
            for n, doc in COUNTERS.items()
        }
        self._histograms = {
            n: Histogram(PREFIX + n, doc, LABELS, buckets=b, registry=self.registry).labels(**self._labels)
            for n, (doc, b) in HISTOGRAMS.items()
        }
        self._counted: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)
        self._gpu_family = Gauge(PREFIX + GPU_MEMORY, "Peak GPU memory of the fullest rank, bytes (kind: allocated by "
                    "tensors, reserved by the caching allocator).", (*LABELS, "kind"), registry=self.registry)

    def set(self, values: Mapping[str, float]) -> None:
        """Set gauges by name; names that are not gauges are ignored (logs may carry more)."""
        for name, value in values.items():
            gauge = self._gauges.get(name)
            if gauge is None and name in self._lazy:
                gauge = self._gauges[name] = self._families[name].labels(**self._labels)
            if gauge is not None:
                gauge.set(float(value))

    def set_gpu_memory(self, peaks: Mapping[str, float]) -> None:
        """`kubedpo_gpu_memory_bytes{kind=...}` from `gpu_memory.max_over_ranks`."""
        for kind, value in peaks.items():
            if kind not in GPU_MEMORY_KINDS:
                raise KeyError(f"gpu memory kind {kind!r}: expected one of {GPU_MEMORY_KINDS}")
            self._gpu_family.labels(**self._labels, kind=kind).set(float(value))

    def inc(self, name: str, amount: float = 1.0) -> None:
        if amount:
            self._counters[name].inc(amount)
            self._counted[name] += amount

    def sync_counter(self, name: str, total: float) -> None:
        """Advance a counter to a running total kept elsewhere (data stats, S3 retry count)."""
        self.inc(name, max(0.0, total - self._counted[name]))

    def observe(self, name: str, seconds: float) -> None:
        self._histograms[name].observe(seconds)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        return serve_registry(self.registry, port, addr)
