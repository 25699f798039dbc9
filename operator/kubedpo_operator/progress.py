"""status.progress from rank 0's Prometheus endpoint: URL builder, bounded fetch, parser.

The trainer needs no Kubernetes permissions: the operator reads its metrics. Parsing uses
prometheus_client's own text parser so any valid exposition (comments, label order) works.

Rank 0 runs the DPOJob author's image, so its endpoint is untrusted input to a process every
tenant shares: the body is read in chunks up to a byte cap (a larger body is refused, never
buffered), the fetch has a total timeout, parsing runs in a worker thread (never on kopf's
event loop) and stops at a sample cap, and non-finite values never reach status (the API
server rejects JSON with Infinity). Every refusal is a `MetricsError` whose reason becomes a
condition on that DPOJob only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kubedpo_trainer.config import checkpoint_step_name

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
    "tokensPerSecond": "job_tokens_per_second",  # all ranks (rank 0's own is tokens_per_second)
}
INT_FIELDS = ("step", "totalSteps")
# The largest integer status carries exactly (JSON readers use doubles; the CRD says int64).
MAX_INT = 2**53
_CHUNK = 64 * 1024


class MetricsError(Exception):
    """Rank 0's endpoint answered with something the operator refuses; `reason` is CamelCase."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def metrics_url(settings: OperatorSettings, name: str, namespace: str, attempt: int, port: int) -> str:
    """Rank 0 is pod index 0 of the attempt's Indexed Job, resolvable via the headless Service."""
    svc = job_name(name, attempt)
    return settings.metrics_url_template.format(pod=f"{svc}-0", service=svc, namespace=namespace, port=port)


def parse_metrics(text: str, rank: str = "0", max_samples: int | None = None) -> dict[str, float]:
    """Gauge values of one rank, keyed by name without the kubedpo_ prefix.

    Stops with MetricsError past `max_samples` samples (every sample counts, ours or not) or on
    text the exposition parser refuses. CPU-bound: call it through asyncio.to_thread.
    """
    out: dict[str, float] = {}
    seen = 0
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                seen += 1
                if max_samples is not None and seen > max_samples:
                    raise MetricsError("TooManyMetricSamples", f"rank 0's /metrics has more than {max_samples} "
                                       "samples (operator setting metrics_max_samples); progress is not read")
                if sample.name.startswith("kubedpo_") and sample.labels.get("rank", rank) == rank:
                    out[sample.name.removeprefix("kubedpo_")] = sample.value
    except (ValueError, TypeError, IndexError) as err:
        raise MetricsError("MalformedMetrics", f"rank 0's /metrics is not Prometheus text: {str(err)[:200]}") from None
    return out


def non_finite(values: Mapping[str, float]) -> list[str]:
    """Gauges status would show that hold ±Inf (NaN means "never set" and is simply skipped)."""
    wanted = {*FIELDS.values(), "eta_seconds", "last_checkpoint_step"}
    return sorted(k for k in wanted if k in values and math.isinf(values[k]))


def format_eta(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _usable(v: float | None, integer: bool = False) -> bool:
    """Finite, and for integer fields within what JSON carries exactly and not negative."""
    if v is None or not math.isfinite(v):
        return False
    return not integer or 0 <= v <= MAX_INT


def progress_patch(values: Mapping[str, float], checkpoint_uri: str | None, now: str) -> dict[str, Any]:
    """status fields (progress, lastCheckpoint) from parsed gauges; missing gauges are left out.

    Gauges read 0 until first set, so nothing is reported before the trainer's first step.
    Non-finite values (NaN: never set; ±Inf: a broken or hostile trainer) become null, which a
    merge patch reads as "remove": the patch is always valid JSON for the API server, and an
    older value is never shown as current.
    """
    if not _usable(values.get("step"), integer=True) or not values.get("step"):
        return {}
    progress: dict[str, Any] = {}
    for field, gauge in FIELDS.items():
        v = values.get(gauge)
        if _usable(v, integer=field in INT_FIELDS):
            progress[field] = int(v) if field in INT_FIELDS else round(float(v), 6)  # type: ignore[arg-type]
        elif v is not None:
            progress[field] = None  # merge patch: drop an older value rather than show it as current
    eta = values.get("eta_seconds")
    if _usable(eta, integer=True):
        progress["eta"] = format_eta(eta)  # type: ignore[arg-type]
    elif eta is not None:
        progress["eta"] = None
    progress["updatedAt"] = now
    patch: dict[str, Any] = {"progress": progress}
    ckpt = values.get("last_checkpoint_step")
    step = int(ckpt) if _usable(ckpt, integer=True) else 0  # type: ignore[arg-type]
    if step > 0 and checkpoint_uri:
        uri = f"{checkpoint_uri.rstrip('/')}/{checkpoint_step_name(step)}/"
        patch["lastCheckpoint"] = {"uri": uri, "step": step}
    return patch


async def fetch_metrics(url: str, timeout_s: float, max_bytes: int = 1 << 20) -> str | None:
    """The exposition text, or None when rank 0 is not serving (yet): progress is best effort.

    Raises MetricsError for a body over `max_bytes` (announced or streamed: at most
    max_bytes + one chunk is ever held) or one that is not UTF-8.
    """
    too_big = MetricsError("MetricsTooLarge", f"rank 0's /metrics is larger than {max_bytes} bytes "
                           "(operator setting metrics_max_bytes); progress is not read")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(url) as resp:
                if resp.status != 200:
                    return None
                if (resp.content_length or 0) > max_bytes:
                    raise too_big
                body = bytearray()
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    body += chunk
                    if len(body) > max_bytes:
                        raise too_big
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise MetricsError("MalformedMetrics", "rank 0's /metrics is not UTF-8 text") from None
