"""From a raw DPOJob to checked children, or a SpecError naming the field: the one path that the
operator's handlers, `kubedpo validate` and the tests all take.

Order: metadata.name; the CRD schema exactly as the API server enforces it (types: no "2" for an
integer, no "inf"); pydantic (cross-field rules, reserved names, embedded core/v1 objects); the
operator's allow-lists; then every child is built and checked against Kubernetes' own schemas
(oldest and newest supported release) and semantic rules. Pure: no API calls.
"""

from __future__ import annotations

from typing import Any

from .api import DPOJobSpec, SpecError, check_name, parse_spec
from .child_checks import child_problems
from .children import build_children
from .crd import spec_schema_problems
from .policy import policy_problems
from .settings import OperatorSettings


def admit(name: Any, raw_spec: Any, settings: OperatorSettings) -> DPOJobSpec:
    """The parsed spec, or SpecError naming the first offending field."""
    check_name(name)
    if not isinstance(raw_spec, dict):
        raise SpecError("spec", "expected a mapping")
    problems = spec_schema_problems(raw_spec)
    if problems:
        raise SpecError(*problems[0])
    spec = parse_spec(raw_spec)
    problems = policy_problems(spec, settings)
    if problems:
        raise SpecError(*problems[0])
    return spec


def plan_attempt(name: str, namespace: str, uid: str, spec: DPOJobSpec, attempt: int,
                 settings: OperatorSettings, active_deadline_seconds: int | None = None) -> list[dict[str, Any]]:
    """The attempt's children, each checked; SpecError names `<Kind> <child name>: <field>`."""
    children = build_children(name, namespace, uid, spec, attempt, settings, active_deadline_seconds)
    for child in children:
        problems = child_problems(child)
        if problems:
            field, message = problems[0]
            raise SpecError(f"{child['kind']} {child['metadata'].get('name')}: {field}", message)
    return children


def check_manifest(doc: dict[str, Any], settings: OperatorSettings | None = None) -> DPOJobSpec:
    """What the operator would do with this DPOJob, short of the API calls (for `kubedpo validate`)."""
    settings = settings or OperatorSettings()
    raw_meta = doc.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    spec = admit(meta.get("name"), doc.get("spec"), settings)
    plan_attempt(meta["name"], meta.get("namespace") or "default", "validate", spec, 0, settings,
                 spec.run_policy.active_deadline_seconds)
    return spec
