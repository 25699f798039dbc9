"""API faults injected with kmock reactions: the operator recovers and converges, no duplicates."""

from __future__ import annotations

import json
from typing import Any

import kmock as kmocklib

from tests.operator.conftest import eventually, minimal_spec


class _first:
    """A kmock filter matching the first n requests of a kind (then the emulator serves as usual)."""

    def __init__(self, n: int, method: str, path_suffix: str, watch: bool = False) -> None:
        self.n, self.method, self.suffix, self.watch, self.seen = n, method, path_suffix, watch, 0

    def __call__(self, req: Any) -> bool:
        if req.method != self.method or not req.url.path.endswith(self.suffix):
            return False
        if self.watch != (req.params.get("watch") == "true"):
            return False
        self.seen += 1
        return self.seen <= self.n

    @property
    def injected(self) -> bool:
        return self.seen >= self.n


async def test_500s_on_child_creation_converge_without_duplicates(cluster, operator, kmock):
    jobs, services = _first(2, "POST", "/jobs"), _first(1, "POST", "/services")
    kmock[jobs] << kmocklib.KubernetesError(status=500, reason="InternalError", message="boom")
    kmock[services] << kmocklib.KubernetesError(status=503, reason="ServiceUnavailable")
    await operator.start()
    await cluster.create_dpojob("faulty", minimal_spec(workers=2))
    job = await eventually(lambda: cluster.get("Job", "faulty-0"))
    await cluster.set_job("faulty-0", active=2)

    async def running():
        return (await cluster.status("faulty")).get("phase") == "Running"

    await eventually(running)
    assert [j["metadata"]["name"] for j in await cluster.list("Job")] == [job["metadata"]["name"]]
    assert await cluster.get("Service", "faulty-0") is not None
    # A 500 after the write landed (ambiguous failure) is followed by a read, not a second create.
    assert jobs.injected and services.injected
    assert cluster.creates("Job") == 1


async def test_410_gone_on_the_watch_relists_and_converges(cluster, operator, kmock):
    gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                         "code": 410, "reason": "Expired", "message": "too old resource version"}}
    watches = _first(2, "GET", "/dpojobs", watch=True)
    kmock[watches] << (json.dumps(gone) + "\n").encode()
    await operator.start()
    await cluster.create_dpojob("gone", minimal_spec())
    await eventually(lambda: cluster.get("Job", "gone-0"), timeout=15)
    await cluster.set_job("gone-0", succeeded=1, condition="Complete")

    async def done():
        return (await cluster.status("gone")).get("phase") == "Succeeded"

    await eventually(done, timeout=15)
    assert watches.injected and cluster.creates("Job") == 1


async def test_status_patch_errors_are_retried(cluster, operator, kmock):
    patches = _first(3, "PATCH", "/dpojobs/st/status")
    kmock[patches] << kmocklib.KubernetesError(status=500, reason="InternalError")
    await operator.start()
    await cluster.create_dpojob("st", minimal_spec())
    await eventually(lambda: cluster.get("Job", "st-0"))
    await cluster.set_job("st-0", active=1)

    async def running():
        return (await cluster.status("st")).get("phase") == "Running"

    await eventually(running)
    assert patches.injected and cluster.creates("Job") == 1
