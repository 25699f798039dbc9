"""The shipped Grafana dashboard against a real Prometheus scraping a live trainer metrics endpoint.

No Grafana server runs here, so the test does what Grafana would: resolve the `namespace` and
`job` variables with their `label_values(...)` queries, substitute them (and `$__rate_interval`)
into every panel's PromQL, and require each query to return finite data.

The endpoint is kubedpo_trainer.metrics.TrainerMetrics served on loopback and fed by a thread
that plays a training loop (gauges per logging step, counters, histogram observations); swap the
`trainer_endpoint` fixture for a real `kubedpo-trainer` run to test against the real thing.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import generate_latest

from kubedpo_trainer.metrics import COUNTERS, HISTOGRAMS, TRAIN_GAUGES, TrainerMetrics
from tests.manifests.tools import ROOT

DASHBOARD = ROOT / "charts" / "kubedpo" / "dashboards" / "kubedpo.json"
SCRAPES_NEEDED = 5  # rate() over $__rate_interval needs several samples
DATA_TIMEOUT_S = 30.0
RATE_INTERVAL = "5s"  # Grafana's $__rate_interval for a 1 s scrape interval is 4 s; one more for slack
VARIABLE = re.compile(r"^label_values\((?P<match>.+),\s*(?P<label>\w+)\)$")
METRIC = re.compile(r"\bkubedpo_\w+")
# What the dashboard must show (metric names without the prefix).
REQUIRED = {"loss", "eval_loss", "rewards_accuracies", "eval_rewards_accuracies", "rewards_margins",
            "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected", "learning_rate", "beta",
            "grad_norm", "tokens_per_second", "step_seconds_bucket", "data_wait_seconds_bucket",
            "checkpoint_seconds_sum", "s3_retries_total", "bad_records_total", "gpu_memory_bytes", "eta_seconds"}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every target of every panel."""
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in dash["panels"] for t in p["targets"]]


def variables(dash: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dash["templating"]["list"]}


# --- structure (no Prometheus needed) -------------------------------------------------------------

def test_every_metric_on_the_dashboard_is_exported_by_the_trainer() -> None:
    """A renamed metric would leave a panel silently empty: compare with the real exposition."""
    metrics = TrainerMetrics(job="j", namespace="ns", rank=0)
    metrics.observe("step_seconds", 0.1)
    exported = set(re.findall(r"^(kubedpo_\w+)", generate_latest(metrics.registry).decode(), re.M))
    used = {m for _, expr in panel_queries(load_dashboard()) for m in METRIC.findall(expr)}
    assert used - exported == set(), f"dashboard queries metrics the trainer does not export: {used - exported}"
    missing = {f"kubedpo_{n}" for n in REQUIRED} - used
    assert not missing, f"dashboard lacks panels for {missing}"


def test_every_selector_is_scoped_by_the_job_and_namespace_variables() -> None:
    for where, expr in panel_queries(load_dashboard()):
        for metric in METRIC.finditer(expr):
            selector = expr[metric.end():].split("}")[0]
            assert selector.startswith("{") and 'namespace=~"$namespace"' in selector \
                and 'job=~"$job"' in selector, f"{where}: {metric.group()} is not scoped: {expr}"


def test_dashboard_layout_and_datasource() -> None:
    dash = load_dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{p['title']} overflows the 24-column grid"
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    vars_ = variables(dash)
    assert vars_["datasource"]["type"] == "datasource" and vars_["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job"):
        assert VARIABLE.match(vars_[name]["query"]["query"]), f"variable {name} is not label_values(...)"


# --- live: real Prometheus, live endpoint ----------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    target: str  # host:port Prometheus scrapes
    job: str
    namespace: str


