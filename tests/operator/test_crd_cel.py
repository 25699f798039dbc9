"""The CRD's CEL rules (x-kubernetes-validations), compiled and run by Google's CEL runtime.

No API server runs here, so without this the rules would first execute in a user's cluster.
cel-expr-python is the C++ implementation of the CEL spec that Kubernetes' cel-go also
implements; the Kubernetes-only extension libraries are not used by our rules (a rule that
needs them fails to compile here, which is the point). As the API server does, a rule runs
only where its field is present, and a transition rule (one that reads `oldSelf`) only on
update, when the field exists in both the old and the new object.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cel_expr_python import cel

from kubedpo_operator.api import SpecError, parse_spec
from tests.operator.test_crd import CRD_FILE, DPOJOB_EXAMPLES

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = DPOJOB_EXAMPLES
MISSING = object()
ENV = cel.NewEnv(variables={"self": cel.Type.DYN, "oldSelf": cel.Type.DYN})


def _rules(node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, str]]]:
    for rule in node.get("x-kubernetes-validations", []):
        yield path, rule
    for name, sub in (node.get("properties") or {}).items():
        yield from _rules(sub, (*path, name))
    for key in ("items", "additionalProperties"):  # not supported below: fail loudly if added
        if isinstance(node.get(key), dict):
            assert not list(_rules(node[key])), f"{'.'.join(path)}.{key}: rules under lists/maps need a walker"


SCHEMA = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
RULES = [(path, rule, ENV.compile(rule["rule"])) for path, rule in _rules(SCHEMA)]


def _at(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return MISSING
        obj = obj[key]
    return obj


def violations(new: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Messages of the rules `new` breaks (on update from `old` when given)."""
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
        result = expr.eval(data=data).value()
        assert isinstance(result, bool), f"{rule['rule']}: evaluated to {result!r}, not a bool"
        if not result:
            out.append(f"{'.'.join(path)}: {rule['message']}")
    return out


def example(name: str = "tiny-cpu.yaml") -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def test_every_rule_compiles_and_the_immutable_sections_have_one() -> None:
    where = {".".join(path) for path, rule, _ in RULES if rule["rule"] == "self == oldSelf"}
    assert where == {"spec.model", "spec.data"}
    assert any(path == ("spec", "training") and "oldSelf" in rule["rule"] for path, rule, _ in RULES)
    assert len(RULES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_on_create_and_on_a_no_op_update(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind") == "DPOJob"]
    assert docs
    for doc in docs:
        assert violations(doc) == []
        assert violations(doc, old=copy.deepcopy(doc)) == []


@pytest.mark.parametrize(("field", "value", "message"), [
    (("spec", "training", "beta"), 0.5, "spec.training: training is immutable except batchSize"),
    (("spec", "model", "uri"), "s3://other/model/", "spec.model: model is immutable"),
    (("spec", "data", "train"), "s3://other/prefs/", "spec.data: data is immutable"),
    (("spec", "training", "loss"), "ipo", "spec.training: training is immutable except batchSize"),
    (("spec", "workers"), 4, None),  # the gang restarts at the new size (rescale.py)
    (("spec", "training", "gradientAccumulationSteps"), 2, None),  # keeps the global batch with workers
    (("spec", "training", "batchSize"), 16, None),
    (("spec", "runPolicy", "suspend"), True, None),  # suspend/resume is the point of runPolicy
    (("spec", "runPolicy", "maxRestarts"), 5, None),
    (("spec", "checkpoint", "everySteps"), 50, None),
    (("spec", "resources", "limits", "memory"), "8Gi", None),
])
def test_updates_to_training_inputs_are_refused_and_run_policy_is_not(field: tuple[str, ...], value: Any,
                                                                        message: str | None) -> None:
    old = example()
    new = copy.deepcopy(old)
    node = new
    for key in field[:-1]:
        node = node.setdefault(key, {})
    node[field[-1]] = value
    got = violations(new, old)
    if message is None:
        assert got == []
    else:
        assert len(got) == 1 and got[0].startswith(message), got


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"training": {"loss": "simpo"}, "model": {"uri": "s3://models/m/", "referenceUri": "s3://models/r/"}},
     "training.loss", "simpo is reference-free"),
    ({"checkpoint": {"everySteps": 10}}, "checkpoint.uri", "required when everySteps/everyMinutes is set"),
    ({"checkpoint": {"everyMinutes": 5.0}}, "checkpoint.uri", "required when everySteps/everyMinutes is set"),
])
def test_cross_field_rules_match_the_operators_own_check(change: dict[str, Any], field: str, message: str) -> None:
    """CEL refuses at `kubectl apply` what the operator's pydantic check would fail later, and both name the field."""
    doc = example()
    doc["spec"].update(change)
    if "checkpoint" in change:
        doc["spec"]["checkpoint"].pop("uri", None)
    got = violations(doc)
    assert len(got) == 1 and message in got[0], got
    with pytest.raises(SpecError) as err:
        parse_spec(doc["spec"])
    assert field in str(err.value)
    doc["spec"] = example()["spec"]  # and the unchanged example is accepted by both
    assert violations(doc) == [] and parse_spec(doc["spec"])


