"""kopf handlers, kept thin: every decision is a pure function in children.py / status.py.

Level-triggered on purpose: the Job watch reacts fast, and a per-DPOJob timer re-reads the
DPOJob and its current Job from the API and applies the same `sync`, so a missed watch event,
an API error or an operator restart mid-restart still converge. All writes are idempotent:
children are read before they are created, status fields are absolute values (attempt N+1,
restarts R+1), and one lock per DPOJob keeps this operator's two paths from interleaving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException

from .admission import admit, plan_attempt
from .api import FINISHED_PHASES, GROUP, PLURAL, VERSION, DPOJobSpec, SpecError, parse_spec
from .api_errors import Refused
from .children import LABEL_ATTEMPT, LABEL_JOB, MANAGED_BY, config_map_name, job_name
from .conditions import CREATED, changed, set_condition
from .failures import ChildRequestError, record_failure, record_success, retry_due
from .gang import JOB_NAME_LABEL, gang_problem
from .kube import Kube
from .metrics import OperatorMetrics
from .ownership import ForeignChild, owned_by, owned_jobs, selector
from .planning import memory_condition
from .scrape import read_progress
from .settings import OperatorSettings
from .status import (
    JobState,
    Transition,
    created_patch,
    desired_suspend,
    initial_status,
    invalid_status,
    job_state,
    next_transition,
    now_iso,
    observed_patch,
    rediscovered_status,
    remaining_deadline,
    status_patch,
    ttl_expired,
)
from .task_result import result_patch

log = logging.getLogger("kubedpo_operator")


def namespaced(namespace: str | None) -> str:
    """DPOJobs are namespaced: kopf passes None only for cluster-scoped objects."""
    if namespace is None:
        raise kopf.PermanentError("a DPOJob without a namespace (the CRD is namespaced)")
    return namespace


def make_memo(kube: Kube, settings: OperatorSettings, metrics: OperatorMetrics | None = None) -> kopf.Memo:
    """Everything handlers share, passed to kopf.operator(memo=...) (no module globals)."""
    return kopf.Memo(kube=kube, settings=settings, metrics=metrics or OperatorMetrics(),
                     locks=defaultdict(threading.Lock))


def _event(obj: dict[str, Any], warning: bool, reason: str, message: str) -> None:
    body = kopf.Body(cast(kopf.RawBody, obj))  # a DPOJob as read from the API (or kopf's body as a dict)
    kopf.event(body, type="Warning" if warning else "Normal", reason=reason, message=message[:1000])


def ensure_attempt(memo: kopf.Memo, namespace: str, name: str, uid: str, spec: DPOJobSpec,
                   attempt: int, start_time: str | None) -> int:
    """Create whichever of the attempt's children are missing; returns how many were created.

    Every child is checked before any is sent (SpecError); a failed API call raises
    ChildRequestError naming the child, for `failures.record_failure` to classify. Raises
    ForeignChild when a child's name is taken by an object this DPOJob does not own.
    """
    deadline = remaining_deadline(spec.run_policy, start_time, datetime.now(UTC))
    created = 0
    for obj in plan_attempt(name, namespace, uid, spec, attempt, memo.settings, deadline):
        child = f"{obj['kind']} {obj['metadata']['name']}"
        try:
            existing = memo.kube.get(obj["kind"], namespace, obj["metadata"]["name"])
            if existing is None:
                created += memo.kube.create(obj)
        except Exception as err:
            raise ChildRequestError(f"create {child}", err) from err
        if existing is not None and not owned_by(existing, uid):
            raise ForeignChild(obj["kind"], existing, uid)
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
    except ForeignChild as err:
        _note_foreign(memo, dpo, err)
        return False
    record_success(memo, namespace, name)
    _record_job(memo, namespace, name, attempt)
    return True


def delete_attempt(memo: kopf.Memo, namespace: str, name: str, attempt: int) -> None:
    """The Job goes last: while it exists, `sync` sees the attempt and retries the whole delete."""
    memo.kube.delete("Service", namespace, job_name(name, attempt))
    memo.kube.delete("ConfigMap", namespace, config_map_name(name, attempt))
    if memo.settings.network_policy:
        memo.kube.delete("NetworkPolicy", namespace, job_name(name, attempt))
    memo.kube.delete("Job", namespace, job_name(name, attempt))


def _try_delete(memo: kopf.Memo, namespace: str, name: str, attempt: int) -> bool:
    """delete_attempt, reporting an API error instead of raising it (the next sync retries)."""
    try:
        delete_attempt(memo, namespace, name, attempt)
        return True
    except ApiException as err:
        log.warning("deleting attempt %d of %s/%s failed (%s %s); retrying on the next sync",
                    attempt, namespace, name, err.status, err.reason)
        return False


def _why_pending(memo: kopf.Memo, namespace: str, job: Mapping[str, Any]) -> JobState | None:
    """The pods' and the Job's own account of why the gang is not running (gang.py)."""
    name = job["metadata"]["name"]
    pods = [p for p in memo.kube.list_pods(namespace, f"{JOB_NAME_LABEL}={name}")
            if ((p.get("metadata") or {}).get("labels") or {}).get(JOB_NAME_LABEL) == name]
    problem = gang_problem(pods, memo.kube.list_events(namespace, "Job", name))
    return JobState("pending", *problem) if problem else None


def _record_job(memo: kopf.Memo, namespace: str, name: str, attempt: int) -> None:
    """status.currentJob and Created=True, once the attempt's Job exists: from then on, its absence
    is a failure. On a fresh read, so conditions written since the caller's read are kept."""
    dpo = memo.kube.get_dpojob(namespace, name)
    if dpo is None:
        return
    patch = created_patch(dpo.get("status") or {}, name, attempt, now_iso(), dpo["metadata"].get("generation"))
    if patch:
        memo.kube.patch_dpojob_status(namespace, name, patch)


