"""kopf handlers, kept thin: every decision is a pure function in children.py / status.py.

Level-triggered on purpose: the Job watch reacts fast, and a per-DPOJob timer re-reads the
DPOJob and its current Job from the API and applies the same `sync`, so a missed watch event,
an API error or an operator restart mid-restart still converge. All writes are idempotent:
children are read before they are created, status fields are absolute values (attempt N+1,
restarts R+1), and one lock per DPOJob keeps this operator's two paths from interleaving.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any, cast

import kopf

from .admission import admit, plan_attempt
from .api import FINISHED_PHASES, GROUP, PLURAL, VERSION, DPOJobSpec, SpecError, parse_spec
from .api_errors import Refused
from .children import LABEL_ATTEMPT, LABEL_JOB, MANAGED_BY, config_map_name, job_name
from .failures import ChildRequestError, record_failure, record_success, retry_due
from .kube import Kube
from .metrics import OperatorMetrics
from .scrape import read_progress
from .settings import OperatorSettings
from .status import (
    Transition,
    initial_status,
    invalid_status,
    job_state,
    next_transition,
    now_iso,
    remaining_deadline,
    status_patch,
    ttl_expired,
)


def _namespaced(namespace: str | None) -> str:
    """DPOJobs are namespaced: kopf passes None only for cluster-scoped objects."""
    if namespace is None:
        raise kopf.PermanentError("a DPOJob without a namespace (the CRD is namespaced)")
    return namespace


def make_memo(kube: Kube, settings: OperatorSettings, metrics: OperatorMetrics | None = None) -> kopf.Memo:
    """Everything handlers share, passed to kopf.operator(memo=...) (no module globals)."""
    return kopf.Memo(kube=kube, settings=settings, metrics=metrics or OperatorMetrics(),
                     locks=defaultdict(threading.Lock))


def _event(obj: kopf.Body, warning: bool, reason: str, message: str) -> None:
    kopf.event(obj, type="Warning" if warning else "Normal", reason=reason, message=message[:1000])


def ensure_attempt(memo: kopf.Memo, namespace: str, name: str, uid: str, spec: DPOJobSpec,
                   attempt: int, start_time: str | None) -> int:
    """Create whichever of the attempt's children are missing; returns how many were created.

    Every child is checked before any is sent (SpecError); a failed API call raises
    ChildRequestError naming the child, for `failures.record_failure` to classify.
    """
    deadline = remaining_deadline(spec.run_policy, start_time, datetime.now(UTC))
    created = 0
    for obj in plan_attempt(name, namespace, uid, spec, attempt, memo.settings, deadline):
        child = f"{obj['kind']} {obj['metadata']['name']}"
        try:
            if memo.kube.get(obj["kind"], namespace, obj["metadata"]["name"]) is None:
                created += memo.kube.create(obj)
        except Exception as err:
            raise ChildRequestError(f"create {child}", err) from err
    return created


def ensure_or_record(memo: kopf.Memo, dpo: dict[str, Any], spec: DPOJobSpec, attempt: int) -> bool:
    """ensure_attempt from the level-triggered paths: failures become status, never a retry storm."""
    namespace, name = dpo["metadata"]["namespace"], dpo["metadata"]["name"]
    if not retry_due(memo, namespace, name):
        return False
    try:
        ensure_attempt(memo, namespace, name, dpo["metadata"]["uid"], spec, attempt,
                       (dpo.get("status") or {}).get("startTime"))
    except (SpecError, ChildRequestError) as err:
        record_failure(memo, dpo, err)
        return False
    record_success(memo, namespace, name)
    return True


def delete_attempt(memo: kopf.Memo, namespace: str, name: str, attempt: int) -> None:
    memo.kube.delete("Job", namespace, job_name(name, attempt))
    memo.kube.delete("Service", namespace, job_name(name, attempt))
    memo.kube.delete("ConfigMap", namespace, config_map_name(name, attempt))


def sync(memo: kopf.Memo, namespace: str, name: str, job_attempt: int | None = None) -> None:
    """Re-read the DPOJob and its current Job; apply the transition the Job's state asks for."""
    with memo.locks[(namespace, name)]:
        dpo = memo.kube.get_dpojob(namespace, name)
        if dpo is None:
            memo.metrics.observe_phase(namespace, name, None)
            return
        status = dpo.get("status") or {}
        attempt = int(status.get("attempt") or 0)
        if job_attempt is not None and job_attempt < attempt:
            delete_attempt(memo, namespace, name, job_attempt)  # leftover of a restart cut short
            return
        if not status.get("phase") or status.get("phase") in FINISHED_PHASES:
            return
        try:
            spec = parse_spec(dpo.get("spec"))
        except SpecError:
            return  # the create handler reports it
        job = memo.kube.get("Job", namespace, job_name(name, attempt))
        if job is None:  # lost (e.g. operator stopped between delete and create): recreate
            ensure_or_record(memo, dpo, spec, attempt)
            return
        t = next_transition(status, job_state(job), spec.run_policy, spec.workers)
        if t is None:
            return
        memo.kube.patch_dpojob_status(namespace, name, status_patch(status, t, now_iso(), spec.output.uri))
        _event(kopf.Body(cast(kopf.RawBody, dpo)), t.warning, t.reason, t.message)  # as read from the API
        memo.metrics.observe_phase(namespace, name, t.phase)
        memo.metrics.transitions.labels(phase=t.phase).inc()
        if t.restart:
            memo.metrics.restarts.labels(reason=t.reason).inc()
            delete_attempt(memo, namespace, name, attempt)
            ensure_or_record(memo, memo.kube.get_dpojob(namespace, name) or dpo, spec, attempt + 1)


