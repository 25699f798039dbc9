"""The Helm chart, rendered by a real helm binary and checked against Kubernetes' schemas and the operator.

Cross-checks with the Python side are the point: the env the chart sets must parse into
OperatorSettings, its RBAC must cover every child kubedpo_operator.children builds, and its
PodMonitor must select the pods build_job creates.
"""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kubedpo_operator import alerts
from kubedpo_operator.api import GROUP, PLURAL, parse_spec
from kubedpo_operator.children import build_children, build_job
from kubedpo_operator.settings import OperatorSettings
from tests.manifests.conftest import CHART, NAMESPACE, ROOT, SCENARIOS, by_kind, one, run_helm

K8S_VERSION = "1.30.0"
# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest schemas known.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
# Kinds whose schemas live in CRDs rather than Kubernetes' OpenAPI: checked structurally below.
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ClusterKopfPeering", "KopfPeering"}
EXAMPLE = ROOT / "examples" / "tiny-cpu.yaml"


def scenario_id(path: Path) -> str:
    return path.stem


def operator_env(docs: list[dict]) -> dict[str, str]:
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def example_spec():
    doc = yaml.safe_load(EXAMPLE.read_text())
    return doc["metadata"]["name"], parse_spec(doc["spec"])


# --- helm lint / template / schema --------------------------------------------------------------

@pytest.mark.parametrize("values", [None, *SCENARIOS], ids=["defaults", *map(scenario_id, SCENARIOS)])
def test_helm_lint_strict(helm: str, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values", [None, *SCENARIOS], ids=["defaults", *map(scenario_id, SCENARIOS)])
@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_every_rendered_manifest_is_valid_kubernetes(render, values: Path | None, k8s: str) -> None:
    """Strict validation (unknown fields rejected) against the oldest and newest OpenAPI schemas."""
    docs = render(values, crds=True)
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] in ("monitoring.coreos.com/v1", "kopf.dev/v1"), name
            continue
        try:
            kubernetes_validate.validate(doc, k8s, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name} ({values}, Kubernetes {k8s}): {err.message} at {list(err.path)}")


