"""The shipped Grafana dashboard: generated from code, and every panel fed by a real training run.

No Grafana server runs here, so the live test does what Grafana would: resolve the `namespace`
and `dpojob` variables with their `label_values(...)` queries, substitute them (and
`$__rate_interval`) into every panel's PromQL, and require each query to return finite data.

The data come from a real `kubedpo-trainer` run (2 ranks on gloo, model and preference data read
from SeaweedFS, checkpoints written there) scraped by two real Prometheus servers at once: one
with honor_labels, one where the target's labels win (annotation-based scrapers). The operator
row reads the operator's own metrics registry (OperatorMetrics, served on loopback and driven
through the calls its handlers make; the kopf process itself is tested in tests/operator).
Panels whose `optional` says why (GPU memory on a CPU run, DCGM, no handler error yet) must
still evaluate, but may be empty.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest, start_http_server

from kubedpo_operator import dashboard
from kubedpo_operator.metrics import OperatorMetrics
from kubedpo_trainer import storage
from kubedpo_trainer.metrics import LAZY_GAUGES, TrainerMetrics
from tests.manifests.tools import ROOT
from tests.support.runs import free_port

DASHBOARD = ROOT / "charts" / "kubedpo" / "dashboards" / "kubedpo.json"
RATE_INTERVAL = "5s"  # Grafana's $__rate_interval for a 1 s scrape interval is 4 s; one more for slack
VARIABLE = re.compile(r"^label_values\((?P<match>.+),\s*(?P<label>\w+)\)$")
METRIC = re.compile(r"\b(?:kubedpo_\w+|DCGM_\w+)")
ROWS = ["Progress", "Learning", "Throughput", "Reliability", "GPU", "Operator"]
DPOJOB, NAMESPACE = "zephyr-lora-dpo", "team-a"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def panel_queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every target of every panel."""
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in panels(dash) for t in p["targets"]]


