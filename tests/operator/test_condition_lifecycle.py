"""Real kopf on kmock: a DPOJob's conditions through run → suspend → resume → succeed.

The emulator bumps metadata.generation on every spec change like a real API server (conftest),
so each condition's observedGeneration is checked against what the operator actually saw.
"""

from __future__ import annotations

import re
from typing import Any

from tests.operator.conftest import eventually, minimal_spec

STATES = ("Created", "Running", "Suspended", "Succeeded", "Failed")
REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _conditions(dpo: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The conditions by type, after checking the conventions every one of them must follow."""
    conds = dpo["status"]["conditions"]
    types = [c["type"] for c in conds]
    assert len(types) == len(set(types)), types
    assert set(STATES) <= set(types), types
    generation = dpo["metadata"]["generation"]
    for c in conds:
        assert REASON.match(c["reason"]) and c["message"] and RFC3339.match(c["lastTransitionTime"]), c
        assert c["observedGeneration"] == generation, (c, generation)
    return {c["type"]: c for c in conds}


def _table(conds: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {t: (conds[t]["status"], conds[t]["reason"]) for t in STATES}


async def _dpojob_in(cluster: Any, name: str, phase: str, generation: int) -> dict[str, Any] | None:
    dpo = await cluster.get("DPOJob", name) or {}
    st = dpo.get("status") or {}
    ok = st.get("phase") == phase and dpo["metadata"]["generation"] == generation
    return dpo if ok and all(c.get("observedGeneration") == generation for c in st.get("conditions") or []) else None


async def test_conditions_through_run_suspend_resume_succeed(cluster, operator):
    await operator.start()
    await cluster.create_dpojob("cond", minimal_spec(workers=2))
    await eventually(lambda: cluster.get("Job", "cond-0"))
    dpo = await eventually(lambda: _dpojob_in(cluster, "cond", "Pending", 1))
    created = await eventually(lambda: _created(cluster, "cond"))
    assert "cond-0" in created["message"]

    await cluster.set_job("cond-0", active=2)
    conds = _conditions(await eventually(lambda: _dpojob_in(cluster, "cond", "Running", 1)))
    assert _table(conds) == {"Created": ("True", "JobCreated"), "Running": ("True", "Running"),
                             "Suspended": ("False", "Running"), "Succeeded": ("False", "Running"),
                             "Failed": ("False", "Running")}
    running_since = conds["Running"]["lastTransitionTime"]
    created_at = conds["Created"]["lastTransitionTime"]

    await cluster.patch("DPOJob", "cond", {"spec": {"runPolicy": {"suspend": True}}})
    dpo = await eventually(lambda: _dpojob_in(cluster, "cond", "Suspended", 2))
    conds = _conditions(dpo)
    assert _table(conds) == {"Created": ("True", "JobCreated"), "Running": ("False", "Suspended"),
                             "Suspended": ("True", "Suspended"), "Succeeded": ("False", "Suspended"),
                             "Failed": ("False", "Suspended")}
    assert conds["Running"]["message"] == dpo["status"]["message"] and "suspend" in conds["Running"]["message"]
    await cluster.set_job("cond-0", active=0, condition="Suspended")

    await cluster.patch("DPOJob", "cond", {"spec": {"runPolicy": {"suspend": False}}})
    await eventually(lambda: _job_resumed(cluster, "cond-0"))
    await cluster.set_job("cond-0", active=2)
    await eventually(lambda: _dpojob_in(cluster, "cond", "Running", 3))
    await cluster.set_job("cond-0", succeeded=2, condition="Complete")
    dpo = await eventually(lambda: _dpojob_in(cluster, "cond", "Succeeded", 3))
    conds = _conditions(dpo)
    assert _table(conds) == {"Created": ("True", "JobCreated"), "Running": ("False", "Succeeded"),
                             "Suspended": ("False", "Succeeded"), "Succeeded": ("True", "Succeeded"),
                             "Failed": ("False", "Succeeded")}
    assert all(conds[t]["message"] == dpo["status"]["message"] for t in STATES[1:])
    assert dpo["status"]["observedGeneration"] == 3
    assert conds["Created"]["lastTransitionTime"] == created_at  # never flipped: one attempt
    assert conds["Running"]["lastTransitionTime"] >= running_since
    assert "Pending" not in conds and "Restarting" not in conds


async def _created(cluster: Any, name: str) -> dict[str, Any] | None:
    conds = {c["type"]: c for c in (await cluster.status(name)).get("conditions") or []}
    c = conds.get("Created")
    return c if c and c["status"] == "True" and c["reason"] == "JobCreated" else None


async def _job_resumed(cluster: Any, name: str) -> bool:
    job = await cluster.get("Job", name)
    return bool(job) and job["spec"].get("suspend") is False
