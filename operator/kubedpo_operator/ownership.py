"""Which children are this DPOJob's: by owner uid, never by name alone.

A DPOJob deleted and re-created under the same name gets a new uid, while the old one's
children may still exist until the garbage collector removes them. Reading them back by name
would adopt the old run's Job (and report its old result as the new run's); so every child
read back is checked against the DPOJob's uid, and one owned by anything else is foreign:
the operator waits for the collector instead of creating or acting on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .children import LABEL_ATTEMPT, LABEL_JOB


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid for r in refs)


def owner_uids(obj: Mapping[str, Any]) -> list[str]:
    return [str(r.get("uid")) for r in (obj.get("metadata") or {}).get("ownerReferences") or []]


def attempt_of(obj: Mapping[str, Any]) -> int | None:
    raw = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_ATTEMPT, "")
    return int(raw) if str(raw).isdigit() else None


def selector(name: str) -> str:
    return f"{LABEL_JOB}={name}"


def owned_jobs(jobs: Iterable[Mapping[str, Any]], name: str, uid: str) -> dict[int, Mapping[str, Any]]:
    """attempt -> Job, for the Jobs that carry this DPOJob's labels AND its uid as owner.

    Labels are re-checked here: a list's label selector is the server's filter, and not every
    server (or emulator) applies it.
    """
    out: dict[int, Mapping[str, Any]] = {}
    for job in jobs:
        labels = (job.get("metadata") or {}).get("labels") or {}
        attempt = attempt_of(job)
        if labels.get(LABEL_JOB) == name and attempt is not None and owned_by(job, uid):
            out[attempt] = job
    return out


def foreign_message(kind: str, obj: Mapping[str, Any], uid: str) -> str:
    name = (obj.get("metadata") or {}).get("name")
    return (f"{kind} {name} exists but is not owned by this DPOJob (uid {uid}; its owners: "
            f"{', '.join(owner_uids(obj)) or 'none'}): probably left by a deleted DPOJob of the same name; "
            "waiting for the garbage collector to remove it")


class ForeignChild(Exception):  # noqa: N818 - a state, not a failure of ours
    """A child's name is taken by an object this DPOJob does not own."""

    def __init__(self, kind: str, obj: Mapping[str, Any], uid: str) -> None:
        self.message = foreign_message(kind, obj, uid)
        super().__init__(self.message)
