"""Phase and conditions of a DPOJob from its current Job: pure functions, no I/O.

The decision table (what happens when the attempt's Job reaches a state):

| Job state | condition | DPOJob |
|---|---|---|
| Complete | – | Succeeded |
| Failed, podFailurePolicy rule "config" (exit 2) | – | Failed (ConfigError), never retried |
| Failed, reason DeadlineExceeded | – | Failed (DeadlineExceeded) |
| Failed, podFailurePolicy rule "preempted" (exit 75) | – | Restarting, not counted |
| Failed, anything else | restarts < maxRestarts | Restarting, counted |
| Failed, anything else | restarts >= maxRestarts | Failed (MaxRestartsExceeded) |
| every worker ready | spec not suspended | Running |
| pods not all ready | a pod unschedulable / image pull / config error, or FailedCreate | Pending (that reason) |
| suspended / spec suspended | – | Suspended (user) or Pending/Queued (Kueue) |

Conditions (conditions.py has the conventions): the state-style types Running, Suspended,
Succeeded and Failed are all present from the first status on; the one named like the phase is
True (none while Pending or Restarting), and every one of them carries the reason and message
of the current phase, so a False condition says why (Running=False reason Suspended, Unschedulable,
WorkerFailed, Succeeded...). `Created` is True while the current attempt's children exist; a
restart turns it False until the next attempt's Job is created, so its lastTransitionTime is
when the current attempt began. Every condition carries the generation it was computed from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubedpo_trainer.errors import EXIT_CONFIG, EXIT_PREEMPTED

from .api import FINISHED_PHASES, RunPolicy
from .children import RULE_CONFIG, RULE_PREEMPTED, job_name
from .conditions import CREATED, find, is_true, set_condition, set_states, without
from .gang import all_ready

# State-style condition types driven by the phase (Pending and Restarting have none: all False).
STATE_TYPES = ("Running", "Suspended", "Succeeded", "Failed")
# Phase conditions written before state-style conditions; nothing would keep them true, so the
# next transition drops them.
LEGACY_TYPES = ("Pending", "Restarting")

_RULE_RE = re.compile(r"exit code (\d+) matching FailJob rule at index (\d+)")


def now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class JobState:
    """What a batch/v1 Job says about the gang. kind: pending|running|suspended|succeeded|failed."""

    kind: str
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    rule: int | None = None


def job_state(job: Mapping[str, Any]) -> JobState:
    st = job.get("status") or {}
    conds = {c.get("type"): c for c in st.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in conds:
        return JobState("succeeded", conds["Complete"].get("reason", ""), conds["Complete"].get("message", ""))
    if "Failed" in conds:
        c = conds["Failed"]
        m = _RULE_RE.search(c.get("message") or "")
        return JobState("failed", c.get("reason", ""), c.get("message", ""),
                        int(m.group(1)) if m else None, int(m.group(2)) if m else None)
    if (st.get("active") or 0) > 0 and all_ready(job):
        return JobState("running")
    if "Suspended" in conds or (job.get("spec") or {}).get("suspend"):
        return JobState("suspended")
    return JobState("pending")


@dataclass(frozen=True)
class Transition:
    """The DPOJob's next phase and why; `restart` asks for the next attempt's children."""

    phase: str
    reason: str
    message: str
    warning: bool = False
    restart: bool = False
    counted: bool = False

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES


def next_transition(status: Mapping[str, Any], job: JobState, policy: RunPolicy,
                    workers: int) -> Transition | None:
    """The transition the Job's state asks for, or None when phase and reason stay the same."""
    t = _decide(status, job, policy, workers)
    if t is None or t.restart:  # a restart moves to the next attempt, so it never repeats
        return t
    if t.phase == status.get("phase") and t.reason == phase_reason(status):
        return None
    return t


