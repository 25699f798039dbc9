"""The chart's CRD is a byte-for-byte copy of the generated one (scripts/sync-chart-crds.sh), never edited.

That crds/ itself equals `kubedpo crd` is checked by `make lint`; here only the copy is checked.
"""

from __future__ import annotations

import subprocess

import kubernetes_validate
import yaml

from tests.manifests.conftest import CHART, ROOT

GENERATED = ROOT / "crds" / "kubedpo.io_dpojobs.yaml"
CHART_COPY = CHART / "crds" / "kubedpo.io_dpojobs.yaml"
GENERATED_ALL = [GENERATED, ROOT / "crds" / "kubedpo.io_dpopipelines.yaml"]
SYNC = ROOT / "scripts" / "sync-chart-crds.sh"


def test_chart_crds_equal_generated_crds() -> None:
    for generated in GENERATED_ALL:
        copy = CHART / "crds" / generated.name
        assert copy.read_bytes() == generated.read_bytes(), (
            f"{copy.relative_to(ROOT)} differs from {generated.relative_to(ROOT)}: "
            "run scripts/sync-chart-crds.sh (never edit the chart copy)")


def test_sync_script_check_mode_detects_drift(tmp_path) -> None:
    ok = subprocess.run(["bash", str(SYNC), "--check"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    # Same script on a copy of the tree layout with a drifted chart CRD: --check must fail, sync must fix.
    (tmp_path / "scripts").mkdir()
    (tmp_path / "crds").mkdir()
    (tmp_path / "charts/kubedpo/crds").mkdir(parents=True)
    script = tmp_path / "scripts" / SYNC.name
    script.write_bytes(SYNC.read_bytes())
    for generated in GENERATED_ALL:  # every generated CRD, in sync but for the drifted one
        (tmp_path / "crds" / generated.name).write_bytes(generated.read_bytes())
        (tmp_path / "charts/kubedpo/crds" / generated.name).write_bytes(generated.read_bytes())
    drifted = tmp_path / "charts/kubedpo/crds" / CHART_COPY.name
    drifted.write_text(GENERATED.read_text().replace("served: true", "served: false"))
    stale = subprocess.run(["bash", str(script), "--check"], capture_output=True, text=True, timeout=30)
    assert stale.returncode == 1 and "stale" in stale.stderr
    subprocess.run(["bash", str(script)], check=True, capture_output=True, timeout=30)
    assert drifted.read_bytes() == GENERATED.read_bytes()


def test_chart_crds_are_valid_kubernetes() -> None:
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kubernetes_validate.validate(doc, "1.30.0", strict=True)
