"""Issue 5, must-show 3: `kubectl apply` to a trained model in S3, with no cluster.

Real parts: kopf running the operator, kmock's KubernetesEmulator as the API server, SeaweedFS
as S3, the trainer as real 2-worker process groups (gloo), the operator reading rank 0's
metrics endpoint. Mocked, because it cannot run here: the Job controller and kubelet
(tests/support/kubelet.py runs each pod's command and env as local processes).

The manifest is examples/tiny-cpu.yaml, with only the bucket, the S3 endpoint and the metrics
port changed, so the example users apply is what is tested. Credentials travel the way the
example says: a Secret referenced by envFrom; the test process's own AWS_* variables are
removed from the pods' environment, and the ConfigMap must not contain them.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedpo_trainer import storage
from kubedpo_trainer.tiny import write_preference_task
from tests.operator.conftest import NS, FakeCluster, eventually
from tests.support.kubelet import StandInKubelet
from tests.support.runs import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


@dataclass
class EndToEnd:
    cluster: FakeCluster
    kubelet: StandInKubelet
    s3: Any
    task: asyncio.Task[None]

    def manifest(self, **training: Any) -> dict[str, Any]:
        """examples/tiny-cpu.yaml pointed at this test's bucket and store."""
        text = (REPO / "examples" / "tiny-cpu.yaml").read_text().replace("s3://kubedpo-demo/", self.s3.uri())
        doc = yaml.safe_load(text)
        spec = doc["spec"]
        spec["s3"]["endpointUrl"] = self.s3.endpoint
        spec["metrics"] = {"port": free_port()}  # pods share one host here
        spec["training"].update(training)
        return doc

    async def apply(self, doc: dict[str, Any]) -> str:
        name = doc["metadata"]["name"]
        await self.cluster.create_dpojob(name, doc["spec"])
        return name

    async def phase(self, name: str, phase: str) -> dict[str, Any] | None:
        assert not self.task.done(), self.task.exception()  # the stand-in kubelet must not have crashed
        st = await self.cluster.status(name)
        if st.get("phase") == "Failed" and phase != "Failed":
            raise AssertionError(f"{name} failed: {st.get('message')}\n{self._logs()}")
        return st if st.get("phase") == phase else None

    def _logs(self) -> str:
        return "\n".join(self.kubelet.logs(j)[-4000:] for j in self.kubelet.jobs)

    def objects(self, prefix: str) -> set[str]:
        bucket, _, key = prefix.removeprefix("s3://").partition("/")
        out = self.s3.client().list_objects_v2(Bucket=bucket, Prefix=key)
        return {o["Key"].removeprefix(key) for o in out.get("Contents", [])}


@pytest.fixture
async def e2e(cluster: FakeCluster, operator: Any, s3: Any, tiny: Any, tmp_path: Path,
              seaweedfs: Any) -> AsyncIterator[EndToEnd]:
    train, evals = write_preference_task(tmp_path / "task", 1024, 64, seed=5, fmt="standard", shards=2)
    storage.upload_dir(tiny.model_dir, s3.uri("tiny-model/"))
    storage.upload_dir(train, s3.uri("prefs/train/"))
    storage.upload_dir(evals, s3.uri("prefs/eval/"))
    creds = {k: v for k, v in seaweedfs.env().items() if k != "AWS_ENDPOINT_URL"}
    await cluster.create("Secret", {"apiVersion": "v1", "kind": "Secret",
                                    "metadata": {"name": "s3-credentials", "namespace": NS},
                                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in creds.items()}})
    op = await operator.start(metrics_url_template="http://127.0.0.1:{port}/metrics")
    pod_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    kubelet = StandInKubelet(cluster, tmp_path / "nodes", op.memo.settings, NS,
                             base_env={**pod_env, "OMP_NUM_THREADS": "1"})
    task = asyncio.create_task(kubelet.run())
    try:
        yield EndToEnd(cluster, kubelet, s3, task)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_apply_to_trained_model_in_s3(e2e: EndToEnd) -> None:
    doc = e2e.manifest()
    name = await e2e.apply(doc)
    cm = await eventually(lambda: e2e.cluster.get("ConfigMap", f"{name}-0-config"))
    assert "AWS_SECRET" not in yaml.safe_dump(cm) and e2e.s3.server.secret_key not in yaml.safe_dump(cm)
    await eventually(lambda: e2e.phase(name, "Running"), timeout=30)
    st = await eventually(lambda: e2e.phase(name, "Succeeded"), timeout=180)

    steps = doc["spec"]["training"]["maxSteps"]
    progress = st["progress"]
    assert 0 < progress["step"] <= steps and progress["totalSteps"] == steps
    assert progress["loss"] > 0 and 0 <= progress["rewardAccuracy"] <= 1
    assert st["restarts"] == 0 and st["attempt"] == 0
    assert st["lastCheckpoint"]["uri"].startswith(doc["spec"]["checkpoint"]["uri"])
    out = e2e.objects(doc["spec"]["output"]["uri"])
    assert {"model.safetensors", "config.json", "kubedpo_summary.json"} <= out, out
    assert any(k.startswith("step-000020/") for k in e2e.objects(doc["spec"]["checkpoint"]["uri"]))


