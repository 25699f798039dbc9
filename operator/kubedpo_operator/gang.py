"""Why a gang is not running yet, from its pods and its Job's events: pure functions, no I/O.

A Job's `active` counts pods that exist, running or not, so "active" alone made unschedulable
gangs look like they train. The gang runs once every worker is ready (the Job's `ready`);
until then the DPOJob stays Pending, and this module names the reason a person can act on:
a pod the scheduler cannot place, an image that cannot be pulled, a container whose Secret or
ConfigMap is missing, or pods the Job controller cannot create at all (a missing
ServiceAccount or PriorityClass, a quota): those show only as the Job's FailedCreate events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Container waiting reasons that will not resolve by waiting alone.
STUCK_WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError", "RunContainerError")
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


def all_ready(job: Mapping[str, Any]) -> bool:
    """Every worker ready. Without `ready` (API servers before 1.24), `active` is all there is."""
    st = job.get("status") or {}
    want = int((job.get("spec") or {}).get("parallelism") or 1)
    if "ready" not in st:
        return int(st.get("active") or 0) >= want
    return int(st.get("ready") or 0) >= want


def gang_problem(pods: Iterable[Mapping[str, Any]], job_events: Iterable[Mapping[str, Any]]
                 ) -> tuple[str, str] | None:
    """(CamelCase reason, message) of the first thing keeping the gang from running, or None."""
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("name", "")):
        name = pod.get("metadata", {}).get("name", "?")
        st = pod.get("status") or {}
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                return c.get("reason") or "Unschedulable", f"pod {name}: {c.get('message') or 'not scheduled'}"
        for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING:
                return waiting["reason"], f"pod {name}, container {cs.get('name')}: {waiting.get('message') or ''}"
    failed = [e for e in job_events if e.get("reason") == "FailedCreate" and e.get("type") == "Warning"]
    if failed:
        newest = max(failed, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        return "FailedCreate", f"the Job cannot create pods: {newest.get('message', '')}"
    return None
