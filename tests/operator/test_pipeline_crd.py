"""The DPOPipeline CRD: generated from pipeline_api.py, structural and documented, with CEL rules
that run (Google's CEL runtime, as in test_crd_cel.py) and columns that say where a pipeline is."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cel_expr_python import cel

from kubedpo_operator.crd import to_jsonschema
from kubedpo_operator.pipeline_api import PIPELINE_MAX_NAME, parse_pipeline_spec
from kubedpo_operator.pipeline_crd import build_pipeline_crd, pipeline_schema_problems, render_pipeline_crd
from tests.operator.test_crd import _walk
from tests.operator.test_crd_cel import MISSING, _at, _rules

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "kubedpo.io_dpopipelines.yaml"
CHART_COPY = ROOT / "charts" / "kubedpo" / "crds" / "kubedpo.io_dpopipelines.yaml"
ENV = cel.NewEnv(variables={"self": cel.Type.DYN, "oldSelf": cel.Type.DYN})


def pipeline(name: str = "iter", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubedpo.io/v1alpha1", "kind": "DPOPipeline", "metadata": {"name": name},
            "spec": {"model": {"uri": "s3://models/tiny/"}, "prompts": {"train": "s3://prompts/train/"},
                     "judge": {"kind": "llm", "llm": {"url": "http://judge:8000/v1", "model": "j"}},
                     "output": "s3://runs/iter/", "rounds": 2, **spec}}


def schema() -> dict[str, Any]:
    return build_pipeline_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crd_and_chart_copy_equal_the_generator() -> None:
    assert CRD_FILE.read_text() == render_pipeline_crd(), "run `make crd`; never edit the CRD by hand"
    assert CHART_COPY.read_bytes() == CRD_FILE.read_bytes(), "run scripts/sync-chart-crds.sh"


def test_schema_is_structural_and_documented() -> None:
    forbidden = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "title", "const"}
    for path, node in _walk(schema()):
        assert ("type" in node or node.get("x-kubernetes-preserve-unknown-fields")
                or node.get("x-kubernetes-int-or-string")), path
        assert not forbidden & set(node), path
        if path.startswith(("$.spec", "$.status")) and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description (kubectl explain)"


def test_names_columns_and_status_subresource_say_where_the_pipeline_is() -> None:
    crd = build_pipeline_crd()
    names, version = crd["spec"]["names"], crd["spec"]["versions"][0]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("DPOPipeline", "dpopipelines", ["dpop"])
    assert version["subresources"] == {"status": {}}
    cols = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(cols)[:5] == ["Phase", "Stage", "Round", "Pairs", "Win-Rate"]
    status = schema()["properties"]["status"]["properties"]
    for path in cols.values():  # every column reads a field the status schema declares
        parts = path.strip(".").split(".")
        if parts[0] == "status":
            assert parts[1].split("[")[0] in status, path
    assert "pairs" in status["results"]["items"]["properties"]


def test_the_pipelines_wiring_is_not_part_of_the_users_judge() -> None:
    judge = schema()["properties"]["spec"]["properties"]["judge"]
    assert "generations" not in judge["properties"] and "compare" not in judge["properties"]
    assert "generations" not in judge.get("required", [])
    doc = pipeline()
    assert pipeline_schema_problems(doc["spec"]) == []
    doc["spec"]["judge"]["compare"] = {"x": ["a", "b"]}
    assert pipeline_schema_problems(doc["spec"]) == [("spec.judge", "unknown field ('compare' was unexpected)")]
    with pytest.raises(ValueError, match="compare: set by the pipeline"):
        parse_pipeline_spec(doc["spec"])


def test_schema_refuses_what_the_api_server_would() -> None:
    doc = pipeline(rounds="2")
    assert pipeline_schema_problems(doc["spec"])[0][0] == "spec.rounds"
    assert pipeline_schema_problems(pipeline(rounds=0)["spec"])[0][0] == "spec.rounds"
    jsonschema.validate(pipeline(), to_jsonschema(schema()))


RULES = [(path, rule, ENV.compile(rule["rule"])) for path, rule in _rules(yaml.safe_load(CRD_FILE.read_text())
                                                                          ["spec"]["versions"][0]["schema"]
                                                                          ["openAPIV3Schema"])]


def violations(new: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    out = []
    for path, rule, expr in RULES:
        value = _at(new, path)
        if value is MISSING:
            continue
        data = {"self": value}
        if "oldSelf" in rule["rule"]:
            before = _at(old, path) if old is not None else MISSING
            if before is MISSING:
                continue
            data["oldSelf"] = before
        if not expr.eval(data=data).value():
            out.append(f"{'.'.join(path)}: {rule['message']}")
    return out


def test_cel_rules_name_length_immutability_and_credentials() -> None:
    ok = pipeline()
    assert violations(ok) == [] and violations(ok, copy.deepcopy(ok)) == []
    assert violations(pipeline(name="a" * PIPELINE_MAX_NAME)) == []
    long = violations(pipeline(name="a" * (PIPELINE_MAX_NAME + 1)))
    assert len(long) == 1 and f"at most {PIPELINE_MAX_NAME} characters" in long[0]
    moved = pipeline(output="s3://runs/other/")
    assert [v.split(":")[0] for v in violations(moved, ok)] == ["spec.output"]
    more = pipeline(rounds=3)
    assert violations(more, ok) == [] and violations(ok, more) == ["spec.rounds: rounds may grow (more "
                                                                   "rounds), never shrink"]
    leaky = pipeline(output="s3://key:secret@host/runs/")
    assert any("no credentials in URIs" in v for v in violations(leaky))
    env = pipeline(env=[{"name": "KUBEDPO_RESULT_FILE", "value": "/x"}])
    assert any("set by the operator" in v for v in violations(env))
