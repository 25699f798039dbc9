"""kubedpo's alerting rules: generated, shipped by the chart, and each expression evaluated on a
real Prometheus that loads the chart's rule file: it fires on a broken run, not on a healthy one.

The two trainers here are TrainerMetrics endpoints set by the test (a NaN loss or a stalled step
cannot be produced on purpose by a real run in seconds); the operator's endpoint is its real
OperatorMetrics registry driven through the calls its handlers make.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time

import pytest
import yaml
from prometheus_client import start_http_server

from kubedpo_operator import alerts
from kubedpo_operator.metrics import OperatorMetrics
from kubedpo_trainer.metrics import TrainerMetrics
from tests.manifests.conftest import CHART
from tests.support.runs import free_port

RULE_FILE = CHART / "alerts" / "kubedpo.rules.yaml"


def test_chart_rule_file_is_the_generated_one() -> None:
    assert RULE_FILE.read_text() == alerts.render(), "stale: run `make dashboard`"


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) not installed: make tools")
    proc = subprocess.run([promtool, "check", "rules", str(RULE_FILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_fires_on_a_broken_run_and_not_on_a_healthy_one(start_prometheus) -> None:
    broken, healthy = TrainerMetrics("broken", "team-a", 0), TrainerMetrics("healthy", "team-a", 0)
    operator = OperatorMetrics()
    ports = [free_port() for _ in range(3)]
    for registry, port in zip((broken.registry, healthy.registry, operator.registry), ports, strict=True):
        start_http_server(port, addr="127.0.0.1", registry=registry)
    now = time.time()
    broken.set({"step": 10, "total_steps": 100, "loss": math.nan, "last_checkpoint_timestamp_seconds": now - 7200})
    healthy.set({"step": 1, "total_steps": 100, "loss": 0.5, "last_checkpoint_timestamp_seconds": now})
    operator.restarts.labels(reason="PodFailed").inc(0)
    operator.errors.labels(handler="on_create").inc(0)
    prom = start_prometheus([f"127.0.0.1:{p}" for p in ports], rule_files=[str(RULE_FILE)])

    for i in range(8):  # a run that moves, an operator that restarts gangs and fails its handler
        healthy.set({"step": 2 + i, "loss": 0.5 - 0.01 * i, "last_checkpoint_timestamp_seconds": time.time()})
        if i >= 3:
            operator.restarts.labels(reason="PodFailed").inc()
            operator.errors.labels(handler="on_create").inc()
        time.sleep(1.2)

    fired: dict[str, set[str]] = {}
    for rule in alerts.RULES:
        result = prom.query(rule["expr"])
        fired[rule["alert"]] = {r["metric"].get("dpojob") or r["metric"].get("reason") or
                                r["metric"].get("handler", "") for r in result}
    assert fired["KubeDPOTrainingStalled"] == {"broken"}
    assert fired["KubeDPOLossNaN"] == {"broken"}
    assert fired["KubeDPOCheckpointStale"] == {"broken"}
    assert fired["KubeDPORestartsRising"] == {"PodFailed"}
    assert fired["KubeDPOOperatorReconcileErrors"] == {"on_create"}
    loaded = prom.api("rules")["groups"]
    assert [r["name"] for r in loaded[0]["rules"]] == [r["alert"] for r in alerts.RULES]
    assert all(r["health"] == "ok" for r in loaded[0]["rules"]), yaml.safe_dump(loaded)