def _note_foreign(memo: kopf.Memo, dpo: dict[str, Any], err: ForeignChild) -> None:
    """Condition Created=False (written once, not per retry) and a Warning event."""
    status = dpo.get("status") or {}
    after = set_condition(status.get("conditions"), CREATED, False, "ForeignChildExists", err.message, now_iso(),
                          dpo["metadata"].get("generation"))
    if changed(status.get("conditions"), after):
        memo.kube.patch_dpojob_status(dpo["metadata"]["namespace"], dpo["metadata"]["name"], {"conditions": after})
        _event(dpo, True, "ForeignChildExists", err.message)


def sync(memo: kopf.Memo, namespace: str, name: str, job_attempt: int | None = None,
         job_deleted: bool = False) -> None:
    """Re-read the DPOJob and its Jobs; apply the transition the current Job's state asks for.

    Every pass also deletes older attempts' children still present (a failed DELETE is retried
    until they are gone) and converges the Job's spec.suspend to runPolicy.suspend.
    """
    with memo.locks[(namespace, name)]:
        dpo = memo.kube.get_dpojob(namespace, name)
        if dpo is None or dpo["metadata"].get("deletionTimestamp"):
            memo.metrics.observe_phase(namespace, name, None)
            return
        status = dpo.get("status") or {}
        attempt = int(status.get("attempt") or 0)
        if job_attempt is not None and job_attempt < attempt:
            if not job_deleted:
                delete_attempt(memo, namespace, name, job_attempt)  # leftover of a restart cut short
            return
        if not status.get("phase") or status.get("phase") in FINISHED_PHASES:
            return
        try:
            spec = parse_spec(dpo.get("spec"))
        except SpecError:
            return  # the create handler reports it
        uid = dpo["metadata"]["uid"]
        jobs = owned_jobs(memo.kube.list_jobs(namespace, selector(name)), name, uid)
        if not all([_try_delete(memo, namespace, name, a) for a in sorted(jobs) if a < attempt]):
            return  # an old gang may still write checkpoints: the next one waits until it is gone
        job = jobs.get(attempt)
        if job is not None and job["metadata"].get("deletionTimestamp"):
            job = None
        if job is None and status.get("currentJob") != job_name(name, attempt):
            # not created yet (e.g. the operator stopped between a restart's delete and create)
            ensure_or_record(memo, dpo, spec, attempt)
            return
        if job is None:  # deleted by someone else: that attempt failed, and it counts
            state = JobState("failed", "JobDeleted", f"the Job of attempt {attempt} was deleted outside kubedpo")
        else:
            state = job_state(job)
            if state.kind == "pending" and not spec.run_policy.suspend:
                state = _why_pending(memo, namespace, job) or state
            want = desired_suspend(spec.run_policy)
            if want is not None and state.kind not in ("succeeded", "failed") and \
                    bool((job.get("spec") or {}).get("suspend")) != want:
                memo.kube.patch_job(namespace, job_name(name, attempt), {"spec": {"suspend": want}})
        t = next_transition(status, state, spec.run_policy, spec.workers)
        generation = dpo["metadata"].get("generation")
        if t is None:
            observed = observed_patch(status, generation)
            if observed:  # a spec edit that changed nothing: say the conditions hold for it
                memo.kube.patch_dpojob_status(namespace, name, observed)
            return
        patch = status_patch(status, t, now_iso(), spec.output.uri, generation=generation)
        if t.phase == "Succeeded":  # rank 0's result, from its termination message (task_result.py)
            pods = memo.kube.list_pods(namespace, f"{JOB_NAME_LABEL}={job_name(name, attempt)}")
            patch.update(result_patch(pods, job_name(name, attempt), JOB_NAME_LABEL, patch["conditions"], now_iso(),
                                      generation))
        memo.kube.patch_dpojob_status(namespace, name, patch)
        _event(dpo, t.warning, t.reason, t.message)
        memo.metrics.observe_phase(namespace, name, t.phase)
        memo.metrics.transitions.labels(phase=t.phase).inc()
        if t.restart:
            memo.metrics.restarts.labels(reason=t.reason).inc()
            if not _try_delete(memo, namespace, name, attempt):
                return  # the tick retries the delete, then creates the next attempt
            ensure_or_record(memo, memo.kube.get_dpojob(namespace, name) or dpo, spec, attempt + 1)


