"""A finished DPOJob's `status.result`: rank 0's termination message, checked. Pure, no I/O.

The trainer writes its task's result (kubedpo_trainer/result.py) to KUBEDPO_RESULT_FILE, which the
operator points at /dev/termination-log; the kubelet keeps the file's text (at most 4096 bytes)
in the pod's `status.containerStatuses[].state.terminated.message` after the container exits.
The text comes from inside a container, so it is treated as untrusted input: it must be one JSON
object of at most RESULT_MAX_BYTES, whose values are finite numbers, strings, booleans, null, or
one level of maps of those (judge: errors by kind, winRates by name). Anything else is refused
with a reason (status says so) rather than copied into status, where it would lie or bloat it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from kubedpo_trainer.stage_config import RESULT_MAX_BYTES

from .children import CONTAINER
from .conditions import set_condition

# Condition False when rank 0's termination message was refused (absent: no result, no condition).
RESULT_CONDITION = "ResultAvailable"
# Indexed Jobs label (1.28+) and annotate each pod with its completion index.
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
MAX_STRING = 1024


class BadResult(ValueError):
    """A termination message that is not a result kubedpo can store; says why."""


def _scalar(key: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadResult(f"{key}: {value} is not a finite number")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise BadResult(f"{key}: a string of {len(value)} characters (at most {MAX_STRING})")
        return value
    raise BadResult(f"{key}: {type(value).__name__} is not a number or a string")


def _refuse_constant(name: str) -> Any:
    raise BadResult(f"{name} is not a finite number")


def parse_result(text: str) -> dict[str, Any]:
    """The result object in a termination message, or BadResult saying what is wrong with it."""
    size = len(text.encode())
    if size > RESULT_MAX_BYTES:
        raise BadResult(f"{size} bytes (a result holds at most {RESULT_MAX_BYTES})")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise BadResult(f"not JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(value, dict):
        raise BadResult(f"a JSON {type(value).__name__}, not an object")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out[key] = {str(k): _scalar(f"{key}.{k}", v) for k, v in item.items()}
        else:
            out[key] = _scalar(key, item)
    return out


def _index(pod: Mapping[str, Any]) -> str | None:
    meta = pod.get("metadata") or {}
    return (meta.get("labels") or {}).get(INDEX_KEY) or (meta.get("annotations") or {}).get(INDEX_KEY)


def rank0_message(pods: Iterable[Mapping[str, Any]], job: str, label: str) -> str | None:
    """The trainer container's termination message of the Job's index-0 pod that exited 0.

    A retried index may leave failed pods beside the succeeded one: only exit code 0 counts.
    None when no such pod (or message) is found.
    """
    for pod in pods:
        meta = pod.get("metadata") or {}
        if (meta.get("labels") or {}).get(label) != job or _index(pod) != "0":
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            done = (cs.get("state") or {}).get("terminated") or {}
            if cs.get("name") == CONTAINER and done.get("exitCode") == 0 and done.get("message"):
                return str(done["message"])
    return None


def result_patch(pods: Iterable[Mapping[str, Any]], job: str, label: str,
                 conditions: list[dict[str, Any]] | None, now: str, generation: int | None = None
                 ) -> dict[str, Any]:
    """The status fields a succeeded Job's rank-0 result adds: `result`, or, when the message was
    refused, condition ResultAvailable=False saying why. Nothing when rank 0 wrote no message."""
    text = rank0_message(pods, job, label)
    if text is None:
        return {}
    try:
        return {"result": parse_result(text)}
    except BadResult as err:
        why = f"the termination message of pod index 0 of Job {job} was refused: {err}"
        return {"conditions": set_condition(conditions, RESULT_CONDITION, False, "ResultRefused", why, now,
                                            generation)}
