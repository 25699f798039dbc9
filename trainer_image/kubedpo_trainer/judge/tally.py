"""What judging cost and found, counted once and reported three ways (summary, result, metrics).

A `Tally` belongs to one unit of work (an input shard, or the compare step); the task sums
them. When a `JudgeMetrics` is attached, every event also reaches Prometheus as it happens, so
a long shard shows its requests and errors live rather than when it finishes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

ERROR_KINDS = ("429", "5xx", "timeout", "connection", "other")


class Observer(Protocol):
    def request(self, outcome: str, seconds: float) -> None: ...
    def error(self, kind: str) -> None: ...
    def cache_hit(self) -> None: ...
    def verdicts(self, counts: Counter[str]) -> None: ...
    def pairs(self, n: int) -> None: ...
    def tokens(self, n: int) -> None: ...


@dataclass
class Tally:
    requests: int = 0          # HTTP requests sent (every attempt), or reward-model forward rows
    retries: int = 0
    cache_hits: int = 0
    tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    pairs: int = 0
    prompts: int = 0
    truncated: int = 0
    empty: int = 0             # empty (or whitespace-only) responses among those judged
    observer: Observer | None = field(default=None, repr=False, compare=False)

    def on_request(self, ok: bool, seconds: float, tokens: int = 0) -> None:
        self.requests += 1
        self.tokens += tokens
        if self.observer:
            self.observer.request("ok" if ok else "error", seconds)
            if tokens:
                self.observer.tokens(tokens)

    def on_error(self, kind: str, retried: bool) -> None:
        self.errors[kind] += 1
        self.retries += int(retried)
        if self.observer:
            self.observer.error(kind)

    def on_cache_hit(self, n: int = 1) -> None:
        self.cache_hits += n
        if self.observer:
            for _ in range(n):
                self.observer.cache_hit()

    def on_verdicts(self, counts: Counter[str]) -> None:
        self.verdicts.update(counts)
        if self.observer:
            self.observer.verdicts(counts)

    def on_pairs(self, n: int) -> None:
        self.pairs += n
        if self.observer:
            self.observer.pairs(n)

    def as_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "pairs": self.pairs, "requests": self.requests, "retries": self.retries,
                "cacheHits": self.cache_hits, "tokens": self.tokens, "truncated": self.truncated, "empty": self.empty,
                "errors": dict(self.errors), "verdicts": dict(self.verdicts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tally:
        return cls(requests=int(d.get("requests", 0)), retries=int(d.get("retries", 0)),
                   cache_hits=int(d.get("cacheHits", 0)), tokens=int(d.get("tokens", 0)),
                   errors=Counter(d.get("errors", {})), verdicts=Counter(d.get("verdicts", {})),
                   pairs=int(d.get("pairs", 0)), prompts=int(d.get("prompts", 0)),
                   truncated=int(d.get("truncated", 0)), empty=int(d.get("empty", 0)))

    def add(self, other: Tally) -> None:
        """Sum another tally in (no observer events: those happened when it was counted)."""
        self.requests += other.requests
        self.retries += other.retries
        self.cache_hits += other.cache_hits
        self.tokens += other.tokens
        self.errors.update(other.errors)
        self.verdicts.update(other.verdicts)
        self.pairs += other.pairs
        self.prompts += other.prompts
        self.truncated += other.truncated
        self.empty += other.empty
