"""status.progress from a real trainer metrics endpoint (the trainer's own TrainerMetrics)."""

from __future__ import annotations

import json
import math

import pytest

from kubedpo_operator.progress import (
    MetricsError,
    fetch_metrics,
    metrics_url,
    non_finite,
    parse_metrics,
    progress_patch,
)
from kubedpo_operator.settings import OperatorSettings
from kubedpo_trainer.metrics import TrainerMetrics
from tests.operator.conftest import eventually, minimal_spec

GAUGES = {"step": 120, "total_steps": 400, "epoch": 0.3, "loss": 0.52, "rewards_accuracies": 0.75,
          "rewards_margins": 1.25, "tokens_per_second": 3100.5, "job_tokens_per_second": 6150.0,
          "last_checkpoint_step": 100, "eta_seconds": 3725}


def _serve(values: dict) -> int:
    m = TrainerMetrics("llama", "team-a", 0)
    m.set(values)
    return m.serve(0, addr="127.0.0.1")


def test_url_points_at_pod_zero_of_the_attempt():
    url = metrics_url(OperatorSettings(), "llama", "team-a", 3, 9400)
    assert url == "http://llama-3-0.llama-3.team-a.svc:9400/metrics"


async def test_progress_from_a_live_endpoint():
    port = _serve(GAUGES)
    text = await fetch_metrics(f"http://127.0.0.1:{port}/metrics", 2)
    patch = progress_patch(parse_metrics(text), "s3://runs/ckpt", "now")
    assert patch["progress"] == {"step": 120, "totalSteps": 400, "epoch": 0.3, "loss": 0.52,
                                 "rewardAccuracy": 0.75, "rewardMargin": 1.25,
                                 "tokensPerSecond": 6150.0,  # the job's, not rank 0's 3100.5
                                 "eta": "1h02m", "updatedAt": "now"}
    assert patch["lastCheckpoint"] == {"uri": "s3://runs/ckpt/step-000100/", "step": 100}


async def test_nothing_before_the_first_step_and_unreachable_is_none():
    port = _serve({})
    assert progress_patch(parse_metrics(await fetch_metrics(f"http://127.0.0.1:{port}/metrics", 2)), None, "t") == {}
    assert await fetch_metrics("http://127.0.0.1:1/metrics", 0.5) is None


async def test_operator_fills_status_progress_while_running(cluster, operator):
    port = _serve(GAUGES)
    await operator.start(metrics_url_template="http://127.0.0.1:{port}/metrics")
    await cluster.create_dpojob("prog", minimal_spec(metrics={"port": port}))
    await eventually(lambda: cluster.get("Job", "prog-0"))
    await cluster.set_job("prog-0", active=1)

    async def progress():
        return (await cluster.status("prog")).get("progress")

    got = await eventually(progress)
    assert got["step"] == 120 and got["rewardAccuracy"] == 0.75
    assert (await cluster.status("prog"))["lastCheckpoint"]["step"] == 100


# --- untrusted endpoint (issue 9): caps, malformed text, non-finite values -----------------------

def test_non_finite_values_never_reach_status():
    inf = math.inf
    assert progress_patch({"step": inf, "loss": 0.5}, None, "t") == {}  # used to raise OverflowError
    patch = progress_patch({"step": 3, "loss": inf, "eta_seconds": inf, "total_steps": -inf,
                            "last_checkpoint_step": inf, "epoch": 1e300}, "s3://c", "t")
    json.dumps(patch, allow_nan=False)
    assert patch["progress"] == {"step": 3, "loss": None, "eta": None, "totalSteps": None, "epoch": 1e300,
                                 "updatedAt": "t"}
    assert "lastCheckpoint" not in patch
    assert non_finite({"loss": inf, "eta_seconds": -inf, "epoch": float("nan"), "other": inf}) == [
        "eta_seconds", "loss"]
    with pytest.raises(MetricsError) as err:
        parse_metrics("".join(f'kubedpo_x{{i="{i}"}} 1\n' for i in range(11)), max_samples=10)
    assert err.value.reason == "TooManyMetricSamples"
    with pytest.raises(MetricsError) as err:
        parse_metrics("kubedpo_step{rank=0 1\n")
    assert err.value.reason == "MalformedMetrics"


async def test_fetch_refuses_a_body_over_the_cap():
    port = _serve({"step": 1})  # the real exposition is a few KiB
    url = f"http://127.0.0.1:{port}/metrics"
    text = await fetch_metrics(url, 2, max_bytes=1 << 20)
    assert text and len(text) < 64 * 1024
    with pytest.raises(MetricsError) as err:
        await fetch_metrics(url, 2, max_bytes=100)
    assert err.value.reason == "MetricsTooLarge"
