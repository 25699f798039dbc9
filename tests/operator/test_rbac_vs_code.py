"""The chart's RBAC grants exactly what the operator uses: no more, no less (issue 9 §2).

What the operator uses is derived, not listed by hand, from two sources:
- static: every Kubernetes client method kubedpo_operator/kube.py calls (`self.core.X`,
  `self.batch.X`, `self.custom.X`), parsed with `ast` and mapped to (apiGroup, resource, verb);
- recorded: every request the operator (kopf's own client and ours, told apart from this test's
  requests by User-Agent) sent to the kmock API server while one DPOJob went through creation,
  a pending gang, running, progress, suspend/resume, a restart and TTL deletion.
A DPOPipeline then creates its first stage DPOJob, runs it and suspends it (pipeline_kube.py's
calls are recorded). The chart's ClusterRole (cluster-wide mode, rendered by a real helm) must equal their union,
per resource and verb, except the few grants the API server itself requires without a call
(listed in NOT_CALLS, each with its reason).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedpo_operator.api import GROUP, PLURAL
from kubedpo_operator.pipeline_api import PIPELINE_PLURAL
from tests.manifests.conftest import CHART, run_helm
from tests.manifests.tools import require_tool
from tests.operator.conftest import NS, eventually, minimal_spec

KUBE_PY = Path(__file__).parents[2] / "operator" / "kubedpo_operator" / "kube.py"
API_GROUPS = {"core": "", "batch": "batch", "custom": GROUP, "net": "networking.k8s.io"}
VERB_PREFIX = {"read": "get", "get": "get", "list": "list", "create": "create", "patch": "patch", "delete": "delete",
               "replace": "update"}
RESOURCES = {"config_map": "configmaps", "service": "services", "job": "jobs", "pod": "pods", "event": "events",
             "network_policy": "networkpolicies",
             "custom_object": PLURAL, "custom_object_status": f"{PLURAL}/status"}
# Granted without a call of ours: the API server checks them on our behalf.
NOT_CALLS = {
    # OwnerReferencesPermissionEnforcement: children set blockOwnerDeletion on their DPOJob owner.
    (GROUP, f"{PLURAL}/finalizers"): {"update"},
    # The same for stage DPOJobs owned by a DPOPipeline.
    (GROUP, f"{PIPELINE_PLURAL}/finalizers"): {"update"},
}
Rules = dict[tuple[str, str], set[str]]


def static_calls(source: str) -> Rules:
    """(group, resource) -> verbs for every `self.<core|batch|custom>.<method>` in kube.py."""
    out: Rules = defaultdict(set)
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"
                and node.value.attr in API_GROUPS):
            continue
        m = re.fullmatch(r"(read|get|list|create|patch|delete|replace)_namespaced_(\w+)", node.attr)
        assert m and m.group(2) in RESOURCES, f"kube.py calls {node.attr}: teach this test its resource/verb"
        out[(API_GROUPS[node.value.attr], RESOURCES[m.group(2)])].add(VERB_PREFIX[m.group(1)])
    return out


def request_rule(method: str, path: str, watch: bool) -> tuple[str, str, str] | None:
    """(group, resource[/subresource], verb) of one API request; None for discovery URLs."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) > 3:
        group, rest = parts[1], parts[3:]
    else:
        return None  # /api, /apis, /apis/<group>/<version>: discovery, granted to every user
    if len(rest) > 2 and rest[0] == "namespaces":
        rest = rest[2:]
    if not rest:
        return None
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    if method == "GET":
        verb = "watch" if watch else ("get" if len(rest) > 1 else "list")
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
    return group, resource, verb


def chart_rules(helm: str) -> Rules:
    proc = run_helm(helm, "template", "dpo", str(CHART), "--namespace", "kubedpo-system",
                    "--set", "networkPolicy.enabled=true")  # every optional code path on
    assert proc.returncode == 0, proc.stderr
    role = next(d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "ClusterRole"
                and d["metadata"]["name"] == "dpo-kubedpo")
    out: Rules = defaultdict(set)
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out[(group, resource)] |= set(rule["verbs"])
    return out


def test_static_analysis_sees_the_client_calls() -> None:
    calls = static_calls(KUBE_PY.read_text())
    assert "list" in calls[("batch", "jobs")] and "patch" in calls[(GROUP, f"{PLURAL}/status")]
    assert request_rule("GET", f"/apis/batch/v1/namespaces/{NS}/jobs", watch=True) == ("batch", "jobs", "watch")
    assert request_rule("PATCH", f"/apis/{GROUP}/v1alpha1/namespaces/{NS}/{PLURAL}/x/status", False) == (
        GROUP, f"{PLURAL}/status", "patch")
    assert request_rule("GET", "/apis/batch/v1", False) is None


