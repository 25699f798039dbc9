"""One progress read of a running DPOJob: fetch rank 0's /metrics, parse off the loop, write status.

Kept out of handlers.py so the untrusted-input path is in one place: every refusal of the
endpoint (too large, too many samples, malformed, non-finite values) becomes the
`ProgressAvailable` condition on that DPOJob only, and the operator goes on serving the rest.
The condition is written only when it changes, so a hostile endpoint costs one read per tick
and no extra API writes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from .api import FINISHED_PHASES
from .conditions import PROGRESS, changed, set_condition
from .progress import MetricsError, fetch_metrics, metrics_url, non_finite, parse_metrics, progress_patch
from .status import now_iso


async def read_progress(memo: kopf.Memo, name: str, namespace: str, attempt: int, port: int,
                        checkpoint_uri: str | None) -> None:
    s = memo.settings
    url = metrics_url(s, name, namespace, attempt, port)
    try:
        text = await fetch_metrics(url, s.metrics_timeout_s, s.metrics_max_bytes)
        if text is None:
            return  # not serving (yet): progress is best effort, nothing to report
        values = await asyncio.to_thread(parse_metrics, text, "0", s.metrics_max_samples)
    except MetricsError as err:
        await asyncio.to_thread(write_progress, memo, namespace, name, {}, (False, err.reason, err.message))
        return
    bad = non_finite(values)
    cond = ((False, "NonFiniteMetrics", f"rank 0 reports non-finite values for {', '.join(bad)}; "
             "those fields are left out of status.progress") if bad
            else (True, "MetricsRead", "status.progress is read from rank 0's /metrics"))
    await asyncio.to_thread(write_progress, memo, namespace, name,
                            progress_patch(values, checkpoint_uri, now_iso()), cond)


def write_progress(memo: kopf.Memo, namespace: str, name: str, patch: dict[str, Any],
                   cond: tuple[bool, str, str]) -> None:
    """Under the DPOJob's lock, on a fresh read: the phase conditions sync writes are kept."""
    with memo.locks[(namespace, name)]:
        dpo = memo.kube.get_dpojob(namespace, name)
        if dpo is None:
            return
        status = dpo.get("status") or {}
        if status.get("phase") in FINISHED_PHASES:
            return
        before = status.get("conditions")
        after = set_condition(before, PROGRESS, cond[0], cond[1], cond[2], now_iso(),
                              (dpo.get("metadata") or {}).get("generation"))
        out = dict(patch)
        if changed(before, after):
            out["conditions"] = after
        if out:
            memo.kube.patch_dpojob_status(namespace, name, out)
