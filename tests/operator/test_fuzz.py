"""Fuzzed manifests: rejected by the CRD schema, or Failed with a field-naming SpecError, or valid
and buildable. Never any other exception (which would be a crash/retry loop in a handler)."""

from __future__ import annotations

import copy

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubedpo_operator.api import SpecError, parse_spec
from kubedpo_operator.children import build_children
from kubedpo_operator.settings import OperatorSettings
from tests.operator.conftest import minimal_spec
from tests.operator.test_crd import openapi_schema, to_jsonschema

SCHEMA = to_jsonschema(openapi_schema()["properties"]["spec"])
KEYS = ["workers", "gpusPerWorker", "model", "data", "training", "checkpoint", "output", "runPolicy", "env",
        "resources", "uri", "beta", "loss", "referenceUri", "everySteps", "maxRestarts", "queueName", "lora",
        "rank", "maxLength", "batchSize", "name", "limits", "nvidia.com/gpu", "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 5000), st.floats(allow_nan=False, width=32),
                    st.sampled_from(["", "simpo", "sigmoid", "s3://bkt/p/", "x" * 70]))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                   st.dictionaries(st.sampled_from(KEYS), c, max_size=3)),
                      max_leaves=6)
paths = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3)


def _mutate(spec: dict, path: list[str], value: object) -> dict:
    spec = copy.deepcopy(spec)
    node = spec
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = node[key] = {}
        node = nxt
    node[path[-1]] = value
    return spec


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(paths, values), min_size=1, max_size=3))
def test_fuzzed_specs_are_rejected_or_fail_naming_a_field_or_build(mutations):
    spec = minimal_spec(workers=2)
    for path, value in mutations:
        spec = _mutate(spec, path, value)
    schema_ok = jsonschema.Draft202012Validator(SCHEMA).is_valid(spec)
    try:
        parsed = parse_spec(spec)
    except SpecError as err:
        assert err.field.startswith("spec"), err
        assert str(err).startswith(err.field)
        return
    if not schema_ok:
        return  # the API server rejects it before the operator sees it (pydantic is laxer, e.g. True→1)
    children = build_children("fuzz", "ns", "uid", parsed, 0, OperatorSettings())
    assert [c["kind"] for c in children] == ["ConfigMap", "Service", "Job"]
