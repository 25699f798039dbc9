"""From a raw DPOPipeline to its checked stage DPOJobs, or a SpecError naming the field.

The pipeline's own checks (name, the CRD schema as the API server enforces it, pydantic), then
every planned stage goes through exactly what a DPOJob of that spec would meet (admission.py:
schema, policy, children checked against Kubernetes' schemas), so a pipeline that passes here
does not fail in round 3 on a stage the operator refuses. Pure: no API calls.
"""

from __future__ import annotations

from typing import Any

from .admission import admit, plan_attempt
from .api import SpecError
from .pipeline_api import DPOPipelineSpec, parse_pipeline_spec
from .pipeline_crd import pipeline_schema_problems
from .pipeline_plan import PlannedStage, check_pipeline_name, plan_pipeline
from .settings import OperatorSettings


def admit_pipeline(name: Any, raw_spec: Any, settings: OperatorSettings) -> tuple[DPOPipelineSpec,
                                                                                    list[PlannedStage]]:
    """The parsed spec and its stages (each admitted as a DPOJob), or SpecError naming the field."""
    check_pipeline_name(name)
    if not isinstance(raw_spec, dict):
        raise SpecError("spec", "expected a mapping")
    problems = pipeline_schema_problems(raw_spec)
    if problems:
        raise SpecError(*problems[0])
    spec = parse_pipeline_spec(raw_spec)
    stages = plan_pipeline(name, spec)
    for stage in stages:
        try:
            admit(stage.job_name, stage.wire_spec(), settings)
        except SpecError as err:
            raise SpecError(err.field, f"{err.message} (in stage {stage.name})") from None
    return spec, stages


def check_pipeline_manifest(doc: dict[str, Any], settings: OperatorSettings | None = None) -> DPOPipelineSpec:
    """What the operator would do with this DPOPipeline, short of API calls (`kubedpo validate`):
    every stage's children are built and checked too."""
    settings = settings or OperatorSettings()
    raw_meta = doc.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    spec, stages = admit_pipeline(meta.get("name"), doc.get("spec"), settings)
    for stage in stages:
        try:
            plan_attempt(stage.job_name, meta.get("namespace") or "default", "validate", stage.spec, 0, settings,
                         stage.spec.run_policy.active_deadline_seconds)
        except SpecError as err:
            raise SpecError(err.field, f"{err.message} (in stage {stage.name})") from None
    return spec
