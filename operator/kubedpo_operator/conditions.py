"""metav1.Condition bookkeeping: pure functions on a status's `conditions` list.

Kubernetes API conventions: conditions are keyed by `type`; `lastTransitionTime` changes only
when `status` flips; `reason` is CamelCase and, like `message` and `observedGeneration`, is
refreshed on every update, so a condition that turns False says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# The current attempt's children exist and are this DPOJob's (False: a foreign object holds a name).
CREATED = "Created"
# Progress read from rank 0's /metrics: False (with why) when the endpoint is refused.
PROGRESS = "ProgressAvailable"


def find(conditions: Sequence[Mapping[str, Any]] | None, kind: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == kind), None)


def set_condition(conditions: Sequence[Mapping[str, Any]] | None, kind: str, status: bool, reason: str,
                  message: str, now: str, generation: int | None = None) -> list[dict[str, Any]]:
    """A copy of `conditions` with `kind` set (added at the end if new, kept in place otherwise)."""
    want = "True" if status else "False"
    out = [dict(c) for c in conditions or []]
    cond = next((c for c in out if c.get("type") == kind), None)
    if cond is None:
        cond = {"type": kind}
        out.append(cond)
    if cond.get("status") != want or not cond.get("lastTransitionTime"):
        cond["lastTransitionTime"] = now
    cond.update(status=want, reason=reason, message=message[:32768])
    if generation is not None:
        cond["observedGeneration"] = generation
    return out


def changed(before: Sequence[Mapping[str, Any]] | None, after: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a write is needed (only status, reason or message count; timestamps follow them)."""
    def key(cs: Sequence[Mapping[str, Any]] | None) -> list[tuple[Any, ...]]:
        return [(c.get("type"), c.get("status"), c.get("reason"), c.get("message")) for c in cs or []]
    return key(before) != key(after)
