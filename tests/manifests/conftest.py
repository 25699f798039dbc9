"""Fixtures for the chart and Dockerfile tests: a real helm binary and rendered chart output."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.manifests.tools import ROOT, require_tool

CHART = ROOT / "charts" / "kubedpo"
SCENARIOS = sorted((CHART / "ci").glob("*.yaml"))
RELEASE, NAMESPACE = "dpo", "kubedpo-system"
# What a cluster with prometheus-operator serves: monitors render only when it is there.
MONITORING_API = "monitoring.coreos.com/v1"

Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def helm() -> str:
    return require_tool("helm")


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """render(values_file=None, sets=(), crds=False, api_versions=(MONITORING_API,)) -> documents, in order."""

    def _render(values_file: Path | None = None, sets: Sequence[str] = (), crds: bool = False,
                api_versions: Sequence[str] = (MONITORING_API,)) -> list[dict]:
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        for api in api_versions:
            args += ["--api-versions", api]
        if values_file is not None:
            args += ["-f", str(values_file)]
        for s in sets:
            args += ["--set", s]
        if crds:
            args.append("--include-crds")
        proc = run_helm(helm, *args)
        assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stderr}"
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    return _render


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]