def _decide(status: Mapping[str, Any], job: JobState, policy: RunPolicy, workers: int) -> Transition | None:
    restarts = int(status.get("restarts") or 0)
    attempt = int(status.get("attempt") or 0)
    if status.get("phase") in FINISHED_PHASES:
        return None
    if job.kind == "succeeded":
        return Transition("Succeeded", "Succeeded", f"all {workers} workers finished (attempt {attempt})")
    if job.kind == "failed":
        detail = job.message or job.reason or "the Job failed"
        if job.rule == RULE_CONFIG or job.exit_code == EXIT_CONFIG:
            return Transition("Failed", "ConfigError", f"a worker exited with code {EXIT_CONFIG} "
                              f"(configuration or input error, not retried; see its log): {detail}", True)
        if job.reason == "DeadlineExceeded":
            return Transition("Failed", "DeadlineExceeded", f"runPolicy.activeDeadlineSeconds passed: {detail}",
                              True)
        if job.rule == RULE_PREEMPTED or job.exit_code == EXIT_PREEMPTED:
            return Transition("Restarting", "Preempted", f"attempt {attempt} was preempted after writing a "
                              f"checkpoint; restarting the gang (not counted): {detail}", True, restart=True)
        if restarts < policy.max_restarts:
            return Transition("Restarting", "WorkerFailed", f"attempt {attempt} failed ({detail}); gang "
                              f"restart {restarts + 1}/{policy.max_restarts} resumes from the newest "
                              "checkpoint", True, restart=True, counted=True)
        return Transition("Failed", "MaxRestartsExceeded", f"attempt {attempt} failed ({detail}) after "
                          f"{restarts} restarts (runPolicy.maxRestarts={policy.max_restarts})", True)
    if policy.suspend:
        return Transition("Suspended", "Suspended", "runPolicy.suspend is true; the gang's pods are stopped")
    if job.kind == "running":
        return Transition("Running", "Running", f"attempt {attempt}: {workers} workers running")
    if job.kind == "suspended" and policy.queue_name:
        return Transition("Pending", "Queued", f"waiting for Kueue to admit the gang (queue {policy.queue_name})")
    if job.kind == "pending" and job.reason:  # a reason from the pods or the Job's events (gang.py)
        return Transition("Pending", job.reason, f"attempt {attempt}: {job.message}", True)
    if status.get("phase") == "Restarting":
        return None  # the next attempt's pods are being scheduled
    return Transition("Pending", "Pending", f"attempt {attempt}: waiting for {workers} worker pods")


def phase_reason(status: Mapping[str, Any]) -> str:
    """The reason of the current phase, as the conditions record it ("" when they do not).

    A phase condition that is True names it (a state type, or a status the previous release
    wrote); otherwise (Pending, Restarting) every state condition carries it.
    """
    conditions = status.get("conditions")
    current = find(conditions, str(status.get("phase")))
    if current is not None and current.get("status") == "True":
        return str(current.get("reason", ""))
    running = find(conditions, "Running")
    return str(running.get("reason", "")) if running is not None and running.get("status") == "False" else ""


def phase_conditions(conditions: Any, t: Transition, now: str, generation: int | None) -> list[dict[str, Any]]:
    """The state conditions after transition `t` (legacy phase types dropped, the rest kept)."""
    true_type = t.phase if t.phase in STATE_TYPES else None
    return set_states(without(conditions, LEGACY_TYPES), STATE_TYPES, true_type, t.reason, t.message, now,
                      generation)


def status_patch(status: Mapping[str, Any], t: Transition, now: str, output_uri: str | None = None, *,
                 generation: int | None) -> dict[str, Any]:
    """The merge patch of .status for a transition (restart bookkeeping included).

    `generation`: the DPOJob's metadata.generation this transition was decided on; it becomes
    status.observedGeneration and every written condition's observedGeneration.
    """
    conditions = phase_conditions(status.get("conditions"), t, now, generation)
    attempt = int(status.get("attempt") or 0)
    if t.phase == "Restarting":  # the attempt's children are deleted; the next ones are created after
        conditions = set_condition(conditions, CREATED, False, t.reason, f"attempt {attempt}'s children are "
                                   f"replaced by attempt {attempt + 1}'s: {t.message}", now, generation)
    elif find(conditions, CREATED) is None or (t.finished and not is_true(conditions, CREATED)):
        # finished (refused, invalid) before the attempt's children existed: Created says why
        conditions = set_condition(conditions, CREATED, False, t.reason, t.message, now, generation)
    else:
        conditions = _refresh_generation(conditions, CREATED, generation)
    patch: dict[str, Any] = {"phase": t.phase, "message": t.message, "conditions": conditions}
    if generation is not None:
        patch["observedGeneration"] = generation
    if t.restart:
        patch["attempt"] = int(status.get("attempt") or 0) + 1
        patch["currentJob"] = None  # set again once the next attempt's Job exists
        if t.counted:
            patch["restarts"] = int(status.get("restarts") or 0) + 1
        else:
            patch["preemptions"] = int(status.get("preemptions") or 0) + 1
    if t.finished:
        patch["completionTime"] = now
    if t.phase == "Succeeded" and output_uri:
        patch["outputUri"] = output_uri
    return patch


