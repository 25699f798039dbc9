"""Real kopf against kmock: a DPOJob becomes children, and status follows the Job's state."""

from __future__ import annotations

from kubedpo_operator.api import parse_spec
from kubedpo_operator.children import build_children
from kubedpo_operator.settings import OperatorSettings
from kubedpo_operator.status import phase_reason
from tests.operator.conftest import NS, eventually, minimal_spec

SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp")


def _strip(obj: dict) -> dict:
    """The object as the operator wrote it: no status, no server-assigned metadata."""
    meta = {k: v for k, v in obj["metadata"].items() if k not in SERVER_FIELDS}
    return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": meta}


async def test_create_makes_exactly_the_built_children(cluster, operator):
    op = await operator.start()
    spec = minimal_spec(workers=2, gpusPerWorker=1)
    dpo = await cluster.create_dpojob("llama", spec)
    job = await eventually(lambda: cluster.get("Job", "llama-0"))
    expected = build_children("llama", NS, dpo["metadata"]["uid"], parse_spec(spec), 0, op.memo.settings)
    got = [await cluster.get(o["kind"], o["metadata"]["name"]) for o in expected]
    assert [_strip(g) for g in got[:2]] == expected[:2]
    assert _strip(job) == expected[2]
    assert await cluster.list("Job") == [job]
    status = await eventually(lambda: cluster.status("llama"))
    assert status["phase"] == "Pending" and status["attempt"] == 0 and status["restarts"] == 0
    assert OperatorSettings().default_image == job["spec"]["template"]["spec"]["containers"][0]["image"]