@pytest.mark.parametrize(("change", "cel_message", "field"), [
    ({"metadata": {"name": "job.v2"}}, "DNS-1035 label", "metadata.name"),
    ({"metadata": {"name": "1st-run"}}, "DNS-1035 label", "metadata.name"),
    ({"metadata": {"name": "x" * 53}}, "at most 52", "metadata.name"),
    ({"spec": {"env": [{"name": "RANK", "value": "3"}]}}, "set by the operator", "spec.env[0].name"),
    ({"spec": {"env": [{"name": "KUBEDPO_ATTEMPT", "value": "3"}]}}, "set by the operator", "spec.env[0].name"),
    ({"spec": {"model": {"uri": "s3://AKIA:secret@bucket/m/"}}}, "no credentials in URIs", "spec.model.uri"),
    ({"spec": {"s3": {"endpointUrl": "http://user:pw@minio:9000"}}}, "no credentials in URIs",
     "spec.s3.endpointUrl"),
    ({"spec": {"metrics": {"port": 29500}}}, "rendezvous port", "spec.metrics.port"),
])
def test_admission_rules_refuse_what_the_operator_refuses(change: dict[str, Any], cel_message: str,
                                                          field: str) -> None:
    """CEL refuses at `kubectl apply`; the operator's own admission (for `kubedpo validate`, and for a
    CRD installed without the rules) refuses the same, naming the same field."""
    from kubedpo_operator.admission import check_manifest

    doc = example()
    doc["metadata"].update(change.get("metadata", {}))
    doc["spec"].update(change.get("spec", {}))
    got = violations(doc)
    assert len(got) == 1 and cel_message in got[0], got
    with pytest.raises(SpecError) as err:
        check_manifest(doc)
    assert err.value.field == field, err.value


def test_strings_the_rules_read_are_bounded_so_the_api_servers_cost_estimate_stays_small() -> None:
    """The API server refuses a CRD whose rules' estimated cost is over budget, and costs an
    unbounded string at the request-size limit: every string a rule scans has a maxLength."""
    assert SCHEMA["properties"]["metadata"]["properties"]["name"]["maxLength"] == 52
    spec = SCHEMA["properties"]["spec"]
    assert spec["properties"]["env"]["items"]["properties"]["name"]["maxLength"] <= 256
    assert spec["properties"]["env"]["maxItems"] <= 256
    for path, rule, _ in RULES:
        node = SCHEMA
        for key in path:
            node = node["properties"][key]
        if node.get("type") == "string":
            assert node.get("maxLength"), f"{'.'.join(path)}: {rule['rule']} scans an unbounded string"