def reconcile(*, body: kopf.Body, name: str, namespace: str | None, uid: str, meta: kopf.Meta, memo: kopf.Memo,
              **_: Any) -> None:
    """on.create and on.resume: validate, write the initial status, ensure the children.

    The status is re-read from the API under the lock: kopf's body may predate a restart the
    Job watch already performed, and acting on it would recreate the previous attempt.
    """
    namespace = _namespaced(namespace)
    with memo.metrics.timed("reconcile"):
        try:
            spec = admit(name, body.get("spec"), memo.settings)
        except SpecError as err:
            status = dict(body.get("status") or {})
            if status.get("phase") not in FINISHED_PHASES:
                memo.kube.patch_dpojob_status(namespace, name, invalid_status(
                    err.field, err.message, meta.get("generation"), now_iso()))
                _event(body, True, "InvalidSpec", str(err))
            memo.metrics.observe_phase(namespace, name, "Failed")
            raise kopf.PermanentError(str(err)) from None
        with memo.locks[(namespace, name)]:
            fresh = memo.kube.get_dpojob(namespace, name)
            if fresh is None:
                return
            status = fresh.get("status") or {}
            if status.get("phase") in FINISHED_PHASES:
                memo.metrics.observe_phase(namespace, name, status["phase"])
                return
            if not status.get("phase"):
                status = initial_status(meta.get("generation"), now_iso(), spec.workers)
                memo.kube.patch_dpojob_status(namespace, name, status)
                _event(body, False, "Created", status["message"])
            memo.metrics.observe_phase(namespace, name, status["phase"])
            try:
                ensure_attempt(memo, namespace, name, uid, spec, int(status.get("attempt") or 0),
                               status.get("startTime"))
            except (SpecError, ChildRequestError) as err:
                outcome = record_failure(memo, memo.kube.get_dpojob(namespace, name) or fresh, err)
                if isinstance(outcome, Refused):
                    raise kopf.PermanentError(f"{outcome.field}: {outcome.message}") from None
                raise kopf.TemporaryError(outcome.reason, delay=outcome.delay) from None
            record_success(memo, namespace, name)