async def test_running_then_succeeded_with_events(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("ok", minimal_spec(workers=2))
    await eventually(lambda: cluster.get("Job", "ok-0"))
    await cluster.set_job("ok-0", active=2)
    await eventually(lambda: _phase(cluster, "ok", "Running"))
    await cluster.set_job("ok-0", succeeded=2, condition="Complete")
    st = await eventually(lambda: _phase(cluster, "ok", "Succeeded"))
    assert st["outputUri"] == "s3://runs/final/" and st["completionTime"]
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds == {"Created": "True", "Running": "False", "Suspended": "False", "Succeeded": "True",
                     "Failed": "False"}
    reasons = await eventually(lambda: _event_reasons(cluster, "ok", 3))
    assert reasons[:3] == ["Created", "Running", "Succeeded"]


async def test_failures_restart_the_gang_until_max_restarts(cluster, operator):
    op = await operator.start()
    await cluster.create_dpojob("flaky", minimal_spec(workers=2, runPolicy={"maxRestarts": 1}))
    await eventually(lambda: cluster.get("Job", "flaky-0"))
    await cluster.set_job("flaky-0", active=2)
    await eventually(lambda: _phase(cluster, "flaky", "Running"))
    await cluster.set_job("flaky-0", failed=1, condition="Failed", reason="BackoffLimitExceeded",
                          message="Job has reached the specified backoff limit")
    st = await eventually(lambda: _phase(cluster, "flaky", "Restarting"))
    assert st["restarts"] == 1 and st["attempt"] == 1
    job1 = await eventually(lambda: cluster.get("Job", "flaky-1"))
    assert job1["metadata"]["labels"]["kubedpo.io/attempt"] == "1"
    await eventually(lambda: _absent(cluster, "Job", "flaky-0"))
    assert await cluster.get("Service", "flaky-0") is None and await cluster.get("ConfigMap", "flaky-0-config") is None
    await cluster.set_job("flaky-1", active=2)
    await eventually(lambda: _phase(cluster, "flaky", "Running"))
    await cluster.set_job("flaky-1", failed=1, condition="Failed", reason="BackoffLimitExceeded")
    st = await eventually(lambda: _phase(cluster, "flaky", "Failed"))
    assert st["restarts"] == 1 and "maxRestarts=1" in st["message"]
    assert await cluster.get("Job", "flaky-2") is None
    assert cluster.creates("Job") == 2
    reg = op.memo.metrics.registry  # the operator's own metrics say why
    assert reg.get_sample_value("kubedpo_operator_restarts_total", {"reason": "WorkerFailed"}) == 1
    assert reg.get_sample_value("kubedpo_operator_jobs", {"phase": "Failed"}) == 1


async def test_preemption_restarts_without_counting(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("pre", minimal_spec(runPolicy={"maxRestarts": 0}))
    await eventually(lambda: cluster.get("Job", "pre-0"))
    await cluster.set_job("pre-0", failed=1, condition="Failed", reason="PodFailurePolicy",
                          message="Container trainer for pod team-a/pre-0-0-x failed with exit code 75 "
                                  "matching FailJob rule at index 2")
    await eventually(lambda: cluster.get("Job", "pre-1"))
    st = await cluster.status("pre")
    assert st["restarts"] == 0 and st["preemptions"] == 1 and st["attempt"] == 1


async def test_config_error_exit_code_fails_without_retry(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("cfg", minimal_spec(runPolicy={"maxRestarts": 5}))
    await eventually(lambda: cluster.get("Job", "cfg-0"))
    await cluster.set_job("cfg-0", failed=1, condition="Failed", reason="PodFailurePolicy",
                          message="Container trainer for pod team-a/cfg-0-0-x failed with exit code 2 "
                                  "matching FailJob rule at index 1")
    st = await eventually(lambda: _phase(cluster, "cfg", "Failed"))
    assert st["restarts"] == 0 and "code 2" in st["message"]
    assert _cond(st, "Failed")["reason"] == "ConfigError"
    assert cluster.creates("Job") == 1


async def test_invalid_spec_fails_naming_the_field(cluster, operator):
    await operator.start()
    spec = minimal_spec(training={"loss": "simpo"})
    spec["model"]["referenceUri"] = "s3://models/ref/"
    await cluster.create_dpojob("bad", spec)
    st = await eventually(lambda: _phase(cluster, "bad", "Failed"))
    cond = _cond(st, "Failed")
    assert cond["reason"] == "InvalidSpec" and cond["message"].startswith("spec.training.loss")
    events = await eventually(lambda: cluster.events("bad"))
    assert events[0]["type"] == "Warning" and "spec.training.loss" in events[0]["message"]
    assert cluster.creates("Job") == cluster.creates("ConfigMap") == 0


async def test_suspend_and_resume(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("sus", minimal_spec())
    await eventually(lambda: cluster.get("Job", "sus-0"))
    await cluster.set_job("sus-0", active=1)
    await eventually(lambda: _phase(cluster, "sus", "Running"))
    await cluster.patch("DPOJob", "sus", {"metadata": {"generation": 2}, "spec": {"runPolicy": {"suspend": True}}})
    await eventually(lambda: _phase(cluster, "sus", "Suspended"))
    assert (await cluster.get("Job", "sus-0"))["spec"]["suspend"] is True
    await cluster.set_job("sus-0", active=0, condition="Suspended")
    await cluster.patch("DPOJob", "sus", {"metadata": {"generation": 3}, "spec": {"runPolicy": {"suspend": False}}})
    await eventually(lambda: _job_suspend(cluster, "sus-0", False))
    await cluster.set_job("sus-0", active=1)
    st = await eventually(lambda: _phase(cluster, "sus", "Running"))
    assert st["observedGeneration"] == 3 and st["restarts"] == 0


async def test_changing_workers_restarts_the_gang_at_the_new_size_without_counting(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("grow", minimal_spec(workers=2))
    await eventually(lambda: cluster.get("Job", "grow-0"))
    await cluster.set_job("grow-0", active=2)
    await eventually(lambda: _phase(cluster, "grow", "Running"))
    await cluster.patch("DPOJob", "grow", {"metadata": {"generation": 2}, "spec": {"workers": 1}})
    job = await eventually(lambda: cluster.get("Job", "grow-1"))
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 1
    assert await cluster.get("Job", "grow-0") is None
    st = await cluster.status("grow")
    assert st["attempt"] == 1 and st["restarts"] == 0 and st["preemptions"] == 0
    assert phase_reason(st) == "WorkersChanged" and "2 -> 1" in st["message"]
    assert _cond(st, "Running")["status"] == "False" and "2 -> 1" in _cond(st, "Running")["message"]
    await cluster.set_job("grow-1", active=1)
    await eventually(lambda: _phase(cluster, "grow", "Running"))


async def test_kueue_queue_label_and_suspended_creation(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("q", minimal_spec(runPolicy={"queueName": "team-a-gpus"}))
    job = await eventually(lambda: cluster.get("Job", "q-0"))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert job["spec"]["suspend"] is True
    await cluster.set_job("q-0", condition="Suspended")
    st = await eventually(lambda: _phase(cluster, "q", "Pending"))
    await eventually(lambda: _reason_is(cluster, "q", "Pending", "Queued"))
    await cluster.patch("Job", "q-0", {"spec": {"suspend": False}})  # Kueue admits the gang
    await cluster.set_job("q-0", active=1)
    st = await eventually(lambda: _phase(cluster, "q", "Running"))
    assert st["attempt"] == 0


async def test_ttl_deletes_the_finished_dpojob(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("ttl", minimal_spec(runPolicy={"ttlSecondsAfterFinished": 0}))
    await eventually(lambda: cluster.get("Job", "ttl-0"))
    await cluster.set_job("ttl-0", succeeded=1, condition="Complete")
    await eventually(lambda: _absent(cluster, "DPOJob", "ttl"))


async def test_operator_restart_adopts_children_without_duplicates(cluster, operator):
    first = await operator.start()
    await cluster.create_dpojob("adopt", minimal_spec(workers=2))
    await eventually(lambda: cluster.get("Job", "adopt-0"))
    await cluster.set_job("adopt-0", active=2)
    await eventually(lambda: _phase(cluster, "adopt", "Running"))
    await first.shutdown()
    await operator.start()
    await cluster.set_job("adopt-0", failed=1, condition="Failed", reason="BackoffLimitExceeded")
    await eventually(lambda: cluster.get("Job", "adopt-1"))
    await cluster.set_job("adopt-1", succeeded=2, condition="Complete")
    st = await eventually(lambda: _phase(cluster, "adopt", "Succeeded"))
    assert st["restarts"] == 1
    assert (cluster.creates("Job"), cluster.creates("Service"), cluster.creates("ConfigMap")) == (2, 2, 2)


# --- helpers --------------------------------------------------------------------------------


def _cond(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


async def _phase(cluster, name: str, phase: str) -> dict | None:
    st = await cluster.status(name)
    return st if st.get("phase") == phase else None


async def _reason_is(cluster, name: str, phase: str, reason: str) -> bool:
    st = await cluster.status(name)
    return st.get("phase") == phase and phase_reason(st) == reason


async def _absent(cluster, kind: str, name: str) -> bool:
    return await cluster.get(kind, name) is None


async def _job_suspend(cluster, name: str, value: bool) -> bool:
    job = await cluster.get("Job", name)
    return job is not None and job["spec"].get("suspend") is value


async def _event_reasons(cluster, name: str, at_least: int) -> list[str] | None:
    events = await cluster.events(name)
    return [e["reason"] for e in events] if len(events) >= at_least else None


async def test_attempt_failing_before_it_ran_still_restarts(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("crashy", minimal_spec(runPolicy={"maxRestarts": 2}))
    for attempt in (0, 1):
        await eventually(lambda a=attempt: cluster.get("Job", f"crashy-{a}"))
        await cluster.set_job(f"crashy-{attempt}", failed=1, condition="Failed", reason="BackoffLimitExceeded")
    await eventually(lambda: cluster.get("Job", "crashy-2"))
    st = await cluster.status("crashy")
    assert (st["phase"], st["restarts"], st["attempt"]) == ("Restarting", 2, 2)
