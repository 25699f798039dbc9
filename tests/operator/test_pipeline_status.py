"""pipeline_status.decide: the next stage and a status that never lies, from the stages' DPOJobs.

Pure: the planned stages are pipeline_plan's real ones; the child DPOJobs are dicts shaped as
the DPOJob controller writes them (phase, conditions, progress, result).
"""

from __future__ import annotations

from typing import Any

from kubedpo_operator.pipeline_api import parse_pipeline_spec
from kubedpo_operator.pipeline_plan import plan_pipeline
from kubedpo_operator.pipeline_status import (
    LABEL_PIPELINE,
    current_stage,
    decide,
    owned_stage_jobs,
    stage_dpojob,
)

NOW = "2026-12-01T05:00:00Z"
UID = "pipe-uid"
JUDGE = {"prompts": 32, "pairs": 28, "ties": 3, "unparseable": 1, "refusals": 0, "inconsistent": 2,
         "winRates": {"vsInitial": 0.6, "vsPrevious": 0.55}}


def spec(**over: Any) -> Any:
    raw = {"model": {"uri": "s3://models/base/"}, "prompts": {"train": "s3://prompts/train/", "heldOut": "s3://prompts/held/"},
           "rounds": 2, "judge": {"kind": "llm", "llm": {"url": "http://judge:8000/v1", "model": "m"}},
           "output": "s3://runs/p/", **over}
    return parse_pipeline_spec(raw)


def child(phase: str | None, result: dict | None = None, progress: dict | None = None, suspend: bool = False,
          failed: tuple[str, str] | None = None) -> dict[str, Any]:
    st: dict[str, Any] = {"phase": phase} if phase else {}
    if result is not None:
        st["result"] = result
    if progress is not None:
        st["progress"] = progress
    if failed:
        st["conditions"] = [{"type": "Failed", "status": "True", "reason": failed[0], "message": failed[1]}]
    return {"metadata": {"name": "x"}, "spec": {"runPolicy": {"suspend": suspend}}, "status": st}


def run(s: Any, children: dict[str, dict], status: dict | None = None) -> Any:
    stages = plan_pipeline("p", s)
    return decide("p", s, stages, children, status or {"phase": "Pending"}, NOW, 1)


def test_a_new_pipeline_creates_its_first_stage_and_says_pending() -> None:
    d = run(spec(), {})
    assert d.create is not None and d.create.job_name == "p-r1-generate"
    st = d.status
    assert (st["phase"], st["stage"], st["round"], st["roundOf"], st["currentJob"]) == (
        "Pending", "generate", 1, "1/2", "p-r1-generate")
    assert st["results"] is None
    assert [e[1] for e in d.events] == ["StageStarted"]


def test_running_only_while_the_current_stage_runs() -> None:
    running = run(spec(), {"p-r1-generate": child("Running", progress={"step": 3, "totalSteps": 8, "eta": "1m"})})
    assert running.status["phase"] == "Running" and running.create is None
    assert running.status["stageProgress"] == {"done": 3, "total": 8, "unit": "prompts", "eta": "1m"}
    for phase in ("Pending", "Restarting", None):
        d = run(spec(), {"p-r1-generate": child(phase)})
        assert d.status["phase"] == "Pending", phase
    # the previous stage succeeded and the next one is only being created: not Running
    d = run(spec(), {"p-r1-generate": child("Succeeded", {"prompts": 32})}, {"phase": "Running"})
    assert d.create is not None and d.create.job_name == "p-r1-judge" and d.status["phase"] == "Pending"
    assert d.status["stageProgress"] is None


def test_results_per_finished_round_from_the_stages_results() -> None:
    children = {"p-r1-generate": child("Succeeded", {"prompts": 32}),
                "p-r1-judge": child("Succeeded", JUDGE),
                "p-r1-train": child("Succeeded", {"step": 10, "loss": 0.5, "evalRewardAccuracy": 0.8}),
                "p-r2-generate": child("Succeeded", {"prompts": 32}),
                "p-r2-judge": child("Running")}
    st = run(spec(), children, {"phase": "Running", "currentJob": "p-r2-judge"}).status
    assert st["round"] == 2 and st["stage"] == "judge" and st["phase"] == "Running"
    [r1] = st["results"]
    assert r1["round"] == 1 and r1["pairs"] == 28 and r1["ties"] == 3 and r1["unparseable"] == 1
    assert r1["rewardAccuracy"] == 0.8 and r1["modelUri"] == "s3://runs/p/round-1/model/"
    assert "winRateVsInitial" not in r1  # measured by round 2's judge, not finished yet


