"""status.result: rank 0's termination message, checked, copied into a succeeded DPOJob.

Pure parts (what is accepted, what is refused and why), the builders' side (the env points at
the termination log; the judge's API key arrives by secretKeyRef and nowhere else), and real
kopf on kmock with the test playing the kubelet's part (a Pod object whose container terminated
with a message), since no kubelet runs here.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from kubedpo_operator.api import parse_spec
from kubedpo_operator.children import build_config_map, build_job
from kubedpo_operator.gang import JOB_NAME_LABEL
from kubedpo_operator.settings import OperatorSettings
from kubedpo_operator.task_result import INDEX_KEY, BadResult, parse_result, rank0_message, result_patch
from tests.operator.conftest import NS, eventually, minimal_spec

JUDGE_RESULT = {"prompts": 64, "pairs": 50, "ties": 10, "unparseable": 4, "errors": {"429": 3},
                "winRates": {"vsInitial": 0.75}, "outputUri": "s3://runs/r1/judge/"}


def pod(job: str, index: int, code: int | None, message: str | None = None, name: str | None = None) -> dict:
    state: dict[str, Any] = {"running": {}} if code is None else {"terminated": {"exitCode": code}}
    if message is not None:
        state["terminated"]["message"] = message
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name or f"{job}-{index}", "namespace": NS,
                         "labels": {JOB_NAME_LABEL: job, INDEX_KEY: str(index)}},
            "status": {"containerStatuses": [{"name": "trainer", "state": state}]}}


def test_a_result_of_numbers_strings_and_maps_of_them_is_kept_as_is() -> None:
    assert parse_result(json.dumps(JUDGE_RESULT)) == JUDGE_RESULT


@pytest.mark.parametrize(("text", "why"), [
    ('{"loss": NaN}', "NaN is not a finite number"),
    ('{"winRates": {"vsInitial": Infinity}}', "Infinity is not a finite number"),
    ('{"loss": 1e999}', "loss: inf is not a finite number"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"loss": 0.5', "not JSON"),
    ('{"nested": {"deeper": {"x": 1}}}', "nested.deeper: dict is not a number or a string"),
    ('{"rows": [1, 2]}', "rows: list is not a number or a string"),
    (json.dumps({"k": "x" * 5000}), "bytes (a result holds at most 4096)"),
    (json.dumps({"k": "x" * 2000}), "k: a string of 2000 characters"),
])
def test_bad_results_are_refused_saying_why(text: str, why: str) -> None:
    with pytest.raises(BadResult, match="^.*" + why.replace("(", r"\(").replace(")", r"\)")):
        parse_result(text)


def test_only_index_0s_successful_trainer_container_counts() -> None:
    pods = [pod("j-0", 1, 0, '{"who": 1}'), pod("j-0", 0, 137, '{"who": "failed try"}', name="j-0-0-a"),
            pod("other-0", 0, 0, '{"who": "other job"}'), pod("j-0", 0, 0, '{"who": 0}')]
    assert rank0_message(pods, "j-0", JOB_NAME_LABEL) == '{"who": 0}'
    assert rank0_message(pods[:3], "j-0", JOB_NAME_LABEL) is None
    assert rank0_message([pod("j-0", 0, None)], "j-0", JOB_NAME_LABEL) is None


def test_result_patch_sets_result_or_a_false_condition_and_nothing_without_a_message() -> None:
    now = "2026-12-01T00:00:00Z"
    assert result_patch([pod("j-0", 0, 0, '{"pairs": 3}')], "j-0", JOB_NAME_LABEL, [], now) == {"result": {"pairs": 3}}
    assert result_patch([pod("j-0", 0, 0)], "j-0", JOB_NAME_LABEL, [], now) == {}
    bad = result_patch([pod("j-0", 0, 0, '{"loss": NaN}')], "j-0", JOB_NAME_LABEL, [{"type": "Succeeded"}], now, 4)
    assert [c["type"] for c in bad["conditions"]] == ["Succeeded", "ResultAvailable"]
    cond = bad["conditions"][1]
    assert cond["status"] == "False" and cond["reason"] == "ResultRefused" and "NaN" in cond["message"]
    assert cond["observedGeneration"] == 4


def test_the_trainer_writes_its_result_to_the_termination_log() -> None:
    job = build_job("j", NS, "uid", parse_spec(minimal_spec()), 0, OperatorSettings())
    c = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBEDPO_RESULT_FILE"]["value"] == c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "File"  # not FallbackToLogsOnError: a log tail is no result
    assert "KUBEDPO_JUDGE_API_KEY" not in env


def test_the_judges_api_key_reaches_the_pod_only_by_secret_key_ref() -> None:
    spec = parse_spec(minimal_spec(task="judge", judge={
        "kind": "llm", "generations": "s3://runs/r1/generations/",
        "llm": {"url": "http://judge:8000/v1", "model": "m", "apiKeySecret": {"name": "judge-key", "key": "token"}}}))
    job = build_job("j", NS, "uid", spec, 0, OperatorSettings())
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEDPO_JUDGE_API_KEY"] == {"name": "KUBEDPO_JUDGE_API_KEY", "valueFrom": {
        "secretKeyRef": {"name": "judge-key", "key": "token"}}}
    config = yaml.safe_load(build_config_map("j", NS, "uid", spec, 0)["data"]["config.yaml"])
    assert config["judge"]["llm"]["apiKeySecret"] == {"name": "judge-key", "key": "token"}  # a reference, no value


async def test_a_succeeded_dpojob_gets_rank_0s_result(cluster: Any, operator: Any) -> None:
    await operator.start()
    await cluster.create_dpojob("res", minimal_spec(workers=2))
    await eventually(lambda: cluster.get("Job", "res-0"))
    await cluster.set_job("res-0", active=2)
    await eventually(lambda: _phase(cluster, "res", "Running"))
    await cluster.create("Pod", pod("res-0", 1, 0, '{"who": "rank 1 writes none; ignored"}'))
    await cluster.create("Pod", pod("res-0", 0, 0, json.dumps(JUDGE_RESULT)))
    await cluster.set_job("res-0", succeeded=2, condition="Complete")
    st = await eventually(lambda: _phase(cluster, "res", "Succeeded"))
    assert st["result"] == JUDGE_RESULT


async def test_a_refused_result_is_said_in_a_condition_and_not_stored(cluster: Any, operator: Any) -> None:
    await operator.start()
    await cluster.create_dpojob("bad", minimal_spec())
    await eventually(lambda: cluster.get("Job", "bad-0"))
    await cluster.create("Pod", pod("bad-0", 0, 0, '{"loss": Infinity}'))
    await cluster.set_job("bad-0", succeeded=1, condition="Complete")
    st = await eventually(lambda: _phase(cluster, "bad", "Succeeded"))
    assert "result" not in st
    cond = next(c for c in st["conditions"] if c["type"] == "ResultAvailable")
    assert cond["status"] == "False" and "Infinity is not a finite number" in cond["message"]


async def _phase(cluster: Any, name: str, phase: str) -> dict | None:
    st = await cluster.status(name)
    return st if st.get("phase") == phase else None
