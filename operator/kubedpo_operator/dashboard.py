"""The Grafana dashboard as code (grafana-foundation-sdk): `kubedpo dashboard` prints its JSON.

`charts/kubedpo/dashboards/kubedpo.json` is this module's output (`make dashboard`; `make lint`
fails when it is stale), so panels are reviewed as Python and every query is a plain string the
tests run on a real Prometheus. Rows follow what a person asks in order: is it moving (progress),
is it learning (learning), how fast (throughput), is it healthy (reliability), GPU, and the
operator itself.

Every trainer query is scoped by the `namespace` and `dpojob` variables; `dpojob` is the
trainer's own label (Prometheus owns `job`). Only rank 0 serves metrics: its job-wide counters
(`job_tokens`, bad/truncated rows) are summed over ranks by the trainer.

The SDK is a development dependency (the `dev` extra): the operator never imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SCOPE = 'namespace=~"$namespace", dpojob=~"$dpojob"'
RATE = "$__rate_interval"


def m(name: str) -> str:
    """One trainer series, scoped to the chosen namespace and DPOJob."""
    return f"kubedpo_{name}{{{SCOPE}}}"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = "{{dpojob}}"


@dataclass(frozen=True)
class PanelSpec:
    title: str
    kind: str  # "stat" | "timeseries"
    queries: tuple[Query, ...]
    unit: str = ""
    width: int = 8
    height: int = 8
    description: str = ""
    min: float | None = None
    max: float | None = None
    # Why a panel may show no data on a healthy run (shown to users and read by the tests).
    optional: str = ""


@dataclass(frozen=True)
class RowSpec:
    title: str
    panels: tuple[PanelSpec, ...] = field(default_factory=tuple)


def _q(*pairs: tuple[str, str]) -> tuple[Query, ...]:
    return tuple(Query(e, legend) for e, legend in pairs)


def _quantiles(metric: str, label: str) -> tuple[Query, ...]:
    return _q(*((f"histogram_quantile({q}, sum by (le, dpojob) (rate(kubedpo_{metric}_bucket{{{SCOPE}}}[{RATE}])))",
                 f"{{{{dpojob}}}} p{int(q * 100)} {label}") for q in (0.5, 0.95, 0.99)))


ROWS: tuple[RowSpec, ...] = (
    RowSpec("Progress", (
        PanelSpec("Step", "stat", _q((m("step"), "{{dpojob}}")), width=4, height=4),
        PanelSpec("Progress", "stat", _q((f"{m('step')} / {m('total_steps')}", "{{dpojob}}")),
                  unit="percentunit", width=4, height=4, min=0, max=1),
        PanelSpec("ETA", "stat", _q((m("eta_seconds"), "{{dpojob}}")), unit="s", width=4, height=4,
                  description="Remaining steps at the step rate since this attempt started."),
        PanelSpec("Epoch", "stat", _q((m("epoch"), "{{dpojob}}")), width=4, height=4),
        PanelSpec("Attempt", "stat", _q((m("attempt"), "{{dpojob}}")), width=4, height=4,
                  description="Gang restarts so far (0: the first attempt)."),
        PanelSpec("Tokens / s (job)", "stat",
                  _q((f"sum by (dpojob) (rate(kubedpo_job_tokens_total{{{SCOPE}}}[{RATE}]))", "{{dpojob}}")),
                  width=4, height=4, description="All ranks: rank 0 sums the tokens of every rank."),
    )),
    RowSpec("Learning", (
        PanelSpec("Loss (train / eval)", "timeseries",
                  _q((m("loss"), "{{dpojob}} train"), (m("eval_loss"), "{{dpojob}} eval"))),
        PanelSpec("Reward accuracy (train / eval)", "timeseries",
                  _q((m("rewards_accuracies"), "{{dpojob}} train"), (m("eval_rewards_accuracies"), "{{dpojob}} eval"),
                     (f"0.5 + 0 * {m('step')}", "coin flip")),
                  unit="percentunit", min=0, max=1,
                  description="Share of pairs whose chosen reward beats the rejected one; ties (step 0) count as not."),
        PanelSpec("Reward margin (train / eval)", "timeseries",
                  _q((m("rewards_margins"), "{{dpojob}} train"), (m("eval_rewards_margins"), "{{dpojob}} eval"))),
        PanelSpec("Rewards: chosen vs rejected", "timeseries",
                  _q((m("rewards_chosen"), "{{dpojob}} chosen"), (m("rewards_rejected"), "{{dpojob}} rejected"),
                     (m("eval_rewards_chosen"), "{{dpojob}} eval chosen"),
                     (m("eval_rewards_rejected"), "{{dpojob}} eval rejected"))),
        PanelSpec("Log-probs: chosen vs rejected", "timeseries",
                  _q((m("logps_chosen"), "{{dpojob}} chosen"), (m("logps_rejected"), "{{dpojob}} rejected"))),
        PanelSpec("KL proxy: mean log(π/π_ref) on the pairs", "timeseries",
                  _q((f"({m('rewards_chosen')} + {m('rewards_rejected')}) / (2 * {m('beta')})", "{{dpojob}}")),
                  description="Implicit rewards divided by beta, averaged over chosen and rejected: how far the "
                              "policy moved from the reference on the training pairs. A proxy, not the KL of samples."),
        PanelSpec("Learning rate", "timeseries", _q((m("learning_rate"), "{{dpojob}}"))),
        PanelSpec("Beta", "timeseries", _q((m("beta"), "{{dpojob}}"))),
        PanelSpec("Gradient norm", "timeseries", _q((m("grad_norm"), "{{dpojob}}"))),
    )),
    RowSpec("Throughput", (
        PanelSpec("Tokens / s (all ranks)", "timeseries",
                  _q((f"sum by (dpojob) (rate(kubedpo_job_tokens_total{{{SCOPE}}}[{RATE}]))", "{{dpojob}} job"),
                     (f"sum by (dpojob) (rate(kubedpo_tokens_total{{{SCOPE}}}[{RATE}]))", "{{dpojob}} rank 0"))),
        PanelSpec("Step time p50 / p95 / p99", "timeseries", _quantiles("step_seconds", "step"), unit="s"),
        PanelSpec("Data wait p50 / p95 / p99", "timeseries", _quantiles("data_wait_seconds", "wait"), unit="s",
                  description="Time the loop waited for the next batch: > 0 means data loading is the bottleneck."),
    )),
    RowSpec("Reliability", (
        PanelSpec("Checkpoint age", "stat",
                  _q((f"time() - {m('last_checkpoint_timestamp_seconds')}", "{{dpojob}}")), unit="s", width=6,
                  optional="no checkpoint yet in this attempt (checkpoint.uri unset or first one pending)"),
        PanelSpec("Last checkpoint step", "stat", _q((m("last_checkpoint_step"), "{{dpojob}}")), width=6,
                  optional="no checkpoint yet in this attempt"),
        PanelSpec("Checkpoint time (mean / p99)", "timeseries",
                  _q((f"{m('checkpoint_seconds_sum')} / {m('checkpoint_seconds_count')}", "{{dpojob}} mean"),
                     (f"histogram_quantile(0.99, sum by (le, dpojob) (kubedpo_checkpoint_seconds_bucket{{{SCOPE}}}))",
                      "{{dpojob}} p99 (whole run)")),
                  unit="s", width=12, optional="no checkpoint yet in this attempt"),
        PanelSpec("Gang restarts", "timeseries",
                  _q((f"max by (dpojob) ({m('attempt')})", "{{dpojob}} attempt"),
                     ("sum by (reason) (increase(kubedpo_operator_restarts_total[1h]))", "restarts/h: {{reason}}")),
                  optional="restarts/h needs the operator scraped (ServiceMonitor)"),
        PanelSpec("S3 retries / s", "timeseries",
                  _q((f"sum by (dpojob) (rate(kubedpo_s3_retries_total{{{SCOPE}}}[{RATE}]))", "{{dpojob}}"))),
        PanelSpec("Bad and truncated rows (all ranks)", "timeseries",
                  _q((m("bad_records_total"), "{{dpojob}} bad records skipped"),
                     (m("truncated_prompts_total"), "{{dpojob}} prompts truncated"),
                     (m("truncated_responses_total"), "{{dpojob}} responses truncated"))),
    )),
    RowSpec("GPU", (
        PanelSpec("GPU memory (fullest rank, peak)", "timeseries",
                  _q((m("gpu_memory_bytes"), "{{dpojob}} {{kind}}")),
                  unit="bytes", width=12, optional="set on GPU only (a CPU run has no GPU memory)"),
        PanelSpec("GPU utilisation (DCGM exporter)", "timeseries",
                  _q(('avg by (pod) (DCGM_FI_DEV_GPU_UTIL{namespace=~"$namespace", pod=~"$dpojob-.*"})',
                      "{{pod}}")),
                  unit="percent", width=12,
                  optional="needs NVIDIA's DCGM exporter scraped with pod labels"),
    )),
    RowSpec("Operator", (
        PanelSpec("DPOJobs by phase", "timeseries", _q(("sum by (phase) (kubedpo_operator_jobs)", "{{phase}}"))),
        PanelSpec("Reconcile errors / s", "timeseries",
                  _q((f"sum by (handler) (rate(kubedpo_operator_reconcile_errors_total[{RATE}]))", "{{handler}}")),
                  optional="no handler has failed yet (the series appears with the first error)"),
        PanelSpec("Reconcile latency p95", "timeseries",
                  _q((f"histogram_quantile(0.95, sum by (le, handler) "
                      f"(rate(kubedpo_operator_reconcile_seconds_bucket[{RATE}])))", "{{handler}}")), unit="s"),
    )),
)


def _datasource() -> Any:
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    return DataSourceRef(type_val="prometheus", uid="${datasource}")


def _panel(spec: PanelSpec) -> Any:
    from grafana_foundation_sdk.builders import prometheus, stat, timeseries

    builder = (stat.Panel() if spec.kind == "stat" else timeseries.Panel())
    builder = builder.title(spec.title).datasource(_datasource()).height(spec.height).span(spec.width)
    description = spec.description + (f" No data when: {spec.optional}." if spec.optional else "")
    if description:
        builder = builder.description(description.strip())
    if spec.unit:
        builder = builder.unit(spec.unit)
    if spec.min is not None:
        builder = builder.min(spec.min)
    if spec.max is not None:
        builder = builder.max(spec.max)
    for i, q in enumerate(spec.queries):
        builder = builder.with_target(prometheus.Dataquery().expr(q.expr).legend_format(q.legend)
                                      .ref_id(chr(ord("A") + i)))
    return builder


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (a dict)."""
    from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import VariableRefresh

    ds = _datasource()
    dash = (Dashboard("kubedpo: DPO training").uid("kubedpo").tags(["kubedpo", "dpo", "training"])
            .refresh("30s").time("now-6h", "now").timezone("browser").editable()
            .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
            .with_variable(QueryVariable("namespace").label("Namespace").datasource(ds)
                           .query("label_values(kubedpo_step, namespace)")
                           .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
            .with_variable(QueryVariable("dpojob").label("DPOJob").datasource(ds)
                           .query('label_values(kubedpo_step{namespace=~"$namespace"}, dpojob)')
                           .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)))
    for row in ROWS:
        dash = dash.with_row(Row(row.title))
        for spec in row.panels:
            dash = dash.with_panel(_panel(spec))
    out: dict[str, Any] = _drop_nulls(json.loads(JSONEncoder(sort_keys=True).encode(dash.build())))
    for i, panel in enumerate(out["panels"], start=1):  # stable ids: tests and links refer to them
        panel["id"] = i
    return out


def _drop_nulls(value: Any) -> Any:
    """Unset SDK fields come out as null; Grafana wants them absent (its defaults apply)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def panel_specs() -> list[tuple[str, PanelSpec]]:
    """(row title, panel) pairs, for the tests."""
    return [(row.title, p) for row in ROWS for p in row.panels]
