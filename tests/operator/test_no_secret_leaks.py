"""Nothing secret is copied anywhere but the pod template that needs it (issue 9 §2).

A secret-looking value rides a literal `env` entry and a Secret referenced by `envFrom` (and a
`secretKeyRef`); the DPOJob goes through creation, a refused metrics read, running, a restart
and success with every logger at DEBUG. The value must appear in no ConfigMap, Service, DPOJob
status or annotation (kopf's last-handled-configuration included), event, or log record.
"""

from __future__ import annotations

import base64
import json
import logging

from tests.operator.conftest import NS, eventually, minimal_spec

SECRET = "AKIAZZSECRETVALUE0123456789/abcDEF+xyz"


async def test_secret_values_never_leave_the_pod_template(cluster, operator, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, every level
    await cluster.create("Secret", {"apiVersion": "v1", "kind": "Secret",
                                    "metadata": {"name": "s3-credentials", "namespace": NS},
                                    "data": {"AWS_SECRET_ACCESS_KEY": base64.b64encode(SECRET.encode()).decode()}})
    await operator.start()
    spec = minimal_spec(
        workers=2, metrics={"port": 1}, runPolicy={"maxRestarts": 1},
        env=[{"name": "HF_TOKEN", "value": SECRET},
             {"name": "AWS_SECRET_ACCESS_KEY",
              "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}}}],
        envFrom=[{"secretRef": {"name": "s3-credentials"}}])
    await cluster.create_dpojob("leak", spec)
    job = await eventually(lambda: cluster.get("Job", "leak-0"))
    assert SECRET in json.dumps(job["spec"]["template"])  # the pod needs it: the one place it may be
    await cluster.set_job("leak-0", active=2)
    await eventually(lambda: _phase(cluster, "leak", "Running"))
    await cluster.patch("DPOJob", "leak", {"metadata": {"generation": 2}, "spec": {"runPolicy": {"suspend": True}}})
    await eventually(lambda: _phase(cluster, "leak", "Suspended"))
    await cluster.patch("DPOJob", "leak", {"metadata": {"generation": 3}, "spec": {"runPolicy": {"suspend": False}}})
    await cluster.set_job("leak-0", failed=1, condition="Failed", reason="BackoffLimitExceeded")
    await eventually(lambda: cluster.get("Job", "leak-1"))
    await cluster.set_job("leak-1", succeeded=2, condition="Complete")
    await eventually(lambda: _phase(cluster, "leak", "Succeeded"))

    dpo = await cluster.get("DPOJob", "leak")
    places = {
        "DPOJob status": dpo["status"],
        "DPOJob annotations": dpo["metadata"].get("annotations"),
        "ConfigMaps": await cluster.list("ConfigMap"),
        "Services": await cluster.list("Service"),
        "events": await cluster.list("Event"),
    }
    assert "kubedpo.io/last-handled-configuration" in (dpo["metadata"].get("annotations") or {})
    for where, value in places.items():
        assert SECRET not in json.dumps(value), f"the secret leaked into {where}"
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug, "DEBUG records were captured"
    leaked = [f"{r.name}:{r.levelname}: {r.getMessage()[:200]}" for r in caplog.records if SECRET in r.getMessage()]
    assert not leaked, leaked


async def _phase(cluster, name: str, phase: str) -> bool:
    return (await cluster.status(name)).get("phase") == phase