def _refresh_generation(conditions: Any, kind: str | tuple[str, ...], generation: int | None
                        ) -> list[dict[str, Any]]:
    """`kind` re-stamped with the generation it was just checked against (nothing else moves)."""
    kinds = (kind,) if isinstance(kind, str) else kind
    return [{**c, "observedGeneration": generation} if c.get("type") in kinds and generation is not None
            else dict(c) for c in conditions or []]


def observed_patch(status: Mapping[str, Any], generation: int | None) -> dict[str, Any]:
    """A spec edit that changed no phase: the phase conditions hold for the new generation too
    (sync re-decided them from the edited spec); {} when already recorded."""
    if generation is None or status.get("observedGeneration") == generation:
        return {}
    return {"observedGeneration": generation,
            "conditions": _refresh_generation(status.get("conditions"), (CREATED, *STATE_TYPES), generation)}


def initial_status(generation: int | None, now: str, workers: int) -> dict[str, Any]:
    t = Transition("Pending", "Pending", f"attempt 0: waiting for {workers} worker pods")
    creating = set_condition(None, CREATED, False, "Creating", "attempt 0: creating its ConfigMap, Service and Job",
                             now, generation)
    return {"attempt": 0, "restarts": 0, "preemptions": 0, "startTime": now,
            **status_patch({"conditions": creating}, t, now, generation=generation)}


def created_patch(status: Mapping[str, Any], name: str, attempt: int, now: str, generation: int | None
                  ) -> dict[str, Any]:
    """Once the attempt's Job exists: status.currentJob and Created=True ({} when both are set)."""
    job = job_name(name, attempt)
    conditions = set_condition(status.get("conditions"), CREATED, True, "JobCreated",
                               f"attempt {attempt}: Job {job} and its ConfigMap and Service exist", now, generation)
    if status.get("currentJob") == job and find(status.get("conditions"), CREATED) == find(conditions, CREATED):
        return {}
    return {"currentJob": job, "conditions": conditions}


def invalid_status(field: str, message: str, generation: int | None, now: str) -> dict[str, Any]:
    """Failed with a condition naming the field; the operator never retries an invalid spec."""
    text = f"{field}: {message}" if not message.startswith(field) else message
    t = Transition("Failed", "InvalidSpec", text, warning=True)
    return status_patch({}, t, now, generation=generation)


def remaining_deadline(policy: RunPolicy, start_time: str | None, now: datetime) -> int | None:
    """activeDeadlineSeconds counts over all attempts: the next Job gets what is left."""
    if policy.active_deadline_seconds is None:
        return None
    start = parse_time(start_time) or now
    return max(1, int(policy.active_deadline_seconds - (now - start).total_seconds()))


def ttl_expired(status: Mapping[str, Any], policy: RunPolicy, now: datetime) -> bool:
    if policy.ttl_seconds_after_finished is None or status.get("phase") not in FINISHED_PHASES:
        return False
    done = parse_time(status.get("completionTime"))
    return done is not None and (now - done).total_seconds() >= policy.ttl_seconds_after_finished


def rediscovered_status(name: str, generation: int | None, now: str, attempt: int, start_time: str | None) -> dict[str, Any]:
    """Status rebuilt from the children when it was lost (e.g. a restore without status).

    The live attempt is kept (never a new attempt 0 next to it); the attempts before it are
    counted as restarts, the conservative reading (maxRestarts is never exceeded by the loss).
    """
    t = Transition("Pending", "StatusRediscovered", f"status was lost: attempt {attempt} rediscovered from "
                   f"its Job; its {attempt} earlier attempts are counted as restarts")
    found = set_condition(None, CREATED, True, "StatusRediscovered",
                          f"attempt {attempt}: Job {job_name(name, attempt)} exists", now, generation)
    return {"attempt": attempt, "restarts": attempt, "preemptions": 0, "startTime": start_time or now,
            "currentJob": job_name(name, attempt), **status_patch({"conditions": found}, t, now, generation=generation)}


def desired_suspend(policy: RunPolicy) -> bool | None:
    """What the Job's spec.suspend must be; None where Kueue decides (queued and not user-suspended)."""
    if policy.suspend:
        return True
    return None if policy.queue_name else False