def reconcile(*, body: kopf.Body, name: str, namespace: str | None, uid: str, meta: kopf.Meta,
              memo: kopf.Memo, **_: Any) -> None:
    """on.create and on.resume: validate, write the initial status, ensure the children.

    The status is re-read from the API under the lock: kopf's body may predate a restart the
    Job watch already performed, and acting on it would recreate the previous attempt.
    """
    namespace = namespaced(namespace)
    with memo.metrics.timed("reconcile"):
        try:
            spec = admit(name, body.get("spec"), memo.settings)
        except SpecError as err:
            status = dict(body.get("status") or {})
            if status.get("phase") not in FINISHED_PHASES:
                memo.kube.patch_dpojob_status(namespace, name, invalid_status(
                    err.field, err.message, meta.get("generation"), now_iso()))
                _event(dict(body), True, "InvalidSpec", str(err))
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
                status, reason = _first_status(memo, namespace, name, uid, meta.get("generation"), spec.workers)
                plan = memory_condition(spec, status["startTime"], memo.settings.memory_plan_timeout_s,
                                        meta.get("generation"))
                if plan is not None:
                    status["conditions"].append(plan)
                memo.kube.patch_dpojob_status(namespace, name, status)
                _event(dict(body), False, reason, status["message"])
                if plan is not None and plan["status"] == "False":
                    _event(dict(body), True, "MemoryPlan", plan["message"])
            memo.metrics.observe_phase(namespace, name, status["phase"])
            try:
                ensure_attempt(memo, namespace, name, uid, spec, int(status.get("attempt") or 0),
                               status.get("startTime"))
            except (SpecError, ChildRequestError) as err:
                outcome = record_failure(memo, memo.kube.get_dpojob(namespace, name) or fresh, err)
                if isinstance(outcome, Refused):
                    raise kopf.PermanentError(f"{outcome.field}: {outcome.message}") from None
                raise kopf.TemporaryError(outcome.reason, delay=outcome.delay) from None
            except ForeignChild as err:
                _note_foreign(memo, {**fresh, "status": status}, err)
                raise kopf.TemporaryError(err.message, delay=memo.settings.handler_backoff_s) from None
            record_success(memo, namespace, name)
            _record_job(memo, namespace, name, int(status.get("attempt") or 0))


def _first_status(memo: kopf.Memo, namespace: str, name: str, uid: str, generation: int | None,
                  workers: int) -> tuple[dict[str, Any], str]:
    """A new DPOJob's status, or, when its Jobs exist (status lost), the live attempt's; and the
    reason of the event that announces it."""
    jobs = owned_jobs(memo.kube.list_jobs(namespace, selector(name)), name, uid)
    if not jobs:
        return initial_status(generation, now_iso(), workers), "Created"
    first = jobs[min(jobs)]["metadata"].get("creationTimestamp")
    return rediscovered_status(name, generation, now_iso(), max(jobs), first), "StatusRediscovered"