def _play_training(metrics: TrainerMetrics, stop: threading.Event) -> None:
    """What train.py does per step, compressed: gauges at each log, counters, histogram samples."""
    step = 0
    while not stop.is_set():
        step += 1
        loss = 0.69 * math.exp(-step / 50)
        values = {"loss": loss, "rewards_chosen": 0.01 * step, "rewards_rejected": -0.01 * step,
                  "rewards_accuracies": min(1.0, 0.5 + step / 100), "rewards_margins": 0.02 * step,
                  "logps_chosen": -40.0 + 0.1 * step, "logps_rejected": -42.0 - 0.1 * step,
                  "logits_chosen": -1.5, "logits_rejected": -1.7, "grad_norm": 1.0 / step,
                  "learning_rate": 5e-7, "beta": 0.1, "epoch": step / 1000, "step": step,
                  "total_steps": 1000, "tokens_per_second": 1234.0, "eta_seconds": 1000 - step,
                  "last_checkpoint_step": step - step % 10}
        values.update({f"eval_{k}": v for k, v in values.items() if f"eval_{k}" in TRAIN_GAUGES})
        metrics.set(values)
        metrics.set_gpu_memory({"allocated": 7.5e9, "reserved": 8.0e9})
        metrics.inc("samples", 8)
        metrics.inc("tokens", 1024)
        if step % 3 == 0:
            metrics.inc("s3_retries")
        if step % 7 == 0:
            metrics.inc("bad_records")
        metrics.inc("truncated_prompts", step % 2)
        metrics.inc("truncated_responses", step % 2)
        metrics.observe("step_seconds", 0.2 + 0.05 * (step % 4))
        metrics.observe("data_wait_seconds", 0.002 * (step % 5))
        if step % 10 == 1:
            metrics.observe("checkpoint_seconds", 1.5)
        stop.wait(0.1)


@pytest.fixture
def trainer_endpoint() -> Iterator[Endpoint]:
    assert set(COUNTERS) >= {"samples", "tokens", "s3_retries", "bad_records"} and "step_seconds" in HISTOGRAMS
    metrics = TrainerMetrics(job="zephyr-lora-dpo", namespace="team-a", rank=0)
    port = metrics.serve(0, addr="127.0.0.1")
    stop = threading.Event()
    feeder = threading.Thread(target=_play_training, args=(metrics, stop), daemon=True)
    feeder.start()
    yield Endpoint(f"127.0.0.1:{port}", job="zephyr-lora-dpo", namespace="team-a")
    stop.set()
    feeder.join(timeout=5)


def _wait_for_scrapes(prom, endpoint: Endpoint) -> None:
    expr = f'count_over_time(kubedpo_step{{job="{endpoint.job}"}}[1m])'
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while time.monotonic() < deadline:
        result = prom.query(expr)
        if result and float(result[0]["value"][1]) >= SCRAPES_NEEDED:
            return
        time.sleep(0.5)
    up = prom.query("up")
    pytest.fail(f"fewer than {SCRAPES_NEEDED} scrapes of {endpoint.target} in {DATA_TIMEOUT_S}s; up={up}")


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


def test_every_dashboard_query_returns_data(start_prometheus, trainer_endpoint: Endpoint) -> None:
    prom = start_prometheus([trainer_endpoint.target])
    _wait_for_scrapes(prom, trainer_endpoint)
    dash = load_dashboard()
    vars_ = variables(dash)

    bound = {"__rate_interval": RATE_INTERVAL}
    for name in ("namespace", "job"):  # in dashboard order: job's query uses $namespace
        options = _resolve(prom, vars_[name]["query"]["query"], bound)
        assert options == [getattr(trainer_endpoint, name)], f"variable {name} offers {options}"
        bound[name] = options[0]

    empty, not_finite = [], []
    for where, expr in panel_queries(dash):
        result = prom.query(substitute(expr, bound))
        if not result:
            empty.append(f"{where}: {expr}")
        elif not all(math.isfinite(float(r["value"][1])) for r in result):
            not_finite.append(f"{where}: {[r['value'][1] for r in result]}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert not not_finite, "queries returning NaN/Inf:\n" + "\n".join(not_finite)
