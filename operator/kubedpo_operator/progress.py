"""status.progress from rank 0's Prometheus endpoint: URL builder, parser, fetch.

The trainer needs no Kubernetes permissions: the operator reads its metrics. Parsing uses
prometheus_client's own text parser so any valid exposition (comments, label order) works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .children import job_name
from .settings import OperatorSettings

# status.progress field -> trainer gauge (without the kubedpo_ prefix)
FIELDS = {
    "step": "step",
    "totalSteps": "total_steps",
    "epoch": "epoch",
    "loss": "loss",
    "rewardAccuracy": "rewards_accuracies",
    "rewardMargin": "rewards_margins",
    "tokensPerSecond": "tokens_per_second",
}
INT_FIELDS = ("step", "totalSteps")


def metrics_url(settings: OperatorSettings, name: str, namespace: str, attempt: int, port: int) -> str:
    """Rank 0 is pod index 0 of the attempt's Indexed Job, resolvable via the headless Service."""
    svc = job_name(name, attempt)
    return settings.metrics_url_template.format(pod=f"{svc}-0", service=svc, namespace=namespace, port=port)


def parse_metrics(text: str, rank: str = "0") -> dict[str, float]:
    """Gauge values of one rank, keyed by name without the kubedpo_ prefix."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("kubedpo_") and sample.labels.get("rank", rank) == rank:
                out[sample.name.removeprefix("kubedpo_")] = sample.value
    return out


def format_eta(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_patch(values: Mapping[str, float], checkpoint_uri: str | None, now: str) -> dict[str, Any]:
    """status fields (progress, lastCheckpoint) from parsed gauges; missing gauges are left out.

    Gauges read 0 until first set, so nothing is reported before the trainer's first step.
    """
    if not values.get("step"):
        return {}
    progress: dict[str, Any] = {}
    for field, gauge in FIELDS.items():
        if gauge in values and values[gauge] == values[gauge]:  # NaN (never set) is skipped
            v = values[gauge]
            progress[field] = int(v) if field in INT_FIELDS else round(float(v), 6)
    if "eta_seconds" in values and values["eta_seconds"] == values["eta_seconds"]:
        progress["eta"] = format_eta(values["eta_seconds"])
    if not progress:
        return {}
    progress["updatedAt"] = now
    patch: dict[str, Any] = {"progress": progress}
    step = int(values.get("last_checkpoint_step") or 0)
    if step > 0 and checkpoint_uri:
        patch["lastCheckpoint"] = {"uri": f"{checkpoint_uri.rstrip('/')}/step-{step:06d}/", "step": step}
    return patch


async def fetch_metrics(url: str, timeout_s: float) -> str | None:
    """The exposition text, or None when rank 0 is not serving (yet): progress is best effort."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(url) as resp:
                if resp.status != 200:
                    return None
                return await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
