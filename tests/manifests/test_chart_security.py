"""The chart's security options (issue 9 §2), rendered by a real helm and validated against
Kubernetes' own schemas (strict) for the oldest and newest releases the chart supports:
the user-facing roles kubedpo-edit/-view, and the per-attempt NetworkPolicy the operator builds
from the settings the chart gives it.
"""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from kubedpo_operator.api import GROUP, PLURAL, parse_spec
from kubedpo_operator.children import build_children
from kubedpo_operator.k8s_openapi import supported_versions
from kubedpo_operator.settings import OperatorSettings
from tests.manifests.conftest import NAMESPACE, ROOT, by_kind, one

VERSIONS = [f"{v}.0" if v.count(".") == 1 else v for v in supported_versions()]
EXAMPLE = ROOT / "examples" / "tiny-cpu.yaml"


def _validate(doc: dict) -> None:
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {err.message}")


def _role(docs: list[dict], name: str) -> dict:
    return next(r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"] == name)


def _verbs(role: dict, resource: str) -> set[str]:
    return {v for r in role["rules"] if GROUP in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}


def test_user_roles_aggregate_into_edit_and_view(render) -> None:
    docs = render()
    edit, view = _role(docs, "kubedpo-edit"), _role(docs, "kubedpo-view")
    for role in (edit, view):
        _validate(role)
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {"create", "update", "patch", "delete"} <= _verbs(edit, PLURAL)
    assert _verbs(view, PLURAL) == {"get", "list", "watch"} == _verbs(view, f"{PLURAL}/status")
    assert "update" not in _verbs(edit, f"{PLURAL}/status")  # status is the operator's to write
    for role in (edit, view):  # only DPOJobs: pods, secrets etc. stay with the built-in roles
        assert {g for r in role["rules"] for g in r["apiGroups"]} == {GROUP}


def test_user_roles_can_be_granted_deliberately_instead(render) -> None:
    docs = render(sets=["userRoles.aggregate=false"])
    assert not any(k.startswith("rbac.authorization.k8s.io/aggregate")
                   for r in (_role(docs, "kubedpo-edit"), _role(docs, "kubedpo-view")) for k in r["metadata"]["labels"])
    assert not [r for r in by_kind(render(sets=["userRoles.create=false"]), "ClusterRole")
                if r["metadata"]["name"].startswith("kubedpo-")]


def test_network_policy_admits_only_the_gang_and_the_metrics_scrapers(render) -> None:
    docs = render(sets=["networkPolicy.enabled=true"])
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    settings = OperatorSettings.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})
    assert settings.network_policy is True
    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = parse_spec(doc["spec"])
    children = build_children(doc["metadata"]["name"], "team-a", "uid-1", spec, 3, settings)
    assert [c["kind"] for c in children][-2:] == ["NetworkPolicy", "Job"]  # in place before any pod starts
    policy, job = children[-2], children[-1]
    _validate(policy)
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    gang = policy["spec"]["podSelector"]["matchLabels"]
    assert gang.items() <= pod_labels.items() and gang["kubedpo.io/attempt"] == "3"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    same_gang, metrics = policy["spec"]["ingress"]
    assert same_gang == {"from": [{"podSelector": {"matchLabels": gang}}]}  # rendezvous: nobody else
    assert metrics["ports"] == [{"port": spec.metrics.port, "protocol": "TCP"}]
    operator_peer, prometheus_peer = metrics["from"]
    operator_pod = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert operator_peer["podSelector"]["matchLabels"].items() <= operator_pod.items()
    assert operator_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
    assert prometheus_peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    rules = [r for r in _operator_rules(docs) if "networkpolicies" in r["resources"]]
    assert rules and set(rules[0]["verbs"]) == {"get", "create", "delete"}


def test_network_policy_is_off_by_default(render) -> None:
    docs = render()
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    settings = OperatorSettings.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})
    assert settings.network_policy is False
    assert not [r for r in _operator_rules(docs) if "networkpolicies" in r["resources"]]


def _operator_rules(docs: list[dict]) -> list[dict]:
    return [r for role in by_kind(docs, "ClusterRole") if not role["metadata"]["name"].startswith("kubedpo-")
            for r in role["rules"]]
