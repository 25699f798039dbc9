"""The decision table of status.py: Job state → DPOJob phase, restarts, conditions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubedpo_operator.api import RunPolicy
from kubedpo_operator.status import (
    JobState,
    Transition,
    initial_status,
    job_state,
    next_transition,
    phase_conditions,
    remaining_deadline,
    status_patch,
    ttl_expired,
)

NOW = "2026-01-01T00:00:00Z"


def _failed(message: str = "", reason: str = "BackoffLimitExceeded") -> dict:
    return {"status": {"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": reason, "message": message}]}}


def test_job_state_reads_the_matched_pod_failure_rule():
    st = job_state(_failed("Container trainer for pod a/b failed with exit code 75 matching FailJob rule "
                           "at index 2", "PodFailurePolicy"))
    assert (st.kind, st.exit_code, st.rule) == ("failed", 75, 2)
    assert job_state({"status": {"active": 2}}).kind == "running"
    assert job_state({"spec": {"suspend": True}, "status": {}}).kind == "suspended"
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}).kind == "succeeded"
    assert job_state({}).kind == "pending"


def test_counted_restarts_until_max_then_failed():
    status = initial_status(1, NOW, 2)
    policy = RunPolicy(max_restarts=2)
    for n in (1, 2):
        t = next_transition(status, job_state(_failed()), policy, 2)
        assert (t.phase, t.restart, t.counted) == ("Restarting", True, True)
        status = {**status, **status_patch(status, t, NOW, generation=1)}
        assert status["restarts"] == n and status["attempt"] == n
    t = next_transition(status, job_state(_failed()), policy, 2)
    assert (t.phase, t.reason, t.restart) == ("Failed", "MaxRestartsExceeded", False)


def test_preemption_is_free_and_config_error_is_final():
    status = initial_status(1, NOW, 1)
    pre = next_transition(status, JobState("failed", "PodFailurePolicy", "", 75, 2), RunPolicy(max_restarts=0), 1)
    assert pre.restart and not pre.counted
    patched = status_patch(status, pre, NOW, generation=1)
    assert patched["preemptions"] == 1 and "restarts" not in patched
    cfg = next_transition(status, JobState("failed", "PodFailurePolicy", "", 2, 1), RunPolicy(), 1)
    assert (cfg.phase, cfg.reason, cfg.restart) == ("Failed", "ConfigError", False)
    dl = next_transition(status, JobState("failed", "DeadlineExceeded"), RunPolicy(), 1)
    assert (dl.phase, dl.restart) == ("Failed", False)


def test_no_transition_when_nothing_changed_and_none_after_finish():
    status = initial_status(1, NOW, 1)
    assert next_transition(status, JobState("pending"), RunPolicy(), 1) is None
    running = {**status, **status_patch(status, next_transition(status, JobState("running"), RunPolicy(), 1), NOW,
                                            generation=1)}
    assert next_transition(running, JobState("running"), RunPolicy(), 1) is None
    assert next_transition({**running, "phase": "Succeeded"}, job_state(_failed()), RunPolicy(), 1) is None


def test_suspend_and_queue():
    status = initial_status(1, NOW, 1)
    assert next_transition(status, JobState("running"), RunPolicy(suspend=True), 1).phase == "Suspended"
    q = next_transition(status, JobState("suspended"), RunPolicy(queue_name="q"), 1)
    assert (q.phase, q.reason) == ("Pending", "Queued")


def test_conditions_flip_and_keep_transition_times():
    conds = phase_conditions(None, Transition("Pending", "Pending", "m"), "t0", 1)
    conds = phase_conditions(conds, Transition("Running", "Running", "m"), "t1", 1)
    conds = phase_conditions(conds, Transition("Running", "Running", "m2"), "t2", 1)
    by = {c["type"]: c for c in conds}
    assert by["Suspended"]["status"] == "False" and by["Suspended"]["lastTransitionTime"] == "t0"
    assert by["Running"]["status"] == "True" and by["Running"]["lastTransitionTime"] == "t1"
    assert by["Suspended"]["message"] == "m2"


def test_deadline_and_ttl_arithmetic():
    now = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    start = (now - timedelta(seconds=600)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert remaining_deadline(RunPolicy(active_deadline_seconds=1000), start, now) == 400
    assert remaining_deadline(RunPolicy(), start, now) is None
    done = {"phase": "Succeeded", "completionTime": start}
    assert ttl_expired(done, RunPolicy(ttl_seconds_after_finished=600), now)
    assert not ttl_expired(done, RunPolicy(ttl_seconds_after_finished=601), now)
    assert not ttl_expired({**done, "phase": "Running"}, RunPolicy(ttl_seconds_after_finished=0), now)
