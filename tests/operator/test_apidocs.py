"""docs/api.md is generated from the CRD and says what the schema says."""

from __future__ import annotations

from kubedpo_operator.apidocs import render
from kubedpo_operator.crd import build_crd
from tests.manifests.tools import ROOT


def test_api_md_is_the_generated_one() -> None:
    assert (ROOT / "docs" / "api.md").read_text() == render(), "stale: run `make crd`"


def test_every_spec_field_of_the_crd_is_documented() -> None:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    text = render()
    for section in ("model", "data", "training", "checkpoint", "output", "runPolicy"):
        assert f"### `spec.{section}`" in text, section
        for field, node in spec["properties"][section].get("properties", {}).items():
            assert f"| `{field}` |" in text, f"spec.{section}.{field}"
            first_words = " ".join(node.get("description", "").split()[:4]).replace("|", "\\|")
            assert first_words in text, f"spec.{section}.{field}: description missing"
    assert "**Required.** Policy (and optional reference) model" in text
