"""Running only when every worker runs; otherwise Pending with the reason (issue 9 §3).

kmock runs no scheduler or kubelet: the tests write what they would (pod conditions, container
waiting states, the Job controller's FailedCreate event) and check the DPOJob says it.
"""

from __future__ import annotations

import json

import pytest

from kubedpo_operator.gang import all_ready, gang_problem
from kubedpo_operator.status import phase_reason
from tests.operator.conftest import NS, eventually, minimal_spec


def _pod(name: str, job: str, **status: object) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"batch.kubernetes.io/job-name": job}},
            "spec": {"containers": [{"name": "trainer", "image": "x"}]}, "status": status}


UNSCHEDULABLE = {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}
IMAGE_PULL = {"containerStatuses": [{"name": "trainer", "ready": False, "state": {"waiting": {
    "reason": "ImagePullBackOff", "message": "Back-off pulling image \"registry.example/trainer:nope\""}}}]}
MISSING_SECRET = {"containerStatuses": [{"name": "trainer", "ready": False, "state": {"waiting": {
    "reason": "CreateContainerConfigError", "message": "secret \"s3-credentials\" not found"}}}]}


@pytest.mark.parametrize(("status", "reason", "text"), [
    (UNSCHEDULABLE, "Unschedulable", "Insufficient nvidia.com/gpu"),
    (IMAGE_PULL, "ImagePullBackOff", "registry.example/trainer:nope"),
    (MISSING_SECRET, "CreateContainerConfigError", "s3-credentials"),
])
def test_gang_problem_from_pods(status: dict, reason: str, text: str) -> None:
    got = gang_problem([_pod("g-0-1", "g-0"), _pod("g-0-0", "g-0", **status)], [])
    assert got is not None and got[0] == reason and text in got[1] and "g-0-0" in got[1]


def test_gang_problem_from_failed_create_and_none_while_starting() -> None:
    event = {"type": "Warning", "reason": "FailedCreate", "lastTimestamp": "2026-01-01T00:00:00Z",
             "message": 'Error creating: pods "g-0-0-x" is forbidden: error looking up service account '
                        'team-a/trainer: serviceaccount "trainer" not found'}
    assert gang_problem([], [event]) == ("FailedCreate", f"the Job cannot create pods: {event['message']}")
    assert gang_problem([_pod("g-0-0", "g-0", phase="Pending")], []) is None
    job = {"spec": {"parallelism": 2}, "status": {"active": 2, "ready": 1}}
    assert not all_ready(job) and all_ready({**job, "status": {"active": 2, "ready": 2}})


async def test_pending_gang_is_pending_with_the_reason_until_all_run(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("pg", minimal_spec(workers=2))
    await eventually(lambda: cluster.get("Job", "pg-0"))
    await cluster.create("Pod", _pod("pg-0-0-a", "pg-0", phase="Running"))
    await cluster.create("Pod", _pod("pg-0-1-b", "pg-0", phase="Pending", **UNSCHEDULABLE))
    await cluster.set_job("pg-0", active=2, ready=1)  # both pods exist; one cannot be placed
    st = await eventually(lambda: _reason(cluster, "pg", "Pending", "Unschedulable"))
    assert "Insufficient nvidia.com/gpu" in st["message"] and "pg-0-1-b" in st["message"]
    events = await eventually(lambda: _events(cluster, "pg", "Unschedulable"))
    assert events[0]["type"] == "Warning"
    await cluster.patch("Pod", "pg-0-1-b", {"status": {"conditions": [{"type": "PodScheduled", "status": "True"}],
                                                       "phase": "Running"}})
    await cluster.set_job("pg-0", active=2, ready=2)
    st = await eventually(lambda: _reason(cluster, "pg", "Running", "Running"))
    json.dumps(st, allow_nan=False)


async def test_missing_service_account_is_reported_from_the_jobs_events(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("sa", minimal_spec(serviceAccountName="trainer"))
    await eventually(lambda: cluster.get("Job", "sa-0"))
    await cluster.create("Event", {  # what the Job controller posts when it cannot create the pods
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": "sa-0.1", "namespace": NS},
        "involvedObject": {"kind": "Job", "name": "sa-0", "namespace": NS, "apiVersion": "batch/v1"},
        "type": "Warning", "reason": "FailedCreate", "lastTimestamp": "2026-01-01T00:00:00Z",
        "message": 'Error creating: pods "sa-0-0-x" is forbidden: error looking up service account '
                   'team-a/trainer: serviceaccount "trainer" not found'})
    st = await eventually(lambda: _reason(cluster, "sa", "Pending", "FailedCreate"), timeout=15)
    assert 'serviceaccount "trainer" not found' in st["message"]


async def _reason(cluster, name: str, phase: str, reason: str) -> dict | None:
    st = await cluster.status(name)
    return st if st.get("phase") == phase and phase_reason(st) == reason else None


async def _events(cluster, name: str, reason: str) -> list[dict] | None:
    return [e for e in await cluster.events(name) if e["reason"] == reason] or None