@pytest.mark.parametrize(("sets", "field"), [
    (["replicas=abc"], "/replicas"),
    (["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["operator.logFormat=xml"], "/operator/logFormat"),
    (["operator.metricsPort=70000"], "/operator/metricsPort"),
    (["metrics.podMonitor.interval=often"], "/metrics/podMonitor/interval"),
    (["replicas=2"], "/peering/enabled"),  # HA without peering: two active operators
    (["operatr.verbose=true"], "operatr"),  # a typo is an error, not silently ignored
])
def test_values_schema_rejects_bad_values(helm: str, sets: list[str], field: str) -> None:
    args = ["template", "dpo", str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm, *args)
    assert proc.returncode != 0, f"helm template --set {sets} was accepted"
    assert field in proc.stderr, f"error does not name {field}:\n{proc.stderr}"


def test_kube_version_constraint(helm: str) -> None:
    too_old = run_helm(helm, "template", "dpo", str(CHART), "--kube-version", "1.27.0")
    assert too_old.returncode != 0 and "kubeVersion" in too_old.stderr, too_old.stderr
    assert run_helm(helm, "template", "dpo", str(CHART), "--kube-version", K8S_VERSION).returncode == 0


def test_every_value_is_documented_in_schema() -> None:
    """Each key of values.yaml has a schema property with a description (helm-docs and IDE help)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: object, node: dict, path: str) -> None:
        assert node.get("description"), f"values.schema.json: {path or '<root>'} has no description"
        if isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: additionalProperties must be false"
            for key, sub in value.items():
                assert key in node["properties"], f"values.yaml: {path}.{key} is not in values.schema.json"
                walk(sub, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")


def test_every_value_has_a_helm_docs_comment() -> None:
    """A key is documented by a `# --` comment above it, or all its children are."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    keys = []  # (indent, key, documented)
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped or line.startswith("  " * 8):
            continue
        j = i - 1
        comment = []
        while j >= 0 and lines[j].lstrip().startswith("#"):
            comment.append(lines[j].strip())
            j -= 1
        keys.append((len(line) - len(stripped), stripped.split(":")[0], any(c.startswith("# --") for c in comment)))
    missing = []
    for n, (indent, key, documented) in enumerate(keys):
        children = []
        for ind2, _, doc2 in keys[n + 1:]:
            if ind2 <= indent:
                break
            children.append((ind2, doc2))
        parent_documented = any(k[2] and k[0] < indent for k in _ancestors(keys, n))
        if not documented and not parent_documented and not children:
            missing.append(key)
    assert not missing, f"values.yaml keys without a `# --` comment: {missing}"


def _ancestors(keys: list[tuple[int, str, bool]], n: int) -> list[tuple[int, str, bool]]:
    out, indent = [], keys[n][0]
    for k in reversed(keys[:n]):
        if k[0] < indent:
            out.append(k)
            indent = k[0]
    return out


# --- the operator Deployment ----------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, *SCENARIOS], ids=["defaults", *map(scenario_id, SCENARIOS)])
def test_operator_env_parses_into_settings(render, values: Path | None) -> None:
    """Every KUBEDPO_* variable the chart sets is a settings field, and parses (no typo goes unnoticed)."""
    env = operator_env(render(values))
    fields = {f"KUBEDPO_{name.upper()}" for name in OperatorSettings.__dataclass_fields__}
    unknown = sorted(k for k in env if k.startswith("KUBEDPO_") and k not in fields)
    assert not unknown, f"chart sets env vars OperatorSettings does not read: {unknown}"
    OperatorSettings.from_env(env)


def test_namespaced_scenario_values_reach_the_operator(render) -> None:
    settings = OperatorSettings.from_env(operator_env(render(CHART / "ci" / "namespaced-values.yaml")))
    assert settings.namespaces.split(",") == ["team-a", "team-b"]
    assert settings.peering_name == "team-ab"
    assert settings.default_image == "registry.example.com/ml/kubedpo-trainer:0.1.0-cu128"
    assert (settings.run_as_user, settings.shm_size_limit, settings.progress_interval_s) == (2000, "16Gi", 5.0)
    assert settings.metrics_timeout_s == 3.0  # via operator.extraEnv


def test_defaults_run_clusterwide_standalone_with_chart_trainer_image(render) -> None:
    docs = render()
    settings = OperatorSettings.from_env(operator_env(docs))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert settings.namespaces == "" and settings.peering_name == ""
    assert settings.default_image.endswith(f":{chart['appVersion']}")
    deploy = one(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"


def test_probe_and_ports_match_the_operator_settings(render) -> None:
    docs = render(sets=["operator.metricsPort=9191", "operator.healthPort=9292"])
    settings = OperatorSettings.from_env(operator_env(docs))
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["command"] == ["kubedpo", "operator"]
    assert ports["metrics"] == settings.operator_metrics_port == 9191
    assert settings.liveness_endpoint == f"http://0.0.0.0:{ports['health']}/healthz"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= one(docs, "Deployment")["spec"]["template"]["metadata"][
        "labels"].items()


def test_operator_pod_meets_restricted_pod_security(render) -> None:
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_helm_test_pod_probes_the_metrics_service(render) -> None:
    docs = render()
    service = one(docs, "Service")
    test_pod = one(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    url = test_pod["spec"]["containers"][0]["command"][-1]
    port = service["spec"]["ports"][0]["port"]
    assert url == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{port}/metrics"


# --- RBAC and peering ---------------------------------------------------------------------------

def _allows(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def _child_resources() -> list[tuple[str, str]]:
    """(apiGroup, plural) of every object the operator creates for a DPOJob."""
    name, spec = example_spec()
    plural = {"ConfigMap": "configmaps", "Service": "services", "Job": "jobs"}
    return [(c["apiVersion"].rpartition("/")[0], plural[c["kind"]])
            for c in build_children(name, "team-a", "uid-1", spec, 0, OperatorSettings())]


def test_clusterwide_rbac_covers_what_the_operator_does(render) -> None:
    rules = _operator_role(render())["rules"]
    for group, resource in _child_resources():
        for verb in ("create", "get", "delete"):
            assert _allows(rules, group, resource, verb), f"ClusterRole cannot {verb} {group}/{resource}"
    assert _allows(rules, "batch", "jobs", "watch")  # the rest: tests/operator/test_rbac_vs_code.py
    for verb in ("watch", "patch"):
        assert _allows(rules, GROUP, PLURAL, verb)
    assert _allows(rules, GROUP, f"{PLURAL}/status", "patch")
    assert _allows(rules, "", "events", "create")
    assert _allows(rules, "apiextensions.k8s.io", "customresourcedefinitions", "watch")
    assert not _allows(rules, "", "secrets", "get"), "the operator never reads Secrets"


def test_namespaced_rbac_grants_only_watched_namespaces(render) -> None:
    docs = render(CHART / "ci" / "namespaced-values.yaml")
    roles = {r["metadata"]["namespace"]: r["rules"] for r in by_kind(docs, "Role")}
    assert sorted(roles) == ["team-a", "team-b"]
    bindings = by_kind(docs, "RoleBinding")
    assert {b["subjects"][0]["name"] for b in bindings} == {"kubedpo-team-ab"}
    for rules in roles.values():
        for group, resource in _child_resources():
            assert _allows(rules, group, resource, "create")
        assert _allows(rules, "kopf.dev", "kopfpeerings", "patch")
    cluster_rules = _operator_role(docs)["rules"]
    assert not _allows(cluster_rules, GROUP, PLURAL, "watch"), "namespaced mode must not watch DPOJobs cluster-wide"
    assert not _allows(cluster_rules, "batch", "jobs", "create")


@pytest.mark.parametrize(("values", "kind", "namespaces"), [
    ("ha-monitoring-values.yaml", "ClusterKopfPeering", [None]),
    ("namespaced-values.yaml", "KopfPeering", ["team-a", "team-b"]),
])
def test_peering_object_matches_the_operator_peering_name(render, values: str, kind: str,
                                                          namespaces: list) -> None:
    docs = render(CHART / "ci" / values, crds=True)
    settings = OperatorSettings.from_env(operator_env(docs))
    peerings = by_kind(docs, kind)
    assert [p["metadata"].get("namespace") for p in peerings] == namespaces
    assert {p["metadata"]["name"] for p in peerings} == {settings.peering_name}
    crd_kinds = {c["spec"]["names"]["kind"] for c in by_kind(docs, "CustomResourceDefinition")}
    assert kind in crd_kinds, "the peering CRD must ship in the chart's crds/"
    assert not by_kind(render(), kind), "no peering object without peering.enabled"


# --- monitoring -----------------------------------------------------------------------------------

def test_monitors_render_only_when_enabled(render) -> None:
    default = render()
    assert not by_kind(default, "ServiceMonitor") and not by_kind(default, "PodMonitor")
    only_pods = render(sets=["metrics.podMonitor.enabled=true"])
    assert len(by_kind(only_pods, "PodMonitor")) == 1 and not by_kind(only_pods, "ServiceMonitor")
    only_svc = render(sets=["metrics.serviceMonitor.enabled=true"])
    assert len(by_kind(only_svc, "ServiceMonitor")) == 1 and not by_kind(only_svc, "PodMonitor")
    # Asked for on a cluster without prometheus-operator's CRDs: skipped (NOTES.txt warns), not a
    # failed install on an object kind the API server does not know.
    no_api = render(CHART / "ci" / "ha-monitoring-values.yaml", api_versions=())
    assert not by_kind(no_api, "ServiceMonitor") and not by_kind(no_api, "PodMonitor")


def test_monitor_relabelings_and_annotations_pass_through(render, tmp_path: Path) -> None:
    relabel = {"sourceLabels": ["__meta_kubernetes_pod_label_team"], "targetLabel": "team"}
    drop = {"sourceLabels": ["__name__"], "regex": "kubedpo_logits_.*", "action": "drop"}
    monitor = {"enabled": True, "relabelings": [relabel], "metricRelabelings": [drop]}
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"metrics": {
        "podMonitor": {**monitor, "annotations": {"a": "b"}},
        "serviceMonitor": {**monitor, "annotations": {"c": "d"}}}}))
    docs = render(values)
    pod, svc = one(docs, "PodMonitor"), one(docs, "ServiceMonitor")
    pod_ep, svc_ep = pod["spec"]["podMetricsEndpoints"][0], svc["spec"]["endpoints"][0]
    assert pod_ep["relabelings"][0]["action"] == "keep"  # rank 0 only, always first
    assert pod_ep["relabelings"][1] == svc_ep["relabelings"][0] == relabel
    assert pod_ep["metricRelabelings"] == svc_ep["metricRelabelings"] == [drop]
    assert pod["metadata"]["annotations"] == {"a": "b"} and svc["metadata"]["annotations"] == {"c": "d"}


def test_chart_ships_the_alert_rules_only_when_enabled(render) -> None:
    """The PrometheusRule embeds the generated rule file unchanged (tests/metrics/test_alerts.py runs it)."""
    assert not [d for d in render() if d["kind"] == "PrometheusRule"]
    docs = render(sets=["prometheusRule.enabled=true", "prometheusRule.labels.release=kps"])
    rule = one(docs, "PrometheusRule")
    assert rule["spec"] == alerts.groups() and rule["metadata"]["labels"]["release"] == "kps"
    assert not [d for d in render(sets=["prometheusRule.enabled=true"], api_versions=()) if d["kind"] == "PrometheusRule"]


def test_service_monitor_selects_the_metrics_service(render) -> None:
    docs = render(CHART / "ci" / "ha-monitoring-values.yaml")
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_pod_monitor_selects_trainer_pods_built_by_the_operator(render) -> None:
    """The PodMonitor's selector and port match the pod template of the Job the operator creates."""
    monitor = one(render(CHART / "ci" / "ha-monitoring-values.yaml"), "PodMonitor")
    name, spec = example_spec()
    template = build_job(name, "team-a", "uid-1", spec, 0, OperatorSettings())["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    port_names = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    assert endpoint["port"] in port_names
    # The dashboard keys on the trainer's `dpojob` label, which needs no honorLabels.
    assert not endpoint.get("honorLabels")
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    operator_labels = one(render(), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= operator_labels.items()


def test_pod_monitor_watches_only_the_watched_namespaces(render) -> None:
    monitor = one(render(CHART / "ci" / "namespaced-values.yaml"), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_dashboard_configmap_ships_the_dashboard_file(render) -> None:
    docs = render(CHART / "ci" / "ha-monitoring-values.yaml")
    maps = [d for d in by_kind(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
    assert len(maps) == 1
    cm = maps[0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    shipped = json.loads(cm["data"]["kubedpo.json"])
    assert shipped == json.loads((CHART / "dashboards" / "kubedpo.json").read_text())
    assert not by_kind(render(CHART / "ci" / "namespaced-values.yaml"), "ConfigMap")


def test_priority_class_is_optional(render) -> None:
    assert not by_kind(render(), "PriorityClass")
    pc = one(render(CHART / "ci" / "ha-monitoring-values.yaml"), "PriorityClass")
    assert pc["metadata"]["name"] == "kubedpo-training" and pc["globalDefault"] is False


def test_operator_pod_name_is_its_kopf_peer_identity(render) -> None:
    """kopf reads POD_ID as the peer id, so the peering object says which pod is active."""
    container = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def _operator_role(docs: list[dict]) -> dict:
    """The operator's ClusterRole (the user-facing kubedpo-edit/-view are checked in test_chart_security)."""
    roles = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"] not in ("kubedpo-edit", "kubedpo-view")]
    assert len(roles) == 1, [r["metadata"]["name"] for r in roles]
    return roles[0]