def on_suspend(*, body: kopf.Body, old: Any, new: Any, name: str, namespace: str | None, meta: kopf.Meta,
               memo: kopf.Memo, **_: Any) -> None:
    """runPolicy.suspend ↔ the Job's spec.suspend (with Kueue, resuming is Kueue's admission)."""
    namespace = _namespaced(namespace)
    status = dict(body.get("status") or {})
    if bool(old) == bool(new) or not status.get("phase") or status.get("phase") in FINISHED_PHASES:
        return
    try:
        spec = parse_spec(dict(body.get("spec") or {}))
    except SpecError:
        return
    with memo.locks[(namespace, name)]:
        attempt = int(status.get("attempt") or 0)
        keep_suspended = bool(new) or bool(spec.run_policy.queue_name)
        memo.kube.patch_job(namespace, job_name(name, attempt), {"spec": {"suspend": keep_suspended}})
        phase, reason = ("Suspended", "Suspended") if new else ("Pending", "Resumed")
        message = "runPolicy.suspend set: pods stopped" if new else "runPolicy.suspend cleared: resuming"
        patch = status_patch(status, Transition(phase, reason, message), now_iso())
        patch["observedGeneration"] = meta.get("generation")
        memo.kube.patch_dpojob_status(namespace, name, patch)
        _event(body, False, reason, message)
        memo.metrics.observe_phase(namespace, name, phase)


def on_job_event(*, type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Any change of one of our Jobs: sync its DPOJob (deletions are our own restarts)."""
    if type == "DELETED":
        return
    labels = body.get("metadata", {}).get("labels") or {}
    if LABEL_JOB not in labels or LABEL_ATTEMPT not in labels:
        return
    with memo.metrics.timed("job_event"):
        sync(memo, body["metadata"]["namespace"], labels[LABEL_JOB], int(labels[LABEL_ATTEMPT]))


async def on_tick(*, body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Periodic: TTL deletion, a level-triggered resync, and status.progress from rank 0."""
    namespace = _namespaced(namespace)
    status = dict(body.get("status") or {})
    spec_raw = dict(body.get("spec") or {})
    try:
        spec = parse_spec(spec_raw)
    except SpecError:
        return
    if status.get("phase") in FINISHED_PHASES:
        if ttl_expired(status, spec.run_policy, datetime.now(UTC)):
            await asyncio.to_thread(memo.kube.delete_dpojob, namespace, name)
            memo.metrics.observe_phase(namespace, name, None)
        return
    if not status.get("phase"):
        return
    with memo.metrics.timed("tick"):
        await asyncio.to_thread(sync, memo, namespace, name)
    if status.get("phase") == "Running" and spec.metrics.port:
        await read_progress(memo, name, namespace, int(status.get("attempt") or 0), spec.metrics.port,
                            spec.checkpoint.uri)


def on_delete(*, name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    memo.metrics.observe_phase(_namespaced(namespace), name, None)


def configure(*, settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress and diff-base in annotations, so status holds only what the CRD schema declares.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubedpo.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubedpo.io", key="last-handled-configuration")
    # Events are only our kopf.event calls, one per transition: kopf's per-object log lines are
    # not posted (posting.loggers is False by default), which bench/operator_scale.py counts.
    settings.posting.loggers = False
    settings.execution.max_workers = 16
    # The tick may itself be deleting the DPOJob (TTL): let it finish instead of polling in 60 s.
    settings.background.instant_exit_timeout = 5.0
    settings.background.cancellation_polling = 5


def build_registry(settings: OperatorSettings, login: bool = True) -> kopf.OperatorRegistry:
    """A fresh registry (tests run several operators in one process)."""
    r = kopf.OperatorRegistry()
    kopf.on.startup(registry=r)(configure)
    if login:
        kopf.on.login(registry=r)(kopf.login_via_client)
    backoff = settings.handler_backoff_s
    kopf.on.create(GROUP, VERSION, PLURAL, registry=r, id="reconcile", backoff=backoff)(reconcile)
    kopf.on.resume(GROUP, VERSION, PLURAL, registry=r, id="adopt", backoff=backoff)(reconcile)
    kopf.on.field(GROUP, VERSION, PLURAL, field="spec.runPolicy.suspend", registry=r, id="suspend",
                  backoff=backoff)(on_suspend)
    kopf.on.delete(GROUP, VERSION, PLURAL, registry=r, optional=True, id="forget")(on_delete)
    kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": MANAGED_BY},
                  registry=r, id="job")(on_job_event)
    kopf.timer(GROUP, VERSION, PLURAL, interval=settings.progress_interval_s, registry=r, id="tick")(on_tick)
    return r
