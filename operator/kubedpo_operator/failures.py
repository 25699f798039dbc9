"""What the handlers do when an attempt's children cannot be created: Failed, or Retrying.

The decision is `api_errors.classify` (pure); this module writes its result where a user looks:
status (phase Failed with a condition quoting the field and the API server's message, or a
`Retrying` condition saying why and when) and a Warning event. Writes are bounded: a refusal is
written once (the DPOJob is then finished), a retry only when its reason changes.
"""

from __future__ import annotations

import time
from typing import Any, cast

import kopf

from .api_errors import Refused, Retry, classify
from .conditions import set_condition
from .status import Transition, now_iso, status_patch

RETRYING = "Retrying"


class ChildRequestError(Exception):
    """An API call for one child failed; `what` names it (e.g. "create Job x-0")."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(f"{what}: {cause}")
        self.what, self.cause = what, cause


def _retries(memo: kopf.Memo) -> dict[tuple[str, str], tuple[int, float, str]]:
    return memo.setdefault("retries", {})  # (namespace, name) -> (count, not_before, reason)


def retry_due(memo: kopf.Memo, namespace: str, name: str) -> bool:
    """False while a previous failure's backoff (Retry-After included) has not elapsed."""
    entry = _retries(memo).get((namespace, name))
    return entry is None or time.monotonic() >= entry[1]


def record_failure(memo: kopf.Memo, dpo: dict[str, Any], err: BaseException) -> Refused | Retry:
    """Classify `err`, write status and a Warning event; the caller raises kopf's error if it wants."""
    meta = dpo["metadata"]
    key = (meta["namespace"], meta["name"])
    status = dict(dpo.get("status") or {})
    count, _, last_reason = _retries(memo).get(key, (0, 0.0, ""))
    what, cause = (err.what, err.cause) if isinstance(err, ChildRequestError) else ("spec", err)
    outcome = classify(cause, what, count, memo.settings.api_retry_base_s, memo.settings.api_retry_max_s)
    now = now_iso()
    if isinstance(outcome, Refused):
        _retries(memo).pop(key, None)
        text = f"{outcome.field}: {outcome.message}"
        reason = "InvalidSpec" if outcome.status is None and what == "spec" else "CreateRefused"
        patch = status_patch(status, Transition("Failed", reason, text, warning=True), now,
                             generation=meta.get("generation"))
        patch["conditions"] = [c for c in patch["conditions"] if c.get("type") != RETRYING]
        memo.kube.patch_dpojob_status(key[0], key[1], patch)
        kopf.event(kopf.Body(cast(kopf.RawBody, dpo)), type="Warning", reason=reason, message=text[:1000])
        memo.metrics.observe_phase(key[0], key[1], "Failed")
        return outcome
    _retries(memo)[key] = (count + 1, time.monotonic() + outcome.delay, outcome.reason)
    if outcome.reason != last_reason:
        message = f"retrying in {outcome.delay:.1f}s (try {count + 1}): {outcome.reason}"
        conditions = set_condition(status.get("conditions"), RETRYING, True, "ApiServerUnavailable",
                                   message[:1000], now, meta.get("generation"))
        memo.kube.patch_dpojob_status(key[0], key[1], {"conditions": conditions})
        if count == 0:
            kopf.event(kopf.Body(cast(kopf.RawBody, dpo)), type="Warning", reason="Retrying", message=message[:1000])
    return outcome


def record_success(memo: kopf.Memo, namespace: str, name: str) -> None:
    """After a retried creation went through: the Retrying condition turns False."""
    if _retries(memo).pop((namespace, name), None) is None:
        return
    dpo = memo.kube.get_dpojob(namespace, name)
    if dpo is None:
        return
    conditions = set_condition((dpo.get("status") or {}).get("conditions"), RETRYING, False, "Recovered",
                               "children created", now_iso(), dpo["metadata"].get("generation"))
    memo.kube.patch_dpojob_status(namespace, name, {"conditions": conditions})
