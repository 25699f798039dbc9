"""The DPOPipeline controller for real (kopf) on kmock, next to the DPOJob controller it builds on.

Real: kopf running both controllers, the API server emulator, the child DPOJobs and their Jobs
as the operator creates them. Played by the test, because no kubelet or Job controller runs
here: each stage Job's state (running, complete, failed with an exit-code rule) and rank 0's Pod
with the termination message its task would have written. The stages' trainers do not run in
this file (tests/e2e/test_pipeline_end_to_end.py runs them).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubedpo_operator.gang import JOB_NAME_LABEL
from kubedpo_operator.task_result import INDEX_KEY
from tests.operator.conftest import NS, FakeCluster, eventually

JUDGE = {"prompts": 16, "pairs": 12, "ties": 3, "unparseable": 1, "refusals": 0, "inconsistent": 0,
         "winRates": {"vsInitial": 0.625, "vsPrevious": 0.5}}
RESULTS = {"generate": {"prompts": 16, "responses": 64}, "judge": JUDGE,
           "train": {"step": 4, "loss": 0.6, "evalRewardAccuracy": 0.75, "outputUri": "x"},
           "final-generate": {"prompts": 4}, "final-judge": JUDGE}


# No pod DNS here: the stage DPOJobs' progress scrape is pointed at a closed local port.
FAST = {"metrics_url_template": "http://127.0.0.1:1/metrics"}


def pipeline_spec(**over: Any) -> dict[str, Any]:
    return {"model": {"uri": "s3://models/base/"},
            "prompts": {"train": "s3://prompts/train/", "heldOut": "s3://prompts/held/"},
            "rounds": 2, "judge": {"kind": "llm", "llm": {"url": "http://judge:8000/v1", "model": "m"}},
            "output": "s3://runs/p/", **over}


async def pipe_status(cluster: FakeCluster, name: str) -> dict[str, Any]:
    return ((await cluster.get("DPOPipeline", name)) or {}).get("status") or {}


async def phase_is(cluster: FakeCluster, name: str, phase: str, kind: str = "DPOPipeline") -> dict | None:
    st = ((await cluster.get(kind, name)) or {}).get("status") or {}
    return st if st.get("phase") == phase else None


async def run_stage(cluster: FakeCluster, job: str, result: dict[str, Any] | None, fail_code: int | None = None,
                    pipeline: str | None = None) -> None:
    """Play the Job controller and kubelet for one stage DPOJob: running, then done (or failed)."""
    await eventually(lambda: cluster.get("Job", f"{job}-0"), timeout=15)
    await cluster.set_job(f"{job}-0", active=1)
    await eventually(lambda: phase_is(cluster, job, "Running", "DPOJob"))
    if pipeline is not None:  # the pipeline runs exactly while its current stage runs
        st = await eventually(lambda: phase_is(cluster, pipeline, "Running"))
        assert st["currentJob"] == job
    if fail_code is not None:
        await cluster.set_job(f"{job}-0", failed=1, condition="Failed", reason="PodFailurePolicy",
                              message=f"Container trainer for pod {NS}/{job}-0-0 failed with exit code "
                                      f"{fail_code} matching FailJob rule at index 1")
        return
    terminated: dict[str, Any] = {"exitCode": 0, **({"message": json.dumps(result)} if result else {})}
    await cluster.create("Pod", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{job}-0-0", "namespace": NS, "labels": {JOB_NAME_LABEL: f"{job}-0", INDEX_KEY: "0"}},
        "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}})
    await cluster.set_job(f"{job}-0", succeeded=1, condition="Complete")
    await eventually(lambda: phase_is(cluster, job, "Succeeded", "DPOJob"))


@pytest.mark.slow
async def test_stages_run_one_after_the_other_to_succeeded_with_results(cluster: FakeCluster, operator: Any) -> None:
    await operator.start(**FAST)
    pipe = await cluster.create_pipeline("p", pipeline_spec(rounds=1))
    order = ["r1-generate", "r1-judge", "r1-train", "final-generate", "final-judge"]
    for i, stage in enumerate(order):
        child = await eventually(lambda s=stage: cluster.get("DPOJob", f"p-{s}"), timeout=15)
        ref = child["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["uid"], ref["blockOwnerDeletion"]) == ("DPOPipeline", pipe["metadata"]["uid"], True)
        later = [s for s in order[i + 1:] if await cluster.get("DPOJob", f"p-{s}") is not None]
        assert later == [], f"{later} created before {stage} succeeded"
        key = stage if stage.startswith("final") else stage.split("-", 1)[1]
        await run_stage(cluster, f"p-{stage}", RESULTS[key], pipeline="p")
    st = await eventually(lambda: phase_is(cluster, "p", "Succeeded"), timeout=15)
    assert (st["stage"], st["round"], st["roundOf"], st["outputUri"]) == ("done", 1, "1/1", "s3://runs/p/round-1/model/")
    [r1] = st["results"]
    assert (r1["pairs"], r1["ties"], r1["unparseable"], r1["rewardAccuracy"]) == (12, 3, 1, 0.75)
    assert r1["winRateVsInitial"] == 0.625 and r1["winRateVsPrevious"] == 0.5  # from the final judge
    assert cluster.creates("DPOJob") == len(order)  # one DPOJob per stage, no duplicates
    events = await eventually(lambda: _events_until(cluster, "p", "Succeeded"))
    assert events.count("StageStarted") == len(order) and events[-1] == "Succeeded", events


async def test_a_failing_stage_fails_the_pipeline_and_keeps_finished_rounds(cluster: FakeCluster,
                                                                            operator: Any) -> None:
    await operator.start(**FAST)
    await cluster.create_pipeline("f", pipeline_spec())
    for stage in ("r1-generate", "r1-judge", "r1-train", "r2-generate"):
        await run_stage(cluster, f"f-{stage}", RESULTS[stage.split("-", 1)[1]])
    await run_stage(cluster, "f-r2-judge", None, fail_code=2)  # exit 2: config error, never retried
    st = await eventually(lambda: phase_is(cluster, "f", "Failed"), timeout=15)
    cond = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert cond["status"] == "True" and cond["reason"] == "StageFailed"
    assert "stage r2-judge" in cond["message"] and "ConfigError" in cond["message"]
    assert [r["round"] for r in st["results"]] == [1] and st["results"][0]["pairs"] == 12
    assert await cluster.get("DPOJob", "f-r2-train") is None  # nothing after the failed stage
    running = next(c for c in st["conditions"] if c["type"] == "Running")
    assert running["status"] == "False"
    assert "StageFailed" in await eventually(lambda: _events_until(cluster, "f", "StageFailed"))


async def test_suspend_reaches_the_running_stage_and_resume_continues(cluster: FakeCluster, operator: Any) -> None:
    await operator.start(**FAST)
    await cluster.create_pipeline("s", pipeline_spec(rounds=1))
    await eventually(lambda: cluster.get("Job", "s-r1-generate-0"), timeout=15)
    await cluster.set_job("s-r1-generate-0", active=1)
    await eventually(lambda: phase_is(cluster, "s", "Running"))
    await cluster.patch("DPOPipeline", "s", {"metadata": {"generation": 2}, "spec": {"runPolicy": {"suspend": True}}})
    child = await eventually(lambda: _suspended(cluster, "s-r1-generate", True))
    assert child["spec"]["runPolicy"]["suspend"] is True
    await eventually(lambda: _job_suspend(cluster, "s-r1-generate-0", True))  # the DPOJob controller's part
    await cluster.set_job("s-r1-generate-0", active=0)
    st = await eventually(lambda: phase_is(cluster, "s", "Suspended"))
    assert st["currentJob"] == "s-r1-generate"
    await cluster.patch("DPOPipeline", "s", {"metadata": {"generation": 3}, "spec": {"runPolicy": {"suspend": False}}})
    await eventually(lambda: _suspended(cluster, "s-r1-generate", False))
    await cluster.set_job("s-r1-generate-0", active=1)
    await eventually(lambda: phase_is(cluster, "s", "Running"))


async def test_invalid_pipeline_fails_naming_the_field_and_creates_nothing(cluster: FakeCluster,
                                                                          operator: Any) -> None:
    await operator.start(**FAST)
    await cluster.create_pipeline("bad", pipeline_spec(generate={"samplesPerPrompt": 1}))
    st = await eventually(lambda: phase_is(cluster, "bad", "Failed"))
    assert "generate.samplesPerPrompt" in st["message"]
    assert next(c for c in st["conditions"] if c["type"] == "Failed")["reason"] == "InvalidSpec"
    assert await cluster.list("DPOJob") == []


async def test_a_foreign_dpojob_holding_a_stage_name_is_not_adopted(cluster: FakeCluster, operator: Any) -> None:
    """A stage name taken by a DPOJob of a deleted pipeline (same name, old uid) blocks, never counts."""
    from tests.operator.conftest import minimal_spec

    old = await cluster.create_dpojob("o-r1-generate", minimal_spec())
    await cluster.patch("DPOJob", "o-r1-generate", {"metadata": {
        "labels": {"kubedpo.io/pipeline-name": "o"},
        "ownerReferences": [{"apiVersion": "kubedpo.io/v1alpha1", "kind": "DPOPipeline", "name": "o",
                             "uid": "old-uid"}]}})
    await operator.start(**FAST)
    await cluster.create_pipeline("o", pipeline_spec(rounds=1))
    st = await eventually(lambda: _reason(cluster, "o", "ForeignChildExists"))
    assert st["phase"] == "Pending" and "old-uid" in st["message"]
    assert (await cluster.get("DPOJob", "o-r1-generate"))["metadata"]["uid"] == old["metadata"]["uid"]


async def _reason(cluster: FakeCluster, name: str, reason: str) -> dict | None:
    st = await pipe_status(cluster, name)
    return st if any(c.get("reason") == reason for c in st.get("conditions") or []) else None


async def _suspended(cluster: FakeCluster, name: str, value: bool) -> dict | None:
    d = await cluster.get("DPOJob", name)
    return d if d and bool(((d.get("spec") or {}).get("runPolicy") or {}).get("suspend")) == value else None


async def _job_suspend(cluster: FakeCluster, name: str, value: bool) -> bool:
    return bool(((await cluster.get("Job", name)) or {}).get("spec", {}).get("suspend")) == value


async def _events_until(cluster: FakeCluster, name: str, last: str) -> list[str] | None:
    reasons = [e["reason"] for e in await cluster.events(name) if e["involvedObject"].get("kind") == "DPOPipeline"]
    return reasons if last in reasons else None
