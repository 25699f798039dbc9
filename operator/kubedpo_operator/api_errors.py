"""Is an error from creating a child final (fail the DPOJob) or worth retrying, and when? Pure.

- Refused: our own SpecError, the kubernetes client's own validation (ValueError/TypeError,
  pydantic), or an API server 4xx other than 409 (handled as "exists") and 429: the same request
  will be refused again, so the DPOJob goes Failed with the field and the server's message.
- Retry: 5xx, 429 and transport errors: exponential backoff from `base` doubling per attempt up
  to `cap`, never sooner than the server's Retry-After.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from .api import SpecError

MAX_MESSAGE = 900  # events and conditions stay readable; the API server truncates at 1 KiB anyway


@dataclass(frozen=True)
class Refused:
    field: str
    message: str
    status: int | None = None


@dataclass(frozen=True)
class Retry:
    delay: float
    reason: str


def _body(err: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _retry_after(err: ApiException) -> float:
    headers = err.headers or {}
    raw = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return max(0.0, float(raw)) if raw is not None else 0.0
    except (TypeError, ValueError):
        return 0.0  # an HTTP date: rare from the API server; fall back to our own backoff


def backoff(attempt: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds before retry number `attempt` (0-based): base, 2*base, 4*base... up to cap."""
    return min(cap, base * 2 ** min(max(attempt, 0), 30))


def classify(err: BaseException, what: str, attempt: int = 0, base: float = 1.0,
             cap: float = 300.0) -> Refused | Retry:
    """`what` names the request (e.g. "create Job x-0"): it leads the message and the field."""
    if isinstance(err, SpecError):
        return Refused(err.field, err.message)
    if isinstance(err, ApiException):
        body = _body(err)
        status = err.status or 0
        message = str(body.get("message") or err.reason or f"HTTP {status}")[:MAX_MESSAGE]
        if status == 429 or status >= 500 or status == 0:
            delay = max(_retry_after(err), backoff(attempt, base, cap))
            return Retry(delay, f"{what}: API server answered {status} {err.reason or ''}: {message}".strip())
        causes = (body.get("details") or {}).get("causes") or []
        fields = [c.get("field") for c in causes if isinstance(c, dict) and c.get("field")]
        field = f"{what}: {fields[0]}" if fields else what
        return Refused(field, f"API server refused ({status} {err.reason or ''}): {message}", status)
    if isinstance(err, OSError | urllib3.exceptions.HTTPError):  # connection refused/reset, timeouts
        return Retry(backoff(attempt, base, cap), f"{what}: {type(err).__name__}: {str(err)[:MAX_MESSAGE]}")
    if isinstance(err, ValueError | TypeError):  # the kubernetes client's own checks, pydantic included
        return Refused(what, f"kubernetes client refused: {str(err)[:MAX_MESSAGE]}")
    # Anything else is a bug of ours: retrying cannot fix it, and a Failed condition quoting it is
    # what lets a user (and us) see it instead of an endless "Pending".
    return Refused(what, f"operator error {type(err).__name__}: {str(err)[:MAX_MESSAGE]}")