def test_every_stage_succeeded_means_succeeded_with_the_last_policy() -> None:
    s = spec()
    children = {st.job_name: child("Succeeded", JUDGE if "judge" in st.name else {"prompts": 1})
                for st in plan_pipeline("p", s)}
    d = run(s, children, {"phase": "Running", "currentJob": "p-final-judge"})
    st = d.status
    assert (st["phase"], st["stage"], st["roundOf"], st["currentJob"]) == ("Succeeded", "done", "2/2", None)
    assert st["outputUri"] == "s3://runs/p/round-2/model/" and st["completionTime"] == NOW
    assert [r["round"] for r in st["results"]] == [1, 2]
    assert st["results"][1]["winRateVsInitial"] == 0.6  # round 2's rates come from the final judge
    assert d.create is None and [e[1] for e in d.events] == ["Succeeded"]


def test_a_failed_stage_fails_the_pipeline_naming_it_and_keeps_finished_rounds() -> None:
    children = {"p-r1-generate": child("Succeeded", {"prompts": 32}), "p-r1-judge": child("Succeeded", JUDGE),
                "p-r1-train": child("Succeeded", {"evalRewardAccuracy": 0.75}),
                "p-r2-generate": child("Succeeded", {"prompts": 32}),
                "p-r2-judge": child("Failed", failed=("MaxRestartsExceeded", "attempt 2 failed (exit 1)"))}
    d = run(spec(), children, {"phase": "Running", "currentJob": "p-r2-judge"})
    st = d.status
    assert st["phase"] == "Failed" and d.create is None
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "StageFailed"
    assert "stage r2-judge" in failed["message"] and "MaxRestartsExceeded: attempt 2 failed" in failed["message"]
    assert [r["round"] for r in st["results"]] == [1] and st["results"][0]["rewardAccuracy"] == 0.75
    assert d.events == [(True, "StageFailed", st["message"])]
    # and a finished pipeline stays as it is, whatever its children do later
    assert run(spec(), {}, {**st}).status == {}


def test_suspend_propagates_to_the_running_stage_and_is_reported_once_it_took_effect() -> None:
    s = spec(runPolicy={"suspend": True})
    d = run(s, {"p-r1-generate": child("Running")}, {"phase": "Running", "currentJob": "p-r1-generate"})
    assert d.suspend_child is True and d.status["phase"] == "Running"  # not yet stopped: no lie
    d = run(s, {"p-r1-generate": child("Suspended", suspend=True)}, {"phase": "Running", "currentJob": "p-r1-generate"})
    assert d.suspend_child is None and d.status["phase"] == "Suspended"
    d = run(spec(), {"p-r1-generate": child("Suspended", suspend=True)}, {"phase": "Suspended"})
    assert d.suspend_child is False  # resume


def test_conditions_follow_the_phase_with_metav1_fields() -> None:
    """As a DPOJob's (conditions.set_states): the four state types, the current one True."""
    first = run(spec(), {"p-r1-generate": child("Running")}).status["conditions"]
    assert [(c["type"], c["status"]) for c in first] == [
        ("Running", "True"), ("Suspended", "False"), ("Succeeded", "False"), ("Failed", "False")]
    assert {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"} <= set(first[0])
    later = run(spec(), {"p-r1-generate": child("Suspended", suspend=True)},
                {"phase": "Running", "conditions": first}).status["conditions"]
    assert [(c["type"], c["status"]) for c in later] == [
        ("Running", "False"), ("Suspended", "True"), ("Succeeded", "False"), ("Failed", "False")]
    pending = run(spec(), {"p-r1-generate": child("Pending")}).status["conditions"]
    assert {c["status"] for c in pending} == {"False"} and pending[0]["reason"] == "StagePending"


def test_stage_jobs_are_owned_and_only_owned_ones_count() -> None:
    stage = plan_pipeline("p", spec())[0]
    obj = stage_dpojob("p", "ns", UID, stage)
    ref = obj["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["uid"], ref["controller"], ref["blockOwnerDeletion"]) == ("DPOPipeline", UID, True, True)
    assert obj["metadata"]["labels"][LABEL_PIPELINE] == "p" and obj["spec"]["task"] == "generate"
    stale = {**obj, "metadata": {**obj["metadata"], "ownerReferences": [{**ref, "uid": "old-uid"}]}}
    assert owned_stage_jobs([stale], "p", UID) == {}
    assert list(owned_stage_jobs([obj], "p", UID)) == ["p-r1-generate"]
    assert current_stage(plan_pipeline("p", spec()), {}) == stage
