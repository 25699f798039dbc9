"""Conditions per the Kubernetes API conventions (metav1.Condition), as pure functions and in the CRD.

The rules checked here: conditions are keyed by type (never two of one type); lastTransitionTime
is RFC 3339 and moves only when status flips; every condition, the phase ones included, carries
the metadata.generation it was computed from; reasons are CamelCase and never empty; and the
state-style types Created, Running, Suspended, Succeeded and Failed are all present once the job
exists, the False ones saying why (the current phase's reason and message), never left stale.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import jsonschema
import pytest

from kubedpo_operator.api import RunPolicy
from kubedpo_operator.conditions import camel_reason, changed, find, set_condition, set_states
from kubedpo_operator.crd import build_crd, to_jsonschema
from kubedpo_operator.status import (
    STATE_TYPES,
    JobState,
    Transition,
    created_patch,
    initial_status,
    invalid_status,
    next_transition,
    observed_patch,
    phase_reason,
    rediscovered_status,
    status_patch,
)

REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")  # metav1.Condition's reason pattern
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
ALL_STATES = ("Created", *STATE_TYPES)


def _by_type(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    types = [c["type"] for c in status["conditions"]]
    assert len(types) == len(set(types)), f"duplicate condition types: {types}"
    return {c["type"]: c for c in status["conditions"]}


def _check_conventions(status: dict[str, Any], generation: int) -> dict[str, dict[str, Any]]:
    conds = _by_type(status)
    assert set(ALL_STATES) <= conds.keys(), conds.keys()
    for c in conds.values():
        assert REASON.match(c["reason"]), c
        assert c["message"], c
        assert RFC3339.match(c["lastTransitionTime"]), c
        datetime.fromisoformat(c["lastTransitionTime"].replace("Z", "+00:00"))
        assert c["observedGeneration"] == generation, c
    assert status.get("observedGeneration", generation) == generation
    return conds


def _apply(status: dict[str, Any], t: Transition, now: str, generation: int) -> dict[str, Any]:
    return {**status, **status_patch(status, t, now, generation=generation)}


def test_set_condition_is_keyed_by_type_and_moves_the_time_only_on_a_flip():
    legacy = [{"type": "Running", "status": "True", "reason": "Running", "message": "a",
               "lastTransitionTime": "2026-01-01T00:00:00Z"},
              {"type": "Running", "status": "False", "reason": "Old", "message": "b",
               "lastTransitionTime": "2026-01-01T00:00:01Z"}]
    out = set_condition(legacy, "Running", False, "Suspended", "stopped", "2026-01-01T00:00:05Z", 4)
    assert [c["type"] for c in out] == ["Running"]  # the duplicate a hand edit left is gone
    assert out[0]["lastTransitionTime"] == "2026-01-01T00:00:01Z"  # was False already: no flip
    assert (out[0]["reason"], out[0]["message"], out[0]["observedGeneration"]) == ("Suspended", "stopped", 4)
    flipped = set_condition(out, "Running", True, "Running", "up", "2026-01-01T00:00:09Z", 5)
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:00:09Z" and flipped[0]["status"] == "True"
    assert out[0]["status"] == "False"  # pure: the input is not changed
    assert find(flipped, "Running") == flipped[0] and find(flipped, "Failed") is None
    # A write is needed when the generation moved, even if nothing else did.
    assert changed(flipped, set_condition(flipped, "Running", True, "Running", "up", "later", 6))
    assert not changed(flipped, set_condition(flipped, "Running", True, "Running", "up", "later", 5))


@pytest.mark.parametrize("text,want", [
    ("BackoffLimitExceeded", "BackoffLimitExceeded"),
    ("back-off limit exceeded", "BackOffLimitExceeded"),
    ("1st try", "Reason1stTry"),
    ("", "Unknown"),
    ("!!!", "Unknown"),
    ("a" * 2000, "a" * 1024),
])
def test_reasons_are_camel_case_and_never_empty(text: str, want: str):
    assert camel_reason(text) == want and REASON.match(camel_reason(text))
    assert set_condition(None, "X", True, text, "m", "2026-01-01T00:00:00Z")[0]["reason"] == want


def test_set_states_sets_one_true_and_refreshes_the_false_ones():
    conds = set_states(None, ("A", "B", "C"), "B", "WhyB", "b happened", "2026-01-01T00:00:00Z", 1)
    assert [(c["type"], c["status"], c["reason"]) for c in conds] == [
        ("A", "False", "WhyB"), ("B", "True", "WhyB"), ("C", "False", "WhyB")]
    conds = set_states(conds, ("A", "B", "C"), None, "Waiting", "nothing yet", "2026-01-01T00:00:07Z", 2)
    assert all(c["status"] == "False" and c["reason"] == "Waiting" and c["observedGeneration"] == 2 for c in conds)
    assert find(conds, "A")["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert find(conds, "B")["lastTransitionTime"] == "2026-01-01T00:00:07Z"


def test_run_suspend_resume_succeed_keeps_every_condition_true_to_the_phase():
    """The state machine's pure half, step by step, with the generation moving at each spec edit."""
    policy = RunPolicy()
    st = initial_status(1, "2026-01-01T00:00:00Z", 2)
    conds = _check_conventions(st, 1)
    assert (conds["Created"]["status"], conds["Created"]["reason"]) == ("False", "Creating")
    assert all(conds[t]["status"] == "False" and conds[t]["reason"] == "Pending" for t in STATE_TYPES)
    assert phase_reason(st) == "Pending"

    st = {**st, **created_patch(st, "j", 0, "2026-01-01T00:00:01Z", 1)}
    conds = _check_conventions(st, 1)
    assert (conds["Created"]["status"], conds["Created"]["reason"]) == ("True", "JobCreated")
    assert st["currentJob"] == "j-0" and created_patch(st, "j", 0, "2026-01-01T00:00:02Z", 1) == {}

    t = next_transition(st, JobState("running"), policy, 2)
    st = _apply(st, t, "2026-01-01T00:00:10Z", 1)
    conds = _check_conventions(st, 1)
    assert (conds["Running"]["status"], conds["Running"]["reason"]) == ("True", "Running")
    assert all(conds[t]["status"] == "False" and conds[t]["reason"] == "Running" for t in ("Suspended", "Succeeded",
                                                                                             "Failed"))
    assert next_transition(st, JobState("running"), policy, 2) is None

    t = next_transition(st, JobState("running"), RunPolicy(suspend=True), 2)  # generation 2: suspend
    st = _apply(st, t, "2026-01-01T00:00:20Z", 2)
    conds = _check_conventions(st, 2)
    assert (conds["Suspended"]["status"], conds["Running"]["status"]) == ("True", "False")
    assert conds["Running"]["reason"] == "Suspended" and "suspend" in conds["Running"]["message"]
    assert conds["Running"]["lastTransitionTime"] == "2026-01-01T00:00:20Z"
    assert conds["Created"]["lastTransitionTime"] == "2026-01-01T00:00:01Z"  # did not flip

    st = _apply(st, Transition("Pending", "Resumed", "runPolicy.suspend cleared: resuming"),
                "2026-01-01T00:00:30Z", 3)  # generation 3: resume (what on_suspend writes)
    conds = _check_conventions(st, 3)
    assert all(conds[t]["status"] == "False" and conds[t]["reason"] == "Resumed" for t in STATE_TYPES)
    assert phase_reason(st) == "Resumed"

    st = _apply(st, next_transition(st, JobState("running"), policy, 2), "2026-01-01T00:00:40Z", 3)
    st = _apply(st, next_transition(st, JobState("succeeded"), policy, 2), "2026-01-01T00:00:50Z", 3)
    conds = _check_conventions(st, 3)
    assert {t: (conds[t]["status"], conds[t]["reason"]) for t in ALL_STATES} == {
        "Created": ("True", "JobCreated"), "Running": ("False", "Succeeded"), "Suspended": ("False", "Succeeded"),
        "Succeeded": ("True", "Succeeded"), "Failed": ("False", "Succeeded")}
    assert conds["Running"]["message"] == conds["Succeeded"]["message"] == st["message"]
    assert conds["Suspended"]["lastTransitionTime"] == "2026-01-01T00:00:30Z"
    assert conds["Succeeded"]["lastTransitionTime"] == "2026-01-01T00:00:50Z"


