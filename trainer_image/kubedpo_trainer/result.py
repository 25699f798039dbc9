"""A finished task's result for whoever started it: the operator (termination message) or a script.

Rank 0 writes one small JSON object to the file named by `KUBEDPO_RESULT_FILE`. On Kubernetes the
operator points it at /dev/termination-log, so the kubelet keeps it in the pod's status after the
container exits and the operator copies it into the DPOJob's `status.result` (a DPOPipeline reads
its stages' results there); the local runner reads the file directly. Kubernetes keeps at most
4096 bytes of a termination message, so a result that does not fit is refused here, loudly,
rather than cut into invalid JSON.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .stage_config import RESULT_FILE_ENV, RESULT_MAX_BYTES


def encode_result(result: dict[str, Any]) -> str:
    """Compact JSON; non-finite numbers become null (Kubernetes' JSON has no Infinity or NaN)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    text = json.dumps(clean(result), separators=(",", ":"), sort_keys=True, allow_nan=False)
    if len(text.encode()) > RESULT_MAX_BYTES:
        raise ValueError(f"task result is {len(text.encode())} bytes; a termination message holds "
                         f"{RESULT_MAX_BYTES}: keep results to counts and rates")
    return text


def write_result(result: dict[str, Any], rank: int = 0) -> Path | None:
    """Write the result on rank 0 when KUBEDPO_RESULT_FILE is set; return the path written."""
    target = os.environ.get(RESULT_FILE_ENV)
    if rank != 0 or not target:
        return None
    path = Path(target)
    text = encode_result(result)
    if path.parent != Path("/dev"):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def read_result(path: str | Path) -> dict[str, Any] | None:
    """The result a task wrote, or None if it wrote none (or not valid JSON)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
