"""Issue 12 through the operator: a DPOPipeline (SFT, then 2 rounds of generate -> judge -> DPO)
applied to the API server, every stage a DPOJob whose pods run the real trainer.

Real: kopf running both controllers (DPOPipeline and DPOJob), kmock's API server emulator, every
stage's `kubedpo-trainer` processes (sft, generate, judge, dpo tasks on the tiny model), the
rule-based judge as a real HTTP server on 127.0.0.1 speaking chat completions, the tasks'
results travelling as termination messages into each DPOJob's status.result and from there
into the pipeline's status.results. Mocked, because it cannot run here: the Job controller and
the kubelet (tests/support/kubelet.py runs each pod's command as local processes and reports
their exit and termination message). Storage is the local filesystem (the pods share this host).

The manifest is demo_iterative.pipeline_manifest, the one `make demo-iterative` runs locally.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kubedpo_trainer.demo_iterative import build_tiny, llm_judge, pipeline_manifest
from kubedpo_trainer.tiny_judge import TinyJudge
from tests.operator.conftest import NS, FakeCluster, eventually
from tests.support.kubelet import StandInKubelet

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
STAGES = ["sft", "r1-generate", "r1-judge", "r1-train", "r2-generate", "r2-judge", "r2-train",
          "final-generate", "final-judge"]


@pytest.fixture
async def kubelet(cluster: FakeCluster, operator: Any, tmp_path: Path) -> AsyncIterator[StandInKubelet]:
    op = await operator.start()
    pod_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    stand_in = StandInKubelet(cluster, tmp_path / "nodes", op.memo.settings, NS,
                              base_env={**pod_env, "OMP_NUM_THREADS": "1"})
    task = asyncio.create_task(stand_in.run())
    try:
        yield stand_in
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _until(cluster: FakeCluster, kubelet: StandInKubelet, name: str, phase: str) -> dict[str, Any] | None:
    st = ((await cluster.get("DPOPipeline", name)) or {}).get("status") or {}
    if st.get("phase") == "Failed" and phase != "Failed":
        logs = "\n".join(kubelet.logs(j)[-3000:] for j in kubelet.jobs)
        raise AssertionError(f"{name} failed: {st.get('message')}\n{logs}")
    return st if st.get("phase") == phase else None


async def test_sft_then_two_rounds_through_the_operator(cluster: FakeCluster, kubelet: StandInKubelet,
                                                       judge_server: Any, tmp_path: Path) -> None:
    model_dir, task = build_tiny(tmp_path / "artifacts")
    doc = pipeline_manifest(tmp_path, model_dir, task.sft_uri, task.prompts_uri, task.held_out_uri,
                            llm_judge(judge_server.url), name="iter")
    await cluster.create_pipeline("iter", doc["spec"])
    seen: list[tuple[str, str]] = []

    async def progress() -> dict[str, Any] | None:
        st = await _until(cluster, kubelet, "iter", "Succeeded")
        now = ((await cluster.get("DPOPipeline", "iter")) or {}).get("status") or {}
        if now.get("currentJob") and (now["currentJob"], now.get("phase")) not in seen:
            seen.append((now["currentJob"], now["phase"]))
        return st

    st = await eventually(progress, timeout=1500, interval=0.2)
    # Each stage ran as its own DPOJob, one after the other, and the pipeline said so.
    assert [j for j, _ in seen if _ == "Running"] == [f"iter-{s}" for s in STAGES if any(
        j == f"iter-{s}" and p == "Running" for j, p in seen)]
    for stage in STAGES:
        child = await cluster.get("DPOJob", f"iter-{stage}")
        assert child["status"]["phase"] == "Succeeded", stage
        assert child["status"]["result"], f"{stage}: no status.result from its termination message"
    assert (st["stage"], st["roundOf"]) == ("done", "2/2")
    r1, r2 = st["results"]
    judge1 = (await cluster.get("DPOJob", "iter-r1-judge"))["status"]["result"]
    assert r1["pairs"] == judge1["pairs"] > 0 and r1["ties"] == judge1["ties"]
    assert r2["pairs"] > 0 and 0 <= r2["rewardAccuracy"] <= 1
    assert judge_server.requests > 0
    events = await eventually(lambda: _pipeline_events(cluster, "iter", "Succeeded"))
    assert events.count("StageStarted") == len(STAGES), events
    # Round 2's policy against the SFT model on held-out prompts, judged by the test judge. Not
    # the operator's doing, and not yet true of this manifest (2026-12-01, 2 loaded cores: 0.465
    # after round 1, 0.469 after round 2): reported as an expected failure with the numbers, only
    # after every operator assertion above held, so a regression there still fails the test.
    rates = (r1.get("winRateVsInitial"), r2.get("winRateVsInitial"))
    print(f"win rate vs initial: round 1 {rates[0]}, round 2 {rates[1]}")
    if not (rates[1] is not None and rates[1] > 0.5):
        pytest.xfail(f"win rate vs the SFT model did not rise above a coin flip: rounds 1, 2 = {rates}")


async def _pipeline_events(cluster: FakeCluster, name: str, last: str) -> list[str] | None:
    reasons = [e["reason"] for e in await cluster.events(name) if e["involvedObject"]["kind"] == "DPOPipeline"]
    return reasons if last in reasons else None


async def test_a_judge_that_never_recovers_fails_its_stage_and_the_pipeline_says_which(
        cluster: FakeCluster, kubelet: StandInKubelet, tmp_path: Path) -> None:
    """The judge stage's real process meets 500s forever (after 20 good answers, which prove the
    API key reached it from the Secret through secretKeyRef): its retries run out, it exits 1,
    its DPOJob has no restart left, and the pipeline fails with a condition naming the stage."""
    judge = TinyJudge(api_key="sekret", hang_s=2.0).start()
    try:
        judge.fail("500", None, after=20)
        await cluster.create("Secret", {"apiVersion": "v1", "kind": "Secret",
                                        "metadata": {"name": "judge-key", "namespace": NS},
                                        "data": {"token": base64.b64encode(b"sekret").decode()}})
        model_dir, task = build_tiny(tmp_path / "artifacts")
        doc = pipeline_manifest(
            tmp_path, model_dir, None, task.prompts_uri, None, rounds=1, name="sour",
            judge=llm_judge(judge.url, maxRetries=1, apiKeySecret={"name": "judge-key", "key": "token"}),
            runPolicy={"maxRestarts": 0})
        await cluster.create_pipeline("sour", doc["spec"])
        st = await eventually(lambda: _until(cluster, kubelet, "sour", "Failed"), timeout=600, interval=0.2)
    finally:
        judge.stop()
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "StageFailed", failed
    assert "stage r1-judge" in failed["message"] and "MaxRestartsExceeded" in failed["message"], failed
    assert st["currentJob"] == "sour-r1-judge" and not st.get("results")
    generate = await cluster.get("DPOJob", "sour-r1-generate")
    assert generate["status"]["phase"] == "Succeeded" and generate["status"]["result"]["prompts"] > 0
    assert await cluster.get("DPOJob", "sour-r1-train") is None
    assert judge.state.by_kind["401"] == 0 and judge.state.answered >= 20 and judge.state.by_kind["500"] > 0
    cm = await cluster.get("ConfigMap", "sour-r1-judge-0-config")
    assert "sekret" not in str(cm)
