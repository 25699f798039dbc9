"""Prometheus metrics of a judge process: the generic progress gauges the operator reads, plus judge_*.

Progress is in prompts judged (`kubedpo_step` / `kubedpo_total_steps` / `kubedpo_eta_seconds`) over
this rank's share of the units (rank 0 serves them; units are dealt evenly, so its share tracks
the job's); `kubedpo_tokens_per_second` is real tokens: the judge's prompt + completion tokens
as the endpoint reports them, or the tokens the reward model scored. `kubedpo_job_tokens_per_second`
(what status.progress shows) is set only with one rank: ranks do not talk, so rank 0 cannot know
the others' tokens, and a rank-0 number under a job-wide name would lie.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from ..metrics import LABELS, PREFIX, serve_registry
from .pairs import VERDICTS
from .tally import ERROR_KINDS

PROGRESS_GAUGES = ("step", "total_steps", "eta_seconds", "tokens_per_second", "job_tokens_per_second", "attempt")


class JudgeMetrics:
    """Implements tally.Observer, so every counted event also lands here."""

    def __init__(self, job: str, namespace: str, rank: int) -> None:
        self.registry = r = CollectorRegistry()
        self._labels = {"dpojob": job, "namespace": namespace, "rank": str(rank)}
        lb = self._labels
        # A gauge's series appears when first set (job_tokens_per_second never appears with 2+ ranks)
        self._families = {n: Gauge(PREFIX + n, f"Judge progress: {n.replace('_', ' ')}", LABELS, registry=r)
                          for n in PROGRESS_GAUGES}
        self._requests = PromCounter(PREFIX + "judge_requests", "Judge HTTP requests (every attempt) by outcome "
                                     "(ok, error), or reward-model rows scored (ok).", (*LABELS, "outcome"), registry=r)
        self._seconds = Histogram(PREFIX + "judge_request_seconds", "Latency of one judge request attempt.",
                                  LABELS, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                  registry=r).labels(**lb)
        self._errors = PromCounter(PREFIX + "judge_errors", "Failed judge request attempts by kind.",
                                   (*LABELS, "kind"), registry=r)
        self._cache_hits = PromCounter(PREFIX + "judge_cache_hits", "Judgements served from the cache.", LABELS,
                                       registry=r).labels(**lb)
        self._pairs = PromCounter(PREFIX + "judge_pairs", "Preference pairs written.", LABELS, registry=r).labels(**lb)
        self._verdicts = PromCounter(PREFIX + "judge_verdicts", "Judged items by verdict (pair: a preference).",
                                     (*LABELS, "verdict"), registry=r)
        for kind in ERROR_KINDS:  # every series exists from the start: a dashboard shows 0, not "no data"
            self._errors.labels(**lb, kind=kind)
        for verdict in VERDICTS:
            self._verdicts.labels(**lb, verdict=verdict)
        for outcome in ("ok", "error"):
            self._requests.labels(**lb, outcome=outcome)
        self.tokens_total = 0

    def set(self, **values: float) -> None:
        for name, value in values.items():
            self._families[name].labels(**self._labels).set(float(value))

    def request(self, outcome: str, seconds: float) -> None:
        self._requests.labels(**self._labels, outcome=outcome).inc()
        self._seconds.observe(seconds)

    def error(self, kind: str) -> None:
        self._errors.labels(**self._labels, kind=kind).inc()

    def cache_hit(self) -> None:
        self._cache_hits.inc()

    def verdicts(self, counts: Counter[str]) -> None:
        for verdict, n in counts.items():
            if n:
                self._verdicts.labels(**self._labels, verdict=verdict).inc(n)

    def pairs(self, n: int) -> None:
        if n:
            self._pairs.inc(n)

    def tokens(self, n: int) -> None:
        self.tokens_total += n

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        return serve_registry(self.registry, port, addr)