def test_a_gang_restart_turns_created_false_until_the_next_attempt_exists():
    st = initial_status(1, "2026-01-01T00:00:00Z", 1)
    st = {**st, **created_patch(st, "r", 0, "2026-01-01T00:00:01Z", 1)}
    t = next_transition(st, JobState("failed", "BackoffLimitExceeded", "boom"), RunPolicy(max_restarts=2), 1)
    st = _apply(st, t, "2026-01-01T00:00:10Z", 1)
    conds = _check_conventions(st, 1)
    assert st["phase"] == "Restarting" and st["attempt"] == 1 and st["currentJob"] is None
    assert (conds["Created"]["status"], conds["Created"]["reason"]) == ("False", "WorkerFailed")
    assert all(conds[t]["reason"] == "WorkerFailed" and "boom" in conds[t]["message"] for t in STATE_TYPES)
    st = {**st, **created_patch(st, "r", 1, "2026-01-01T00:00:11Z", 1)}
    conds = _check_conventions(st, 1)
    assert conds["Created"]["status"] == "True" and "attempt 1" in conds["Created"]["message"]
    assert conds["Created"]["lastTransitionTime"] == "2026-01-01T00:00:11Z" and st["currentJob"] == "r-1"


def test_refused_and_rediscovered_statuses_follow_the_same_rules():
    bad = invalid_status("spec.training.loss", "unknown loss", 7, "2026-01-01T00:00:00Z")
    conds = _check_conventions(bad, 7)
    assert (conds["Failed"]["status"], conds["Failed"]["reason"]) == ("True", "InvalidSpec")
    assert (conds["Created"]["status"], conds["Created"]["reason"]) == ("False", "InvalidSpec")
    found = rediscovered_status("x", 2, "2026-01-01T00:00:00Z", 3, None)
    conds = _check_conventions(found, 2)
    assert (conds["Created"]["status"], conds["Created"]["reason"]) == ("True", "StatusRediscovered")
    assert found["currentJob"] == "x-3" and phase_reason(found) == "StatusRediscovered"


