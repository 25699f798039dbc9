"""The chart as a platform team installs it: a subchart of an umbrella chart, a long release name,
a mirror registry, pinned digests, common labels, on the oldest and the newest Kubernetes.

Everything is rendered by the real helm binary (`helm dependency update` packages the chart from
a file:// dependency, offline) and validated strictly against Kubernetes' OpenAPI schemas.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.manifests.conftest import CHART, MONITORING_API, by_kind, one, run_helm

K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())  # Chart.yaml kubeVersion, newest known
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "ClusterKopfPeering", "KopfPeering", "PrometheusRule"}
RELEASE_53 = "team-ml-platform-preference-tuning-production-eu-west"  # helm's own limit is 53
DIGEST = "sha256:" + "ab" * 32
assert len(RELEASE_53) == 53


@pytest.fixture(scope="module")
def umbrella(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("umbrella") / "platform"
    (root / "templates").mkdir(parents=True)
    (root / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "platform", "version": "1.0.0", "kubeVersion": ">=1.28.0-0",
        "dependencies": [{"name": "kubedpo", "version": "0.1.0", "repository": f"file://{CHART}",
                          "condition": "kubedpo.enabled"}],
    }))
    (root / "values.yaml").write_text(yaml.safe_dump({
        "global": {"imageRegistry": "mirror.internal:5000", "storageClass": "fast"},  # parent's own globals too
        "kubedpo": {
            "enabled": True,
            "replicas": 2, "peering": {"enabled": True},
            "image": {"digest": DIGEST},
            "commonLabels": {"team": "ml-platform"},
            "metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}},
        },
    }))
    proc = run_helm(helm, "dependency", "update", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def _template(helm: str, chart: Path, *extra: str) -> list[dict]:
    proc = run_helm(helm, "template", RELEASE_53, str(chart), "--namespace", "ml-system", "--include-crds",
                    "--api-versions", MONITORING_API, *extra)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_umbrella_lints(helm: str, umbrella: Path) -> None:
    proc = run_helm(helm, "lint", "--strict", "--with-subcharts", str(umbrella))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_umbrella_with_53_character_release_is_valid(helm: str, umbrella: Path, k8s: str) -> None:
    docs = _template(helm, umbrella, "--kube-version", k8s)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "PodMonitor", "ServiceMonitor"} <= kinds
    names: set[tuple[str, str]] = set()
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63, f"{doc['kind']}/{name}: {len(name)} characters"
        assert (doc["kind"], name) not in names, f"two {doc['kind']} named {name}"
        names.add((doc["kind"], name))
        if doc["kind"] not in CRD_KINDS:
            try:
                kubernetes_validate.validate(doc, k8s, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{doc['kind']}/{name} on Kubernetes {k8s}: {err.message} at {list(err.path)}")
        if doc["kind"] != "CustomResourceDefinition":
            assert doc["metadata"]["labels"]["team"] == "ml-platform", f"{doc['kind']}/{name}: no commonLabels"
    service = one(docs, "Service")["metadata"]["name"]
    assert service.endswith("-metrics") and len(service) <= 63  # DNS-1035: a Service name must fit


def test_umbrella_images_use_the_mirror_and_the_digest(helm: str, umbrella: Path) -> None:
    docs = _template(helm, umbrella)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"mirror.internal:5000/kubedpo/operator@{DIGEST}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBEDPO_DEFAULT_IMAGE"] == "mirror.internal:5000/kubedpo/trainer:0.1.0"


def test_umbrella_condition_disables_the_subchart(helm: str, umbrella: Path) -> None:
    docs = _template(helm, umbrella, "--set", "kubedpo.enabled=false")
    assert not [d for d in docs if d["kind"] != "CustomResourceDefinition"]


def test_pdb_only_with_two_or_more_replicas(render) -> None:
    assert not by_kind(render(), "PodDisruptionBudget")
    docs = render(sets=["replicas=2", "peering.enabled=true"])
    pdb, deploy = one(docs, "PodDisruptionBudget"), one(docs, "Deployment")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()


def test_bad_digest_is_rejected_by_the_schema(helm: str) -> None:
    proc = run_helm(helm, "template", "dpo", str(CHART), "--set", "image.digest=latest")
    assert proc.returncode != 0 and "/image/digest" in proc.stderr, proc.stderr


def test_copied_chart_is_self_contained(tmp_path: Path, helm: str) -> None:
    """What `helm package` ships renders on its own (no file outside the chart is read)."""
    copy = tmp_path / "kubedpo"
    shutil.copytree(CHART, copy)
    proc = run_helm(helm, "template", "dpo", str(copy))
    assert proc.returncode == 0, proc.stderr
