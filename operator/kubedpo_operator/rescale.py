"""spec.workers changed on a live DPOJob: restart the gang at the new size.

The trainer resumes from the newest checkpoint with the new number of ranks: the data
position is one number (samples of the epoch consumed) in a rank-independent order, so the
data side continues exactly whenever the global batch (batchSize x gradientAccumulationSteps
x workers x gpusPerWorker) is unchanged; the trainer refuses anything else with exit 2 (a
ConfigError the user sees in the condition). The restart is the user's choice, not a
failure: it counts neither against runPolicy.maxRestarts nor as a preemption.
"""

from __future__ import annotations

from typing import Any

import kopf

from .api import SpecError, parse_spec
from .handlers import _event, _record_job, delete_attempt, ensure_attempt, namespaced
from .status import FINISHED_PHASES, Transition, now_iso, status_patch


def on_workers(*, body: kopf.Body, old: Any, new: Any, name: str, namespace: str | None, meta: kopf.Meta,
               memo: kopf.Memo, **_: Any) -> None:
    namespace = namespaced(namespace)
    if old is None or old == new:
        return
    try:
        spec = parse_spec(dict(body.get("spec") or {}))
    except SpecError:
        return  # the create handler reports it
    with memo.locks[(namespace, name)]:
        fresh = memo.kube.get_dpojob(namespace, name)
        status = dict((fresh or {}).get("status") or {})
        if fresh is None or not status.get("phase") or status["phase"] in FINISHED_PHASES:
            return
        attempt = int(status.get("attempt") or 0)
        t = Transition("Restarting", "WorkersChanged",
                       f"spec.workers {old} -> {new}: restarting the gang as attempt {attempt + 1}; it resumes "
                       "from the newest checkpoint (the global batch size must stay the same)")
        patch = {**status_patch(status, t, now_iso(), generation=meta.get("generation")), "attempt": attempt + 1,
                 "currentJob": None}
        memo.kube.patch_dpojob_status(namespace, name, patch)
        _event(dict(fresh), False, t.reason, t.message)
        memo.metrics.observe_phase(namespace, name, t.phase)
        delete_attempt(memo, namespace, name, attempt)
        ensure_attempt(memo, namespace, name, fresh["metadata"]["uid"], spec, attempt + 1, status.get("startTime"))
        _record_job(memo, namespace, name, attempt + 1)