async def test_worker_killed_mid_run_restarts_the_gang_and_resumes(e2e: EndToEnd) -> None:
    doc = e2e.manifest(maxSteps=200, epochs=4)  # long enough that the kill lands between checkpoints
    name = await e2e.apply(doc)
    await eventually(lambda: e2e.phase(name, "Running"), timeout=30)
    st = await eventually(lambda: _checkpointed(e2e, name), timeout=120)
    killed_after = st["lastCheckpoint"]["step"]
    e2e.kubelet.kill(f"{name}-0", 1)  # worker 1 loses its node: SIGKILL, exit 137

    st = await eventually(lambda: e2e.phase(name, "Restarting") or _attempt(e2e, name, 1), timeout=60)
    assert st["restarts"] == 1
    st = await eventually(lambda: e2e.phase(name, "Succeeded"), timeout=240)
    assert st["restarts"] == 1 and st["attempt"] == 1 and killed_after < st["progress"]["step"] <= 200
    assert e2e.kubelet.pod(f"{name}-0", 1).exit_code == 137
    assert e2e.cluster.creates("Job") == 2  # one gang restart, no duplicates
    events = await eventually(lambda: _events_until(e2e, name, "Succeeded"))  # kopf posts events in the background
    assert [reason for reason, _ in events] == ["Created", "Running", "WorkerFailed", "Running", "Succeeded"], events
    assert "gang restart 1/2" in events[2][1] and events[3][1].startswith("attempt 1")

    attempt1 = e2e.kubelet.logs(f"{name}-1")
    assert "resumed from" in attempt1, attempt1[-3000:]
    resumed_step = int(attempt1.split("resumed from", 1)[1].split("(step ", 1)[1].split(")", 1)[0])
    assert resumed_step >= killed_after and resumed_step % 20 == 0  # status named a complete checkpoint
    assert "kubedpo_summary.json" in e2e.objects(doc["spec"]["output"]["uri"])


async def _checkpointed(e2e: EndToEnd, name: str) -> dict[str, Any] | None:
    st = await e2e.phase(name, "Running")
    return st if st and (st.get("lastCheckpoint") or {}).get("step") else None


async def _attempt(e2e: EndToEnd, name: str, attempt: int) -> dict[str, Any] | None:
    st = await e2e.cluster.status(name)
    return st if st.get("attempt") == attempt else None


async def _events_until(e2e: EndToEnd, name: str, last: str) -> list[tuple[str, str]] | None:
    """(reason, message) of the DPOJob's events, once the one with reason `last` was posted."""
    events = [(e["reason"], e["message"]) for e in await e2e.cluster.events(name)]
    return events if any(reason == last for reason, _ in events) else None