def test_a_spec_edit_without_a_transition_restamps_the_phase_conditions_once():
    """E.g. runPolicy.maxRestarts edited while Running: sync re-decides from the edited spec (and
    finds nothing to change), so the phase conditions hold for generation 2; the rest keep theirs."""
    st = initial_status(1, "2026-01-01T00:00:00Z", 1)
    st = {**st, **created_patch(st, "e", 0, "2026-01-01T00:00:01Z", 1)}
    st = _apply(st, next_transition(st, JobState("running"), RunPolicy(), 1), "2026-01-01T00:00:02Z", 1)
    st["conditions"] = set_condition(st["conditions"], "ProgressAvailable", True, "MetricsRead", "ok",
                                     "2026-01-01T00:00:03Z", 1)
    assert next_transition(st, JobState("running"), RunPolicy(max_restarts=9), 1) is None
    patch = observed_patch(st, 2)
    after = {**st, **patch}
    conds = _by_type(after)
    assert after["observedGeneration"] == 2
    assert all(conds[k]["observedGeneration"] == 2 for k in ALL_STATES)
    assert conds["ProgressAvailable"]["observedGeneration"] == 1  # not re-read: still generation 1's
    assert [(c["type"], c["status"], c["reason"], c["lastTransitionTime"]) for c in after["conditions"]] == \
        [(c["type"], c["status"], c["reason"], c["lastTransitionTime"]) for c in st["conditions"]]
    assert observed_patch(after, 2) == {} and observed_patch(st, None) == {}