def on_suspend(*, body: kopf.Body, old: Any, new: Any, name: str, namespace: str | None, meta: kopf.Meta,
               memo: kopf.Memo, **_: Any) -> None:
    """runPolicy.suspend ↔ the Job's spec.suspend (with Kueue, resuming is Kueue's admission).

    Acts on a fresh read under the lock: kopf's body may predate a gang restart (its attempt's
    Job already gone) or a transition the sync already made (never written back over). The
    level-triggered sync converges the Job too; this handler only makes it immediate.
    """
    namespace = namespaced(namespace)
    if bool(old) == bool(new):
        return
    with memo.locks[(namespace, name)]:
        fresh = memo.kube.get_dpojob(namespace, name)
        status = dict((fresh or {}).get("status") or {})
        if fresh is None or not status.get("phase") or status.get("phase") in FINISHED_PHASES:
            return
        try:
            spec = parse_spec(dict(fresh.get("spec") or {}))
        except SpecError:
            return
        suspend = bool(spec.run_policy.suspend)
        attempt = int(status.get("attempt") or 0)
        keep_suspended = suspend or bool(spec.run_policy.queue_name)
        memo.kube.patch_job(namespace, job_name(name, attempt), {"spec": {"suspend": keep_suspended}})
        generation = fresh["metadata"].get("generation")
        patch = observed_patch(status, generation)  # already reported by sync: conditions hold for it
        if suspend != (status.get("phase") == "Suspended"):  # not already reported by sync
            phase, reason = ("Suspended", "Suspended") if suspend else ("Pending", "Resumed")
            message = "runPolicy.suspend set: pods stopped" if suspend else "runPolicy.suspend cleared: resuming"
            patch = status_patch(status, Transition(phase, reason, message), now_iso(), generation=generation)
            _event(fresh, False, reason, message)
            memo.metrics.observe_phase(namespace, name, phase)
        if patch:
            memo.kube.patch_dpojob_status(namespace, name, patch)


def on_job_event(*, type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Any change of one of our Jobs: sync its DPOJob. A deletion of the current attempt's Job
    that kubedpo did not make (its restarts move to the next attempt first) fails that attempt."""
    labels = body.get("metadata", {}).get("labels") or {}
    if LABEL_JOB not in labels or LABEL_ATTEMPT not in labels:
        return
    with memo.metrics.timed("job_event"):
        sync(memo, body["metadata"]["namespace"], labels[LABEL_JOB], int(labels[LABEL_ATTEMPT]),
             job_deleted=type == "DELETED")


async def on_tick(*, body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Periodic: TTL deletion, a level-triggered resync, and status.progress from rank 0."""
    namespace = namespaced(namespace)
    status = dict(body.get("status") or {})
    spec_raw = dict(body.get("spec") or {})
    try:
        spec = parse_spec(spec_raw)
    except SpecError:
        return
    if status.get("phase") in FINISHED_PHASES:
        with memo.metrics.timed("ttl"):  # also shows that finished jobs' timers run (and cost nothing)
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
    memo.metrics.observe_phase(namespaced(namespace), name, None)


def configure(*, settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress and diff-base in annotations, so status holds only what the CRD schema declares.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubedpo.io")
    # spec.env is left out of the diff-base: a literal value may be a secret, and the annotation
    # (and kopf's debug log of its patch) would copy it; no handler reacts to env changes.
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubedpo.io", key="last-handled-configuration", ignored_fields=["spec.env"])
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
    from .rescale import on_workers  # imports this module's helpers: registered here, not at import

    kopf.on.field(GROUP, VERSION, PLURAL, field="spec.workers", registry=r, id="workers", backoff=backoff)(on_workers)
    kopf.on.delete(GROUP, VERSION, PLURAL, registry=r, optional=True, id="forget")(on_delete)
    kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": MANAGED_BY},
                  registry=r, id="job")(on_job_event)
    kopf.timer(GROUP, VERSION, PLURAL, interval=settings.progress_interval_s, registry=r, id="tick",
               backoff=backoff)(on_tick)
    from .pipeline_api import PIPELINE_PLURAL
    from .pipeline_handlers import register  # builds on this module's helpers

    register(r, GROUP, VERSION, PIPELINE_PLURAL, PLURAL, settings.progress_interval_s, backoff)
    return r
