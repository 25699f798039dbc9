"""`kubedpo operator` as the Helm chart runs it: a real process, kubeconfig login, default kopf
settings, JSON logs, the liveness and metrics endpoints, and an active/standby pair by peering.

The API server is kmock's emulator (real HTTP); nothing in the operator is patched.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock as kmock_lib
import pytest
import yaml

from tests.operator.conftest import VERBS, FakeCluster, eventually, minimal_spec
from tests.support.runs import free_port

pytestmark = pytest.mark.slow
PEERING = "kubedpo"
# A process's start (imports, login, first watches) under a loaded CI machine: generous, it only
# bounds how long a broken start takes to fail.
START_S = 120
PEERINGS = "/apis/kopf.dev/v1/clusterkopfpeerings"


@dataclass
class OperatorProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    health: str
    metrics: str

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def get(self, url: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, resp.read().decode()
        except OSError:
            return 0, ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def stop(self) -> int:
        """SIGTERM and wait off the event loop: the emulator must keep serving kopf's goodbyes."""
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, START_S)


@pytest.fixture
def spawn(kmock: Any, cluster: FakeCluster, tmp_path: Path) -> Iterator[Any]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "dev", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "dev"}}],
    }))
    started: list[OperatorProcess] = []

    def start(name: str, **env: str) -> OperatorProcess:
        health, metrics = free_port(), free_port()
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubedpo_operator", "operator", "--json-logs"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115 - owned by the child
            env={**os.environ, "KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": "",
                 "KUBEDPO_LIVENESS_ENDPOINT": f"http://127.0.0.1:{health}/healthz",
                 "KUBEDPO_OPERATOR_METRICS_PORT": str(metrics), "KUBEDPO_PROGRESS_INTERVAL_S": "1", **env})
        op = OperatorProcess(proc, log, f"http://127.0.0.1:{health}/healthz", f"http://127.0.0.1:{metrics}/metrics")
        started.append(op)
        return op

    yield start
    for op in started:
        op.kill()


async def test_operator_process_serves_health_metrics_and_json_logs(spawn: Any, cluster: FakeCluster) -> None:
    op = spawn("solo")
    await eventually(lambda: op.get(op.health)[0] == 200, timeout=START_S)
    await cluster.create_dpojob("proc", minimal_spec(workers=2))
    job = await eventually(lambda: cluster.get("Job", "proc-0"), timeout=30)
    assert job["spec"]["completions"] == 2
    await cluster.set_job("proc-0", active=2)
    await eventually(lambda: _phase(cluster, "proc", "Running"), timeout=30)
    code, text = await eventually(lambda: _metric_line(op, 'kubedpo_operator_jobs{phase="Running"} 1.0'), timeout=30)
    assert code == 200
    assert await op.stop() == 0  # SIGTERM: kopf stops cleanly
    lines = [line for line in op.lines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object, none twice
    assert len(records) > 5 and len({line for line in lines}) == len(lines)
    assert all({"message", "timestamp"} <= r.keys() for r in records)
    assert any("proc" in json.dumps(r) for r in records)  # per-object logs name the DPOJob


async def test_peering_keeps_one_active_and_the_standby_takes_over(spawn: Any, kmock: Any,
                                                                     cluster: FakeCluster) -> None:
    kmock.resources["kopf.dev/v1/clusterkopfpeerings"] = kmock_lib.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False, verbs=VERBS)
    await cluster._call("post", PEERINGS,  # what the chart installs
                        json={"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                              "metadata": {"name": PEERING}, "status": {}})
    # kopf's peering is not a lock: an operator starts paused, and each acts on the peering object
    # as it reads it, so until both have read each other's entry both may act (our handlers are
    # idempotent for that window). Both entries being in the object says nothing about what each
    # has read: under load a standby can handle "one" from a stale read. So the two start one
    # after the other, and each step waits for what the operators themselves logged.
    a = spawn("a", KUBEDPO_PEERING_NAME=PEERING, POD_ID="a")  # the chart sets POD_ID to the pod name
    await eventually(lambda: _logged(a, "Resuming operations"), timeout=START_S)  # alone, it leads
    b = spawn("b", KUBEDPO_PEERING_NAME=PEERING, POD_ID="b")
    peers = await eventually(lambda: _peers(cluster, {"a", "b"}), timeout=START_S)
    assert peers["a"]["priority"] != peers["b"]["priority"]  # random in [0, 32767]: equal pauses both
    if peers["b"]["priority"] > peers["a"]["priority"]:
        active, standby = b, a  # b takes over once each has read the other's entry
        await eventually(lambda: _logged(a, "Pausing operations in favour of") and _logged(b, "Resuming operations"),
                         timeout=START_S)
    else:
        # b starts paused, and every state of the object it can read lists a above it: it never resumes.
        active, standby = a, b
    await cluster.create_dpojob("one", minimal_spec())
    await eventually(lambda: cluster.get("Job", "one-0"), timeout=60)
    await eventually(lambda: _handled(active, "one"), timeout=60)
    await asyncio.sleep(2)  # the standby acting would show by now
    assert cluster.creates("Job") == 1 and not _handled(standby, "one")

    assert await active.stop() == 0  # SIGTERM: the active one leaves the peering at once
    await cluster.create_dpojob("two", minimal_spec())
    await eventually(lambda: cluster.get("Job", "two-0"), timeout=60)
    await eventually(lambda: _handled(standby, "two"), timeout=60)  # kopf logs once the handler returns
    assert cluster.creates("Job") == 2


async def _peers(cluster: FakeCluster, names: set[str]) -> dict[str, dict] | None:
    code, body = await cluster._call("get", f"{PEERINGS}/{PEERING}")
    status = (body.get("status") or {}) if code == 200 else {}
    return status if names <= status.keys() else None


def _logged(op: OperatorProcess, text: str, after: int = 0) -> bool:
    return any(text in line for line in op.lines()[after:])


def _handled(op: OperatorProcess, name: str) -> bool:
    """Whether `op` ran a handler for DPOJob `name` (kopf's per-object JSON log lines)."""
    for line in op.lines():
        if line.startswith("{"):
            r = json.loads(line)
            if (r.get("object") or {}).get("name") == name and "Handler" in r["message"]:
                return True
    return False


async def _phase(cluster: FakeCluster, name: str, phase: str) -> bool:
    return (await cluster.status(name)).get("phase") == phase


def _metric_line(op: OperatorProcess, line: str) -> tuple[int, str] | None:
    code, text = op.get(op.metrics)
    return (code, text) if line in text else None


