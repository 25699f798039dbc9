"""A DPOPipeline's next step and status from its planned stages and the DPOJobs it owns. Pure.

Level-triggered: the decision is a function of (planned stages, the child DPOJobs that exist),
never of remembered history, so a missed event or an operator restart converges to the same
place. Stages run strictly one after the other; the current stage is the first whose DPOJob
has not Succeeded. Its DPOJob's phase is the pipeline's phase, so status never says Running
unless the current stage's job runs:

| current stage's DPOJob | pipeline |
|---|---|
| absent | Pending (created now) |
| Pending / Restarting / no phase yet | Pending |
| Running | Running |
| Suspended | Suspended |
| Failed | Failed (StageFailed, naming the stage and the job's reason); earlier rounds' results kept |
| every stage Succeeded | Succeeded, outputUri = the last round's policy |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .api import API_VERSION, KIND
from .children import MANAGED_BY
from .conditions import set_states
from .ownership import owned_by
from .pipeline_api import PIPELINE_KIND, DPOPipelineSpec
from .pipeline_plan import PlannedStage, policy, round_results, stage_progress
from .status import STATE_TYPES, phase_reason

FINISHED = ("Succeeded", "Failed")
LABEL_PIPELINE = "kubedpo.io/pipeline-name"
LABEL_STAGE = "kubedpo.io/stage"


@dataclass(frozen=True)
class Decision:
    """What the pipeline's sync must do: create a stage's DPOJob, patch status, post events."""

    create: PlannedStage | None
    status: dict[str, Any]
    events: list[tuple[bool, str, str]] = field(default_factory=list)  # (warning, reason, message)
    suspend_child: bool | None = None  # set the current child's runPolicy.suspend to this


def current_stage(stages: Sequence[PlannedStage], children: Mapping[str, Mapping[str, Any]]) -> PlannedStage | None:
    """The first stage whose DPOJob has not Succeeded (None: every stage has)."""
    return next((s for s in stages if _phase(children.get(s.job_name)) != "Succeeded"), None)


def _phase(child: Mapping[str, Any] | None) -> str | None:
    return ((child or {}).get("status") or {}).get("phase")


def _child_reason(child: Mapping[str, Any]) -> tuple[str, str]:
    st = child.get("status") or {}
    cond = next((c for c in st.get("conditions") or [] if c.get("type") == "Failed"
                 and c.get("status") == "True"), None)
    reason = (cond or {}).get("reason") or "Failed"
    return reason, (cond or {}).get("message") or st.get("message") or ""


def stage_results(stages: Sequence[PlannedStage], children: Mapping[str, Mapping[str, Any]]
                  ) -> dict[str, Mapping[str, Any]]:
    """stage name -> the result its succeeded DPOJob reported (status.result)."""
    out: dict[str, Mapping[str, Any]] = {}
    for s in stages:
        child = children.get(s.job_name)
        if _phase(child) == "Succeeded":
            out[s.name] = ((child or {}).get("status") or {}).get("result") or {}
    return out


def with_phase(conditions: list[dict[str, Any]] | None, phase: str, reason: str, message: str, now: str,
               generation: int | None) -> list[dict[str, Any]]:
    """The state conditions as a DPOJob has them (conditions.set_states): Running, Suspended,
    Succeeded, Failed always present, the current one True; Pending is all of them False, saying why."""
    true_type = phase if phase in STATE_TYPES else None
    return set_states(conditions, STATE_TYPES, true_type, reason, message, now, generation)


def decide(name: str, spec: DPOPipelineSpec, stages: Sequence[PlannedStage],
           children: Mapping[str, Mapping[str, Any]], status: Mapping[str, Any], now: str,
           generation: int | None) -> Decision:
    """The pipeline's next step; `children` maps job name -> this pipeline's own child DPOJob."""
    if status.get("phase") in FINISHED:  # a finished pipeline stays finished (its children may be gone)
        return Decision(None, {})
    results = [r.to_wire() for r in round_results(spec, stage_results(stages, children))]
    current = current_stage(stages, children)
    patch: dict[str, Any] = {"rounds": spec.rounds, "results": results or None,
                             "observedGeneration": generation, "startTime": status.get("startTime") or now}
    create, suspend_child = None, None
    where = ""
    if current is None:
        phase, reason = "Succeeded", "Succeeded"
        message = f"all {len(stages)} stages succeeded ({spec.rounds} rounds)"
        patch.update(stage="done", round=spec.rounds, currentJob=None, stageProgress=None,
                     outputUri=policy(spec, spec.rounds), completionTime=status.get("completionTime") or now)
    else:
        child = children.get(current.job_name)
        where = f"stage {current.name} (round {current.round}/{spec.rounds}, DPOJob {current.job_name})"
        patch.update(stage=current.stage, round=current.round, currentJob=current.job_name)
        progress = stage_progress(current.task, ((child or {}).get("status") or {}).get("progress"))
        patch["stageProgress"] = progress.to_wire() if progress is not None else None
        child_phase = _phase(child)
        if child is None:
            create = current
            phase, reason, message = "Pending", "StageCreated", f"{where}: created"
        elif child_phase == "Failed":
            why, detail = _child_reason(child)
            phase, reason = "Failed", "StageFailed"
            message = f"{where} failed: {why}: {detail}".rstrip(": ")
            patch["completionTime"] = status.get("completionTime") or now
        elif child_phase == "Running":
            phase, reason, message = "Running", "StageRunning", f"{where}: running"
        elif child_phase == "Suspended":
            phase, reason, message = "Suspended", "Suspended", f"{where}: suspended (runPolicy.suspend)"
        else:
            phase, reason = "Pending", "StagePending"
            message = f"{where}: {child_phase or 'created'}: {((child.get('status') or {}).get('message') or '')}"
            message = message.rstrip(": ")
        if child is not None and child_phase not in FINISHED:
            want = bool(spec.run_policy.suspend)
            have = bool(((child.get("spec") or {}).get("runPolicy") or {}).get("suspend"))
            suspend_child = want if want != have else None
    patch.update(phase=phase, message=message, roundOf=f"{patch['round']}/{spec.rounds}",
                 conditions=with_phase(status.get("conditions"), phase, reason, message, now, generation))
    events = []
    if current is not None and status.get("currentJob") != current.job_name:
        events.append((False, "StageStarted", f"{where}: started"))
    if (phase, reason) != (status.get("phase"), phase_reason(status)) and reason != "StageCreated":
        events.append((phase == "Failed", reason, message))
    return Decision(create, patch, events, suspend_child)


def invalid_pipeline_status(field_name: str, message: str, generation: int | None, now: str) -> dict[str, Any]:
    text = message if message.startswith(field_name) else f"{field_name}: {message}"
    return {"phase": "Failed", "message": text, "observedGeneration": generation, "completionTime": now,
            "conditions": with_phase(None, "Failed", "InvalidSpec", text, now, generation)}


def stage_dpojob(pipeline: str, namespace: str, uid: str, stage: PlannedStage) -> dict[str, Any]:
    """The stage's DPOJob, owned by the pipeline: deleting the pipeline deletes it (garbage collector)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": stage.job_name,
            "namespace": namespace,
            "labels": {LABEL_PIPELINE: pipeline, LABEL_STAGE: stage.name, "app.kubernetes.io/managed-by": MANAGED_BY,
                       "app.kubernetes.io/part-of": "kubedpo"},
            "ownerReferences": [{"apiVersion": API_VERSION, "kind": PIPELINE_KIND, "name": pipeline, "uid": uid,
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": stage.wire_spec(),
    }


def owned_stage_jobs(dpojobs: Sequence[Mapping[str, Any]], pipeline: str, uid: str) -> dict[str, Mapping[str, Any]]:
    """job name -> DPOJob, for those carrying this pipeline's label AND its uid as owner.

    A pipeline deleted and re-created under the same name gets a new uid; the old one's stage
    DPOJobs (until the garbage collector removes them) must not count as the new run's stages.
    """
    out: dict[str, Mapping[str, Any]] = {}
    for d in dpojobs:
        meta = d.get("metadata") or {}
        if (meta.get("labels") or {}).get(LABEL_PIPELINE) == pipeline and owned_by(d, uid):
            out[str(meta.get("name"))] = d
    return out