def test_a_status_written_by_the_previous_release_is_read_and_migrated():
    """Before: one condition per phase (Pending and Restarting included), no observedGeneration on them."""
    old = {"phase": "Pending", "attempt": 0, "restarts": 0, "conditions": [
        {"type": "Pending", "status": "True", "reason": "Created", "message": "attempt 0: waiting",
         "lastTransitionTime": "2025-12-31T00:00:00Z"},
        {"type": "Running", "status": "False", "reason": "Running", "message": "stale",
         "lastTransitionTime": "2025-12-31T00:00:00Z"},
        {"type": "ProgressAvailable", "status": "True", "reason": "MetricsRead", "message": "ok",
         "lastTransitionTime": "2025-12-31T00:00:00Z", "observedGeneration": 1}]}
    assert phase_reason(old) == "Created"  # the old phase condition still decides what is new
    t = next_transition(old, JobState("running"), RunPolicy(), 1)
    st = _apply(old, t, "2026-01-01T00:00:00Z", 1)
    conds = _by_type(st)
    assert "Pending" not in conds and "Restarting" not in conds  # nothing would keep them true
    assert conds["ProgressAvailable"] == old["conditions"][2]  # others are left as they were
    assert conds["Running"]["status"] == "True" and conds["Running"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert all(conds[k]["observedGeneration"] == 1 for k in ALL_STATES)


# --- the CRD ------------------------------------------------------------------------------------


def _conditions_schema() -> dict[str, Any]:
    status = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    return status["properties"]["conditions"]


def test_crd_conditions_are_a_map_keyed_by_type_with_metav1_rules():
    node = _conditions_schema()
    assert node["x-kubernetes-list-type"] == "map" and node["x-kubernetes-list-map-keys"] == ["type"]
    item = node["items"]
    assert set(item["required"]) == {"type", "status", "reason", "message", "lastTransitionTime"}
    assert item["properties"]["reason"]["pattern"] == REASON.pattern
    assert item["properties"]["reason"]["minLength"] == 1
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert item["properties"]["observedGeneration"]["minimum"] == 0
    assert "default" not in item["properties"]["reason"]  # an empty reason is no longer made up


def test_crd_accepts_conditions_the_previous_release_stored_and_refuses_bad_ones():
    formats = jsonschema.FormatChecker()
    # jsonschema checks date-time only with an optional package; this is the API server's check.
    formats.checks("date-time")(lambda v: not isinstance(v, str) or bool(RFC3339.match(v)))
    check = jsonschema.Draft202012Validator(to_jsonschema(_conditions_schema()), format_checker=formats)
    stored_before = [  # as the previous release wrote them: no observedGeneration on phase conditions
        {"type": "Pending", "status": "False", "reason": "Created", "message": "attempt 0: waiting for 2 worker pods",
         "lastTransitionTime": "2026-01-01T00:00:00Z"},
        {"type": "Failed", "status": "True", "reason": "CreateRefused", "message": "x",
         "lastTransitionTime": "2026-01-01T00:00:01Z"},
        {"type": "Created", "status": "False", "reason": "ForeignChildExists", "message": "y",
         "lastTransitionTime": "2026-01-01T00:00:01Z", "observedGeneration": 1}]
    check.validate(stored_before)
    fresh = initial_status(1, "2026-01-01T00:00:00Z", 1)["conditions"]
    check.validate(fresh)
    good = stored_before[0]
    for bad in ({**good, "reason": ""}, {**good, "reason": "not camel"}, {**good, "lastTransitionTime": "t0"},
                {k: v for k, v in good.items() if k != "message"}, {**good, "observedGeneration": -1}):
        assert not check.is_valid([bad]), bad
