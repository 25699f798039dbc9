"""Status never lies about which run it reports (issue 9 §3), real kopf on kmock.

The emulator runs no garbage collector: tests play it (or deliberately don't) to reproduce
what a real cluster shows between a deletion and the collector's pass.
"""

from __future__ import annotations

from typing import Any

import kmock as kmocklib

from tests.operator.conftest import NS, eventually, minimal_spec


class FailFirst:
    """Refuses (500) the first n requests of a method and path, before the emulator acts on them."""

    def __init__(self, n: int, method: str, path_suffix: str) -> None:
        self.left, self.method, self.suffix = n, method, path_suffix

    def __call__(self, req: Any) -> Exception | None:
        if req.method != self.method or not req.url.path.endswith(self.suffix) or self.left <= 0:
            return None
        self.left -= 1
        return kmocklib.KubernetesError(status=500, reason="InternalError", message="injected")


def _cond(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


async def _phase(cluster, name: str, phase: str) -> dict | None:
    st = await cluster.status(name)
    return st if st.get("phase") == phase else None


async def _absent(cluster, kind: str, name: str) -> bool:
    return await cluster.get(kind, name) is None


def _owner_uid(obj: dict) -> str:
    return obj["metadata"]["ownerReferences"][0]["uid"]


async def test_recreated_dpojob_never_adopts_the_old_runs_children(cluster, operator):
    await operator.start()
    old = await cluster.create_dpojob("re", minimal_spec())
    await eventually(lambda: cluster.get("Job", "re-0"))
    await cluster.set_job("re-0", succeeded=1, condition="Complete")
    await eventually(lambda: _phase(cluster, "re", "Succeeded"))
    await cluster.delete("DPOJob", "re")  # the collector has not removed re-0 yet
    await eventually(lambda: _absent(cluster, "DPOJob", "re"))  # kopf released its finalizer
    new = await cluster.create_dpojob("re", minimal_spec(training={"beta": 0.2}))
    assert new["metadata"]["uid"] != old["metadata"]["uid"]

    async def waiting() -> dict | None:
        st = await cluster.status("re")
        c = _cond(st, "Created")
        return st if c and c["status"] == "False" and c["reason"] == "ForeignChildExists" else None

    st = await eventually(waiting)
    assert st["phase"] == "Pending" and "outputUri" not in st  # the old run's success is not this one's
    assert old["metadata"]["uid"] in _cond(st, "Created")["message"]
    events = await eventually(lambda: _warning(cluster, "re", "ForeignChildExists"))
    assert "garbage collector" in events[0]["message"]
    for kind, child in (("Job", "re-0"), ("Service", "re-0"), ("ConfigMap", "re-0-config")):  # the GC's pass
        await cluster.delete(kind, child)
    job = await eventually(lambda: _owned(cluster, "Job", "re-0", new["metadata"]["uid"]))
    cm = await cluster.get("ConfigMap", "re-0-config")
    assert _owner_uid(cm) == new["metadata"]["uid"] and "beta: 0.2" in cm["data"]["config.yaml"]
    assert "conditions" not in (job.get("status") or {})
    assert (await cluster.status("re"))["phase"] == "Pending"


async def test_lost_status_rediscovers_the_live_attempt(cluster, operator):
    await operator.start()
    dpo = await cluster.create_dpojob("lost", minimal_spec(runPolicy={"maxRestarts": 3}))
    await eventually(lambda: cluster.get("Job", "lost-0"))
    await cluster.set_job("lost-0", failed=1, condition="Failed", reason="BackoffLimitExceeded")
    await eventually(lambda: cluster.get("Job", "lost-1"))
    await eventually(lambda: _absent(cluster, "Job", "lost-0"))
    await cluster.set_job("lost-1", active=1)
    await eventually(lambda: _phase(cluster, "lost", "Running"))
    # A restore without status: same object (uid), no status, no kopf annotations.
    await cluster.delete("DPOJob", "lost")
    await eventually(lambda: _absent(cluster, "DPOJob", "lost"))
    restored = {**dpo, "metadata": {k: v for k, v in dpo["metadata"].items() if k != "annotations"}}
    restored.pop("status", None)
    code, out = await cluster._call("post", f"/apis/kubedpo.io/v1alpha1/namespaces/{NS}/dpojobs", json=restored)
    assert code in (200, 201), out
    st = await eventually(lambda: _phase(cluster, "lost", "Running"))
    assert (st["attempt"], st["restarts"]) == (1, 1)
    assert await cluster.get("Job", "lost-0") is None
    assert cluster.creates("Job") == 2  # never an attempt 0 next to the live attempt 1


async def test_suspend_converges_on_the_current_job(cluster, operator):
    """The race's outcome (runPolicy.suspend true, the current Job running) is repaired by sync."""
    await operator.start()
    await cluster.create_dpojob("sr", minimal_spec())
    await eventually(lambda: cluster.get("Job", "sr-0"))
    await cluster.set_job("sr-0", active=1)
    await eventually(lambda: _phase(cluster, "sr", "Running"))
    await cluster.patch("DPOJob", "sr", {"metadata": {"generation": 2}, "spec": {"runPolicy": {"suspend": True}}})
    await eventually(lambda: _phase(cluster, "sr", "Suspended"))
    await eventually(lambda: _job_suspend(cluster, "sr-0", True))
    await cluster.patch("Job", "sr-0", {"spec": {"suspend": False}})  # e.g. a stale write to the Job
    await eventually(lambda: _job_suspend(cluster, "sr-0", True))
    await cluster.patch("DPOJob", "sr", {"metadata": {"generation": 3}, "spec": {"runPolicy": {"suspend": False}}})
    await eventually(lambda: _job_suspend(cluster, "sr-0", False))


class DelayFirst:
    """Holds the first matching request for `seconds` once armed (then the emulator applies it)."""

    def __init__(self, method: str, path_suffix: str, seconds: float) -> None:
        self.method, self.suffix, self.seconds = method, path_suffix, seconds
        self.armed, self.done = False, False

    def __call__(self, req: Any) -> float | None:
        if not self.armed or self.done or req.method != self.method or not req.url.path.endswith(self.suffix):
            return None
        self.done = True
        return self.seconds


async def test_suspend_arriving_during_a_gang_restart_converges(cluster, operator, kmock):
    """The bug's order: the restart read the spec before the suspend, and the suspend handler's
    body predates the restart (it patches the old attempt's Job, already gone). The restart's
    status write is held so that the suspend lands between the two."""
    hold = DelayFirst("PATCH", "/dpojobs/race/status", 1.5)
    kmock.faults.append(hold)
    await operator.start()
    await cluster.create_dpojob("race", minimal_spec(runPolicy={"maxRestarts": 2}))
    await eventually(lambda: cluster.get("Job", "race-0"))
    hold.armed = True
    await cluster.set_job("race-0", failed=1, condition="Failed", reason="BackoffLimitExceeded")
    await eventually(lambda: hold.done)
    await cluster.patch("DPOJob", "race", {"metadata": {"generation": 2},
                                           "spec": {"runPolicy": {"suspend": True}}})
    await eventually(lambda: cluster.get("Job", "race-1"))
    await eventually(lambda: _job_suspend(cluster, "race-1", True))
    st = await eventually(lambda: _phase(cluster, "race", "Suspended"))
    assert st["attempt"] == 1 and st["restarts"] == 1


async def test_failed_delete_of_an_old_attempt_is_retried_until_gone(cluster, operator, kmock):
    fault = FailFirst(3, "DELETE", "/jobs/fd-0")
    kmock.faults.append(fault)
    await operator.start()
    await cluster.create_dpojob("fd", minimal_spec(runPolicy={"maxRestarts": 2}))
    await eventually(lambda: cluster.get("Job", "fd-0"))
    await cluster.set_job("fd-0", failed=1, condition="Failed", reason="BackoffLimitExceeded")
    await eventually(lambda: _absent(cluster, "Job", "fd-0"), timeout=15)
    assert fault.left == 0
    await eventually(lambda: cluster.get("Job", "fd-1"))  # only once the old gang is gone
    st = await cluster.status("fd")
    assert (st["attempt"], st["restarts"]) == (1, 1)
    assert await cluster.get("Service", "fd-0") is None and await cluster.get("ConfigMap", "fd-0-config") is None


async def test_a_user_deleting_the_running_job_fails_that_attempt(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("ud", minimal_spec(runPolicy={"maxRestarts": 1}))
    await eventually(lambda: cluster.get("Job", "ud-0"))
    await cluster.set_job("ud-0", active=1)
    await eventually(lambda: _phase(cluster, "ud", "Running"))
    await cluster.delete("Job", "ud-0")
    await eventually(lambda: cluster.get("Job", "ud-1"))
    st = await cluster.status("ud")
    assert (st["phase"], st["attempt"], st["restarts"]) == ("Restarting", 1, 1)
    assert "deleted outside kubedpo" in st["message"]
    await cluster.set_job("ud-1", active=1)
    await eventually(lambda: _phase(cluster, "ud", "Running"))
    await cluster.delete("Job", "ud-1")
    st = await eventually(lambda: _phase(cluster, "ud", "Failed"))
    assert st["restarts"] == 1 and _cond(st, "Failed")["reason"] == "MaxRestartsExceeded"
    assert cluster.creates("Job") == 2


async def _owned(cluster, kind: str, name: str, uid: str) -> dict | None:
    obj = await cluster.get(kind, name)
    return obj if obj and _owner_uid(obj) == uid else None


async def _job_suspend(cluster, name: str, value: bool) -> bool:
    job = await cluster.get("Job", name)
    return job is not None and job["spec"].get("suspend") is value


async def _warning(cluster, name: str, reason: str) -> list[dict] | None:
    return [e for e in await cluster.events(name) if e["reason"] == reason and e["type"] == "Warning"] or None
