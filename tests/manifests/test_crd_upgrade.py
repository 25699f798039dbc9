"""The documented CRD upgrade step (charts/kubedpo/README.md): `helm show crds` piped to a
server-side `kubectl apply` before `helm upgrade`. Checked: what it applies is exactly the chart's
CRD files, each a valid apiextensions.k8s.io/v1 object for the oldest and newest Kubernetes, the
DPOJob CRD equal to the generated one, with one served+storage version."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from kubedpo_operator.crd import build_crd
from tests.manifests.conftest import CHART, run_helm

K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
README = (CHART / "README.md").read_text()


def test_readme_documents_the_pre_upgrade_step() -> None:
    assert "helm show crds charts/kubedpo | kubectl apply --server-side --force-conflicts -f -" in README


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_helm_show_crds_is_what_the_upgrade_applies(helm: str, k8s: str) -> None:
    proc = run_helm(helm, "show", "crds", str(CHART))
    assert proc.returncode == 0, proc.stderr
    shown = [d for d in yaml.safe_load_all(proc.stdout) if d]
    files = [d for f in sorted((CHART / "crds").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    assert sorted(d["metadata"]["name"] for d in shown) == sorted(d["metadata"]["name"] for d in files)
    for crd in shown:
        kubernetes_validate.validate(crd, k8s, strict=True)
    dpojob = next(d for d in shown if d["metadata"]["name"] == "dpojobs.kubedpo.io")
    assert dpojob == build_crd()
    versions = dpojob["spec"]["versions"]
    assert sum(v["storage"] for v in versions) == 1 and all(v["served"] for v in versions)
