"""metav1.Condition bookkeeping: pure functions on a status's `conditions` list.

Shared by every kubedpo controller (DPOJob's status.py, the DPOPipeline controller), so that all
of them follow the Kubernetes API conventions the same way:

- keyed by `type`: a list never holds two of one type (a duplicate a hand edit or an older
  release left is dropped, the last one kept), and the CRD declares the list a map keyed by type;
- `lastTransitionTime` (RFC 3339, `now` as the caller formats it) changes only when `status` flips;
- `reason` is CamelCase and never empty (`camel_reason` turns any text into one); `message` is
  at most 32768 characters;
- `observedGeneration` is the metadata.generation the condition was computed from, written on
  every update (pass the object's generation), so a reader can tell a stale condition.

The functions:
- `set_condition(conds, type, status, reason, message, now, generation)`: one condition;
- `set_states(conds, types, true_type, reason, message, now, generation)`: a group of
  state-style conditions of which at most one is True (e.g. Running/Suspended/Succeeded/Failed
  from a phase); all of them carry the reason and message of the current state, so the False
  ones say why they are False instead of keeping the reason they had when last True;
- `find`, `is_true`: reading; `changed`: whether a write is needed.
All return new lists and never modify their input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

# The current attempt's children exist and are this DPOJob's (False: not yet, being replaced,
# refused, or a foreign object holds a name).
CREATED = "Created"
# Progress read from rank 0's /metrics: False (with why) when the endpoint is refused.
PROGRESS = "ProgressAvailable"

# metav1.Condition's validation (k8s.io/apimachinery/pkg/apis/meta/v1/types.go).
TYPE_PATTERN = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$")
TYPE_MAX = 316
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
REASON_MAX = 1024
MESSAGE_MAX = 32768
_REASON_RE = re.compile(REASON_PATTERN)
_WORD_RE = re.compile(r"[A-Za-z0-9]+")

Conditions = Sequence[Mapping[str, Any]] | None


def camel_reason(text: str) -> str:
    """`text` as a valid condition reason: kept if it is one, else its words in CamelCase.

    Reasons may come from outside (a pod's waiting reason, the scheduler's); one the API server
    would refuse must not make the whole status write fail.
    """
    kept = text[:REASON_MAX].rstrip(",:")
    if kept and _REASON_RE.match(kept):
        return kept
    words = _WORD_RE.findall(text)
    out = "".join(w[:1].upper() + w[1:] for w in words)
    if out and not out[0].isalpha():
        out = "Reason" + out
    out = out[:REASON_MAX].rstrip(",:")
    return out if out and _REASON_RE.match(out) else "Unknown"


def _status(value: bool | str) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if value not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, not {value!r}")
    return value


def _unique(conditions: Conditions) -> list[dict[str, Any]]:
    """Copies, keyed by type: the last of duplicates wins, in the place of the first."""
    out: dict[str, dict[str, Any]] = {}
    for c in conditions or []:
        out[str(c.get("type"))] = dict(c)
    return list(out.values())


def _update(cond: dict[str, Any], status: str, reason: str, message: str, now: str,
            generation: int | None) -> None:
    if cond.get("status") != status or not cond.get("lastTransitionTime"):
        cond["lastTransitionTime"] = now
    cond.update(status=status, reason=camel_reason(reason), message=message[:MESSAGE_MAX])
    if generation is not None:
        cond["observedGeneration"] = generation


def find(conditions: Conditions, kind: str) -> Mapping[str, Any] | None:
    return next((c for c in reversed(list(conditions or [])) if c.get("type") == kind), None)


def is_true(conditions: Conditions, kind: str) -> bool:
    c = find(conditions, kind)
    return c is not None and c.get("status") == "True"


def set_condition(conditions: Conditions, kind: str, status: bool | str, reason: str, message: str, now: str,
                  generation: int | None = None) -> list[dict[str, Any]]:
    """A copy of `conditions` with `kind` set (added at the end if new, kept in place otherwise)."""
    out = _unique(conditions)
    cond = next((c for c in out if c.get("type") == kind), None)
    if cond is None:
        cond = {"type": kind}
        out.append(cond)
    _update(cond, _status(status), reason, message, now, generation)
    return out


def set_states(conditions: Conditions, types: Sequence[str], true_type: str | None, reason: str, message: str,
               now: str, generation: int | None = None) -> list[dict[str, Any]]:
    """Every type of `types` present: `true_type` True (None: all False), all with this reason/message."""
    out = _unique(conditions)
    for kind in types:
        out = set_condition(out, kind, kind == true_type, reason, message, now, generation)
    return out


def without(conditions: Conditions, kinds: Sequence[str]) -> list[dict[str, Any]]:
    """A copy without the conditions of `kinds` (e.g. types no longer maintained)."""
    return [c for c in _unique(conditions) if c.get("type") not in kinds]


def changed(before: Conditions, after: Conditions) -> bool:
    """Whether a write is needed: status, reason, message or observedGeneration moved (the
    transition time follows status), or a duplicate type is to be dropped."""
    def key(cs: Conditions) -> list[tuple[Any, ...]]:
        return [(c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
                for c in cs or []]
    return key(before) != key(after)