async def _scenario(cluster: Any) -> None:
    """One DPOJob through the paths that talk to the API server."""
    await cluster.create_dpojob("rb", minimal_spec(workers=2, metrics={"port": 1},
                                                   runPolicy={"maxRestarts": 1, "ttlSecondsAfterFinished": 0}))
    await eventually(lambda: cluster.get("Job", "rb-0"))
    await cluster.set_job("rb-0", active=2, ready=1)  # pending gang: pods and events are read
    await cluster.set_job("rb-0", active=2)
    await eventually(lambda: _phase(cluster, "rb", "Running"))
    await cluster.patch("DPOJob", "rb", {"metadata": {"generation": 2}, "spec": {"runPolicy": {"suspend": True}}})
    await eventually(lambda: _phase(cluster, "rb", "Suspended"))
    await cluster.patch("DPOJob", "rb", {"metadata": {"generation": 3}, "spec": {"runPolicy": {"suspend": False}}})
    await cluster.set_job("rb-0", failed=1, condition="Failed", reason="BackoffLimitExceeded")
    await eventually(lambda: cluster.get("Job", "rb-1"))
    await cluster.set_job("rb-1", succeeded=2, condition="Complete")
    await eventually(lambda: _absent(cluster, "rb"))  # TTL 0: the operator deletes the DPOJob
    # A DPOPipeline: its first stage DPOJob created, running, suspended through the pipeline.
    await cluster.create_pipeline("pl", {
        "model": {"uri": "s3://models/tiny/"}, "prompts": {"train": "s3://prompts/"}, "output": "s3://runs/pl/",
        "judge": {"kind": "llm", "llm": {"url": "http://judge:8000/v1", "model": "m"}}})
    await eventually(lambda: cluster.get("Job", "pl-r1-generate-0"))
    await cluster.set_job("pl-r1-generate-0", active=1)
    await eventually(lambda: _pipeline_phase(cluster, "pl", "Running"))
    await cluster.patch("DPOPipeline", "pl", {"metadata": {"generation": 2}, "spec": {"runPolicy": {"suspend": True}}})
    await eventually(lambda: _pipeline_phase(cluster, "pl", "Suspended"))


async def test_chart_rbac_equals_what_the_code_uses(cluster, operator, kmock) -> None:
    helm = require_tool("helm")
    await operator.start(network_policy=True)
    await _scenario(cluster)
    recorded: Rules = defaultdict(set)
    for req in kmock:
        agent = req.headers.get("User-Agent", "")
        if agent.startswith(("kopf/", "OpenAPI-Generator/")):
            rule = request_rule(req.method, req.url.path, req.params.get("watch") == "true")
            if rule:
                recorded[rule[:2]].add(rule[2])
    used: Rules = defaultdict(set)
    for source in (recorded, static_calls(KUBE_PY.read_text()), NOT_CALLS):
        for key, verbs in source.items():
            used[key] |= verbs
    granted = chart_rules(helm)
    extra = {k: sorted(granted[k] - used.get(k, set())) for k in granted if granted[k] - used.get(k, set())}
    missing = {k: sorted(used[k] - granted.get(k, set())) for k in used if used[k] - granted.get(k, set())}
    assert not extra, f"the chart grants verbs no code path uses: {extra}"
    assert not missing, f"the operator uses verbs the chart does not grant: {missing}"
    assert recorded[(GROUP, PLURAL)] >= {"watch", "list", "patch", "create"}  # kopf's and the pipeline's calls
    assert recorded[(GROUP, f"{PIPELINE_PLURAL}/status")] == {"patch"}


async def _phase(cluster: Any, name: str, phase: str) -> bool:
    return (await cluster.status(name)).get("phase") == phase


async def _pipeline_phase(cluster: Any, name: str, phase: str) -> bool:
    return (((await cluster.get("DPOPipeline", name)) or {}).get("status") or {}).get("phase") == phase


async def _absent(cluster: Any, name: str) -> bool:
    return await cluster.get("DPOJob", name) is None


@pytest.mark.parametrize("verb", ["escalate", "bind", "impersonate", "*"])
def test_chart_grants_no_privilege_escalation_verbs(verb: str) -> None:
    rules = chart_rules(require_tool("helm"))
    assert not any(verb in verbs for verbs in rules.values())
