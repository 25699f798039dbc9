"""A hostile rank 0 cannot harm the shared operator: the issue-9 "must show" for metrics.

The operator runs as the chart runs it (a real `kubedpo operator` process on kmock), so its
peak RSS (VmHWM) is the number the chart's memory limit is about. Two DPOJobs point their
metrics port at hostile endpoints on loopback: one streams 100 MiB of valid exposition text
with no Content-Length, one serves +Inf values. Meanwhile other DPOJobs go Pending → Running →
Succeeded, and their reaction latency is compared with the same steps before the abuse began.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.conftest import FakeCluster, eventually, minimal_spec
from tests.operator.test_operator_process import spawn  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow
CHART_VALUES = Path(__file__).parents[2] / "charts" / "kubedpo" / "values.yaml"


@dataclass
class Hostile:
    proc: subprocess.Popen[bytes]
    port: int

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
            return resp.read().decode()

    def sent(self) -> int:
        return int(self.get("/sent"))


def _serve(kind: str, tmp_path: Path) -> Iterator[Hostile]:
    port_file = tmp_path / f"{kind}.port"
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.hostile_metrics", kind, str(port_file)],
                            cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "hostile endpoint did not start"
            time.sleep(0.05)
        yield Hostile(proc, int(port_file.read_text()))
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def huge(tmp_path: Path) -> Iterator[Hostile]:
    yield from _serve("huge", tmp_path)


@pytest.fixture
def inf(tmp_path: Path) -> Iterator[Hostile]:
    yield from _serve("inf", tmp_path)


def _chart_memory_limit() -> int:
    limit = yaml.safe_load(CHART_VALUES.read_text())["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) * 2**20


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def _latencies(cluster: FakeCluster, name: str) -> list[float]:
    """Seconds from a Job change (as the Job controller writes it) to the DPOJob's new phase."""
    await cluster.create_dpojob(name, minimal_spec())
    await eventually(lambda: cluster.get("Job", f"{name}-0"), timeout=30)
    await eventually(lambda: _phase(cluster, name, "Pending"), timeout=30)
    out = []
    for kwargs, phase in (({"active": 1}, "Running"), ({"succeeded": 1, "condition": "Complete"}, "Succeeded")):
        t0 = time.monotonic()
        await cluster.set_job(f"{name}-0", **kwargs)
        await eventually(lambda p=phase: _phase(cluster, name, p), timeout=60, interval=0.02)
        out.append(time.monotonic() - t0)
    return out


async def _phase(cluster: FakeCluster, name: str, phase: str) -> bool:
    return (await cluster.status(name)).get("phase") == phase


def _cond(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


async def test_hostile_metrics_endpoints_harm_only_their_own_dpojob(spawn: Any, cluster: FakeCluster,  # noqa: F811
                                                                    huge: Hostile, inf: Hostile) -> None:
    op = spawn("abuse", KUBEDPO_METRICS_URL_TEMPLATE="http://127.0.0.1:{port}/metrics",
               KUBEDPO_PROGRESS_INTERVAL_S="0.5")
    await eventually(lambda: op.get(op.health)[0] == 200, timeout=30)
    for name, port in (("huge", huge.port), ("inf", inf.port)):  # honest trainers, scraped every tick
        await cluster.create_dpojob(name, minimal_spec(metrics={"port": port}))
        await eventually(lambda n=name: cluster.get("Job", f"{n}-0"), timeout=30)
        await cluster.set_job(f"{name}-0", active=1)
        await eventually(lambda n=name: _reason(cluster, n, "MetricsRead"), timeout=30)
    baseline = [lat for i in range(3) for lat in await _latencies(cluster, f"calm-{i}")]
    idle_rss = _peak_rss(op.proc.pid)

    huge.get("/arm")
    inf.get("/arm")
    huge_st = await eventually(lambda: _reason(cluster, "huge", "MetricsTooLarge"), timeout=30)
    inf_st = await eventually(lambda: _reason(cluster, "inf", "NonFiniteMetrics"), timeout=30)
    under_abuse = [lat for i in range(3) for lat in await _latencies(cluster, f"busy-{i}")]
    reads_before = await asyncio.to_thread(huge.sent)
    await eventually(lambda: huge.sent() > reads_before, timeout=30)  # still being read every tick

    peak = _peak_rss(op.proc.pid)
    limit = _chart_memory_limit()
    print(f"\nlatency s: baseline max {max(baseline):.3f}, under abuse max {max(under_abuse):.3f}; "
          f"operator peak RSS {idle_rss / 2**20:.0f} MiB idle -> {peak / 2**20:.0f} MiB "
          f"(chart limit {limit / 2**20:.0f} MiB); bytes served by the 100 MiB endpoint so far {huge.sent()}")
    assert peak < limit and peak - idle_rss < 64 * 2**20, (idle_rss, peak)
    # Watch-driven reactions stay watch-driven: never a tick-sized (or parse-sized) stall.
    assert max(under_abuse) < max(3 * max(baseline), 1.5), (baseline, under_abuse)

    # Only the abusers carry a False condition; their phase and everyone's status stay valid JSON.
    assert _cond(huge_st, "ProgressAvailable")["status"] == "False" and huge_st["phase"] == "Running"
    assert "metrics_max_bytes" in _cond(huge_st, "ProgressAvailable")["message"]
    inf_msg = _cond(inf_st, "ProgressAvailable")["message"]
    assert "eta_seconds" in inf_msg and "loss" in inf_msg and "job_tokens_per_second" in inf_msg
    progress = await eventually(lambda: _progress(cluster, "inf"), timeout=30)
    assert progress["step"] == 50 and progress["rewardAccuracy"] == 0.5 and progress["totalSteps"] == 100
    for dpo in await cluster.list("DPOJob"):
        json.dumps(dpo, allow_nan=False)  # raises on NaN/Infinity, as a real API server refuses them
        if not dpo["metadata"]["name"].startswith(("huge", "inf")):
            assert _cond(dpo["status"], "ProgressAvailable") is None  # never Running with a port
    assert await op.stop() == 0


async def _reason(cluster: FakeCluster, name: str, reason: str) -> dict | None:
    st = await cluster.status(name)
    c = _cond(st, "ProgressAvailable")
    return st if c and c["reason"] == reason else None


async def _progress(cluster: FakeCluster, name: str) -> dict | None:
    """Progress once the honest run's loss (0.6) is no longer shown as current (null or gone)."""
    progress = (await cluster.status(name)).get("progress") or {}
    return progress if not any(progress.get(k) is not None for k in ("loss", "eta", "tokensPerSecond")) else None
