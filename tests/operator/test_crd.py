"""The CRD: generated file is current, structural, and accepts the examples / rejects bad specs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubedpo_operator.crd import build_crd, render_crd, to_jsonschema

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "kubedpo.io_dpojobs.yaml"


def openapi_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate(manifest: dict) -> None:
    jsonschema.validate(manifest, to_jsonschema(openapi_schema()))


def test_checked_in_crd_equals_generator_output():
    assert CRD_FILE.read_text() == render_crd(), "run `make crd`; never edit the CRD by hand"


def _walk(node: dict, path: str = "$"):
    yield path, node
    for k, v in (node.get("properties") or {}).items():
        yield from _walk(v, f"{path}.{k}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_and_documented():
    forbidden = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "title", "const"}
    for path, node in _walk(openapi_schema()):
        assert ("type" in node or node.get("x-kubernetes-preserve-unknown-fields")
                or node.get("x-kubernetes-int-or-string")), path
        assert not forbidden & set(node), path
        assert not (node.get("properties") and "additionalProperties" in node), path
        if path.startswith(("$.spec", "$.status")) and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description (kubectl explain)"
        assert "x-kubedpo-core" not in node and "x-kubedpo-many" not in node, path


def test_kubernetes_objects_embed_core_v1_schemas_so_explain_works_and_typos_are_refused():
    spec = openapi_schema()["properties"]["spec"]["properties"]
    env = spec["env"]["items"]
    assert env["required"] == ["name"] and set(env["properties"]) == {"name", "value", "valueFrom"}
    assert "secretKeyRef" in env["properties"]["valueFrom"]["properties"]
    limits = spec["resources"]["properties"]["limits"]["additionalProperties"]
    assert limits["x-kubernetes-int-or-string"] is True and "pattern" in limits
    term = spec["affinity"]["properties"]["nodeAffinity"]["properties"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in term
    assert "persistentVolumeClaim" in spec["pod"]["properties"]["volumes"]["items"]["properties"]
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    doc["spec"]["env"] = [{"name": "A", "valu": "typo"}]
    with pytest.raises(jsonschema.ValidationError, match="valu"):
        validate(doc)
    doc["spec"]["env"] = [{"name": "A", "value": "x"}]
    doc["spec"]["resources"] = {"limits": "4Gi"}
    with pytest.raises(jsonschema.ValidationError, match="4Gi"):
        validate(doc)


def test_crd_names_columns_and_rules():
    crd = build_crd()
    assert crd["spec"]["names"]["shortNames"] == ["dpoj"]
    v = crd["spec"]["versions"][0]
    assert v["subresources"] == {"status": {}}
    cols = [c["name"] for c in v["additionalPrinterColumns"] if not c.get("priority")]
    assert cols == ["Phase", "Step", "Loss", "Reward-Acc", "Restarts", "Age"]
    spec = v["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["data"]["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"
    assert "self.beta == oldSelf.beta" in spec["properties"]["training"]["x-kubernetes-validations"][0]["rule"]
    assert "x-kubernetes-validations" not in spec["properties"]["workers"]  # mutable: the gang restarts
    assert spec["properties"]["workers"]["minimum"] == 1
    assert spec["properties"]["training"]["properties"]["loss"]["enum"][0] == "sigmoid"
    beta = spec["properties"]["training"]["properties"]["beta"]
    assert beta["minimum"] == 0 and beta["exclusiveMinimum"] is True and beta["default"] == 0.1


# The DPOJob examples (a DPOPipeline example is checked by tests/operator/test_pipeline_plan.py).
DPOJOB_EXAMPLES = [p for p in sorted((ROOT / "examples").glob("*.yaml")) if "\nkind: DPOJob\n" in p.read_text()]


@pytest.mark.parametrize("path", DPOJOB_EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_schema(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s.update(workers=0), "workers"),
    (lambda s: s["training"].update(beta=0), "beta"),
    (lambda s: s["training"].update(loss="dpo++"), "loss"),
    (lambda s: s.pop("output"), "output"),
    (lambda s: s["model"].update(dtype="int3"), "dtype"),
])
def test_schema_rejects_bad_specs(mutate, field):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    doc = copy.deepcopy(doc)
    mutate(doc["spec"])
    with pytest.raises(jsonschema.ValidationError) as err:
        validate(doc)
    assert field in str(err.value.path) + err.value.message


def test_crd_is_a_valid_apiextensions_object():
    import kubernetes_validate

    kubernetes_validate.validate(build_crd(), kubernetes_validate.latest_version(), strict=True)