def variables(dash: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def _variable_query(var: dict) -> str:
    q = var["query"]
    return q["query"] if isinstance(q, dict) else q


# --- structure (no Prometheus needed) -------------------------------------------------------------

def test_chart_dashboard_is_the_generated_one() -> None:
    assert DASHBOARD.read_text() == dashboard.render(), "stale: run `make dashboard`"


def test_every_metric_on_the_dashboard_is_exported() -> None:
    """A renamed metric would leave a panel silently empty: compare with the real expositions."""
    trainer = TrainerMetrics(job="j", namespace="ns", rank=0)
    trainer.observe("step_seconds", 0.1)
    trainer.set(dict.fromkeys(LAZY_GAUGES, 1.0))  # eval/checkpoint series appear once first set
    trainer.set_gpu_memory({"allocated": 1.0, "reserved": 2.0})  # GPU series: on GPU only
    operator = OperatorMetrics()
    operator.errors.labels(handler="h").inc(0)
    operator.duration.labels(handler="h").observe(0.1)
    operator.restarts.labels(reason="r").inc(0)
    text = generate_latest(trainer.registry).decode() + generate_latest(operator.registry).decode()
    exported = set(re.findall(r"^(kubedpo_\w+)", text, re.M))
    used = {m for _, expr in panel_queries(load_dashboard()) for m in METRIC.findall(expr)}
    unknown = {m for m in used - exported if not m.startswith("DCGM_")}
    assert not unknown, f"dashboard queries metrics nobody exports: {unknown}"


def test_every_trainer_selector_is_scoped_by_namespace_and_dpojob() -> None:
    for where, expr in panel_queries(load_dashboard()):
        for metric in METRIC.finditer(expr):
            if metric.group().startswith(("kubedpo_operator_", "DCGM_")):
                continue
            selector = expr[metric.end():].split("}")[0]
            assert selector.startswith("{") and 'namespace=~"$namespace"' in selector \
                and 'dpojob=~"$dpojob"' in selector, f"{where}: {metric.group()} is not scoped: {expr}"


def test_dashboard_rows_layout_and_datasource() -> None:
    dash = load_dashboard()
    assert [p["title"] for p in dash["panels"] if p["type"] == "row"] == ROWS
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{p['title']} overflows the 24-column grid"
    for p in panels(dash):
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    vars_ = variables(dash)
    assert vars_["datasource"]["type"] == "datasource" and vars_["datasource"]["query"] == "prometheus"
    for name in ("namespace", "dpojob"):
        assert VARIABLE.match(_variable_query(vars_[name])), f"variable {name} is not label_values(...)"


# --- live: a real kubedpo-trainer run, real Prometheus ---------------------------------------------

def _resolve(prom, query: str, bound: dict[str, str]) -> list[str]:
    """Grafana's label_values(match, label), via Prometheus's label-values API."""
    m = VARIABLE.match(query)
    match = substitute(m.group("match"), bound)
    return prom.api(f"label/{m.group('label')}/values", **{"match[]": match})


def substitute(expr: str, bound: dict[str, str]) -> str:
    for name, value in sorted(bound.items(), key=lambda kv: -len(kv[0])):
        # As Grafana's Prometheus data source does: regex-escape, then escape for a PromQL string.
        value = value if name.startswith("__") else re.escape(value).replace("\\", "\\\\")
        expr = expr.replace(f"${name}", value)
    return expr


def _upload_task(tiny, s3) -> dict:
    storage.upload_dir(tiny.model_dir, s3.uri("models/tiny/"))
    storage.upload_dir(Path(tiny.train_uri), s3.uri("prefs/train/"))
    storage.upload_dir(Path(tiny.eval_uri), s3.uri("prefs/eval/"))
    return {
        "model": {"uri": s3.uri("models/tiny/")},
        "data": {"train": s3.uri("prefs/train/"), "eval": s3.uri("prefs/eval/"), "maxLength": 64,
                 "maxPromptLength": 32, "shuffleBuffer": 64},
        "training": {"learningRate": 1e-3, "batchSize": 4, "maxSteps": 400, "loggingSteps": 2, "evalSteps": 20,
                     "warmupRatio": 0.0},
        "checkpoint": {"uri": s3.uri("runs/dash/ckpt/"), "everySteps": 10, "keepLast": 1},
        "output": {"uri": s3.uri("runs/dash/final/")},
        "s3": {"endpointUrl": s3.endpoint},
    }


def _ready(prom, at_least_scrapes: int = 6) -> bool:
    """Every kind of event has been scraped: steps, an evaluation and a checkpoint."""
    need = [f'count_over_time(kubedpo_step{{dpojob="{DPOJOB}"}}[1m]) >= {at_least_scrapes}',
            f'kubedpo_eval_loss{{dpojob="{DPOJOB}"}}',
            f'count_over_time(kubedpo_last_checkpoint_step{{dpojob="{DPOJOB}"}}[1m]) >= 2',
            f'count_over_time(kubedpo_step_seconds_count{{dpojob="{DPOJOB}"}}[1m]) >= 3']
    return all(prom.query(q) for q in need)


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_a_real_run(start_prometheus, tiny, s3, tmp_path: Path) -> None:
    cfg = _upload_task(tiny, s3)
    port = free_port()
    cfg["metrics"] = {"port": port}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    operator = OperatorMetrics()  # the operator's real registry, as its handlers drive it
    operator_port = free_port()
    start_http_server(operator_port, addr="127.0.0.1", registry=operator.registry)
    operator.observe_phase(NAMESPACE, DPOJOB, "Running")
    with operator.timed("tick"):
        pass
    operator.restarts.labels(reason="PodFailed").inc()

    target = f"127.0.0.1:{port}"
    honor = start_prometheus([target, f"127.0.0.1:{operator_port}"], honor_labels=True)
    # Target labels win, as with Kubernetes SD: the pod's namespace is the target's `namespace`.
    plain = start_prometheus([target, f"127.0.0.1:{operator_port}"], honor_labels=False,
                             labels={"namespace": NAMESPACE, "pod": f"{DPOJOB}-0-0"})
    env = {**s3.env(), "KUBEDPO_JOB_NAME": DPOJOB, "KUBEDPO_NAMESPACE": NAMESPACE, "KUBEDPO_ATTEMPT": "1",
           "OMP_NUM_THREADS": "1", "KUBEDPO_LOG_FORMAT": "json"}
    log = open(tmp_path / "trainer.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kubedpo_trainer.cli", "--config", str(tmp_path / "config.yaml"),
                             "--nproc-per-node", "2", "--master-port", str(free_port())],
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (_ready(honor) and _ready(plain)):
            assert proc.poll() is None, f"trainer ended early ({proc.returncode}):\n" + \
                (tmp_path / "trainer.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no scraped eval/checkpoint/steps within 240 s"
            with operator.timed("tick"):  # the operator's progress timer, once a second here
                time.sleep(0.01)
            time.sleep(1)
        at = time.time()  # every query is evaluated at this instant, as one dashboard refresh
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()

    optional = {f"{p.title}": p.optional for _, p in dashboard.panel_specs() if p.optional}
    dash = load_dashboard()
    for style, prom in (("honor_labels", honor), ("target labels win", plain)):
        bound = {"__rate_interval": RATE_INTERVAL}
        for name in ("namespace", "dpojob"):  # in dashboard order: dpojob's query uses $namespace
            options = _resolve(prom, _variable_query(variables(dash)[name]), bound)
            assert options == [{"namespace": NAMESPACE, "dpojob": DPOJOB}[name]], f"{style}: {name} offers {options}"
            bound[name] = options[0]
        empty, not_finite = [], []
        for p in panels(dash):
            results = [prom.query(substitute(t["expr"], bound), at=at) for t in p["targets"]]
            if not any(results) and p["title"] not in optional:
                empty.append(f"{p['title']}: {[t['expr'] for t in p['targets']]}")
            for r in (x for res in results for x in res):
                if not math.isfinite(float(r["value"][1])):
                    not_finite.append(f"{p['title']}: {r}")
        assert not empty, f"{style}: panels without data:\n" + "\n".join(empty)
        assert not not_finite, f"{style}: queries returning NaN/Inf:\n" + "\n".join(not_finite)
