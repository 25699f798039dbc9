"""kopf handlers of DPOPipelines, kept thin: every decision is pipeline_status.decide (pure).

Level-triggered like the DPOJob's: a change of a stage DPOJob (labelled with its pipeline), the
pipeline's create/resume, its suspend field and a periodic tick all run the same `sync_pipeline`,
which re-reads the pipeline and the DPOJobs it owns, creates the next stage's DPOJob when the
previous one Succeeded, propagates runPolicy.suspend to the running stage, and writes status
only when it changed. Deleting the pipeline deletes its stages through their ownerReferences
(the garbage collector), and with them their Jobs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from .api import SpecError
from .conditions import CREATED, changed, set_condition
from .handlers import _event, namespaced
from .ownership import foreign_message, owned_by
from .pipeline_admission import admit_pipeline
from .pipeline_api import DPOPipelineSpec, parse_pipeline_spec
from .pipeline_kube import PipelineKube
from .pipeline_plan import PlannedStage, plan_pipeline
from .pipeline_status import (
    FINISHED,
    LABEL_PIPELINE,
    Decision,
    decide,
    invalid_pipeline_status,
    owned_stage_jobs,
    stage_dpojob,
)
from .status import now_iso

log = logging.getLogger("kubedpo_operator.pipeline")


def _lock(memo: kopf.Memo, namespace: str, name: str) -> Any:
    return memo.locks[("DPOPipeline", namespace, name)]


def _planned(name: str, raw: Any) -> tuple[DPOPipelineSpec, list[PlannedStage]] | None:
    try:
        spec = parse_pipeline_spec(raw)
        return spec, plan_pipeline(name, spec)
    except SpecError:
        return None  # the create handler reports it


def sync_pipeline(memo: kopf.Memo, namespace: str, name: str) -> None:
    """Re-read the pipeline and its stage DPOJobs; create, propagate and report what decide() says."""
    kube = PipelineKube(memo.kube)
    with _lock(memo, namespace, name):
        pipeline = kube.get_pipeline(namespace, name)
        if pipeline is None or pipeline["metadata"].get("deletionTimestamp"):
            return
        status = pipeline.get("status") or {}
        if not status.get("phase") or status.get("phase") in FINISHED:
            return  # not admitted yet (the create handler writes the first status), or done
        planned = _planned(name, pipeline.get("spec"))
        if planned is None:
            return
        spec, stages = planned
        uid = pipeline["metadata"]["uid"]
        children = owned_stage_jobs(kube.list_dpojobs(namespace, f"{LABEL_PIPELINE}={name}"), name, uid)
        d = decide(name, spec, stages, children, status, now_iso(), pipeline["metadata"].get("generation"))
        if d.create is not None:
            d = _create_stage(kube, namespace, name, uid, d, status)
        if d.suspend_child is not None and d.status.get("currentJob"):
            kube.patch_dpojob(namespace, d.status["currentJob"], {"spec": {"runPolicy": {"suspend": d.suspend_child}}})
        if d.status and _differs(status, d.status):
            kube.patch_pipeline_status(namespace, name, d.status)
        for warning, reason, message in d.events:
            _event(pipeline, warning, reason, message)


def _create_stage(kube: PipelineKube, namespace: str, name: str, uid: str, d: Decision,
                  status: dict[str, Any]) -> Decision:
    """Create the stage's DPOJob; a foreign object holding its name blocks it (reported once)."""
    assert d.create is not None
    existing = kube.get_dpojob(namespace, d.create.job_name)
    if existing is None:
        kube.create_dpojob(stage_dpojob(name, namespace, uid, d.create))
        return d
    if owned_by(existing, uid):
        return d  # created by a racing sync: the next pass sees it
    message = foreign_message("DPOJob", existing, uid).replace("this DPOJob", "this DPOPipeline")
    conditions = set_condition(d.status.get("conditions"), CREATED, False, "ForeignChildExists", message,
                               now_iso(), d.status.get("observedGeneration"))
    events = [(True, "ForeignChildExists", message)] if changed(status.get("conditions"), conditions) else []
    return Decision(None, {**d.status, "message": message, "conditions": conditions}, events)


def _differs(status: dict[str, Any], patch: dict[str, Any]) -> bool:
    """Whether the patch changes anything (timestamps follow the fields they belong to)."""
    for key, value in patch.items():
        if key == "conditions":
            if changed(status.get(key), value):
                return True
        elif key not in ("startTime", "completionTime") and status.get(key) != value:
            return True
    return False


def pipeline_reconcile(*, body: kopf.Body, name: str, namespace: str | None, meta: kopf.Meta, memo: kopf.Memo,
                       **_: Any) -> None:
    """on.create and on.resume: admit the spec (every stage checked as a DPOJob), first status, sync."""
    namespace = namespaced(namespace)
    try:
        admit_pipeline(name, body.get("spec"), memo.settings)
    except SpecError as err:
        if (body.get("status") or {}).get("phase") not in FINISHED:
            PipelineKube(memo.kube).patch_pipeline_status(
                namespace, name, invalid_pipeline_status(err.field, err.message, meta.get("generation"), now_iso()))
            _event(dict(body), True, "InvalidSpec", str(err))
        raise kopf.PermanentError(str(err)) from None
    with _lock(memo, namespace, name):
        fresh = PipelineKube(memo.kube).get_pipeline(namespace, name)
        if fresh is None:
            return
        if not (fresh.get("status") or {}).get("phase"):
            now = now_iso()
            PipelineKube(memo.kube).patch_pipeline_status(namespace, name, {
                "phase": "Pending", "startTime": now, "message": "admitted; creating the first stage",
                "observedGeneration": meta.get("generation")})
    sync_pipeline(memo, namespace, name)


def on_stage_event(*, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A stage DPOJob changed (phase, progress, result): sync its pipeline now, not at the next tick."""
    meta = body.get("metadata") or {}
    pipeline = (meta.get("labels") or {}).get(LABEL_PIPELINE)
    if pipeline and meta.get("namespace"):
        sync_pipeline(memo, meta["namespace"], pipeline)


def on_pipeline_suspend(*, name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    sync_pipeline(memo, namespaced(namespace), name)


async def on_pipeline_tick(*, body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo,
                           **_: Any) -> None:
    if (body.get("status") or {}).get("phase") in FINISHED:
        return
    await asyncio.to_thread(sync_pipeline, memo, namespaced(namespace), name)


def register(r: kopf.OperatorRegistry, group: str, version: str, plural: str, dpojobs: str, interval: float,
             backoff: float) -> None:
    """The pipeline's handlers in the operator's registry (handlers.build_registry calls this)."""
    kopf.on.create(group, version, plural, registry=r, id="pipeline", backoff=backoff)(pipeline_reconcile)
    kopf.on.resume(group, version, plural, registry=r, id="pipeline-adopt", backoff=backoff)(pipeline_reconcile)
    kopf.on.field(group, version, plural, field="spec.runPolicy.suspend", registry=r, id="pipeline-suspend",
                  backoff=backoff)(on_pipeline_suspend)
    kopf.timer(group, version, plural, interval=interval, registry=r, id="pipeline-tick",
               backoff=backoff)(on_pipeline_tick)
    kopf.on.event(group, version, dpojobs, labels={LABEL_PIPELINE: kopf.PRESENT}, registry=r,
                  id="stage")(on_stage_event)
