"""The DPOPipeline CustomResourceDefinition, generated from pipeline_api.py like the DPOJob's.

`kubedpo crd --kind DPOPipeline > crds/kubedpo.io_dpopipelines.yaml`; `make lint` diffs it. The
same structural conversion as crd.py (one schema, many outputs); what differs is the printer
columns (where the pipeline is: stage, round r/N, the last round's pairs and win rate), the
name limit (stage DPOJobs append `-r<round>-generate`) and which fields are immutable.
"""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
import yaml

from .crd import crd_document, structural, to_jsonschema
from .pipeline_api import (
    PIPELINE_KIND,
    PIPELINE_MAX_NAME,
    PIPELINE_PLURAL,
    PIPELINE_SHORT_NAME,
    PIPELINE_SINGULAR,
    DPOPipelineSpec,
    DPOPipelineStatus,
)
from .spec_rules import RESERVED_ENV, RESERVED_ENV_PREFIX

# The pipeline's own sections first (what a reader looks for), the cluster fields after them.
LEAD = ("model", "prompts", "sft", "rounds", "reference", "generate", "judge", "training", "maxLength",
        "maxPromptLength", "checkpoint", "output", "s3")
SECTION_DOCS = {
    "s3": "S3-compatible store settings of every stage (credentials come from env/envFrom).",
}
# Changing these mid-run would mix two experiments in one output tree: create a new pipeline.
IMMUTABLE = ("model", "prompts", "sft", "judge", "output", "reference")
# (path in spec, label) of URIs that must not carry credentials.
URI_FIELDS = (("model", "uri"), ("prompts", "train"), ("prompts", "heldOut"))
# judge.generations / judge.compare are the pipeline's wiring (PipelineJudge refuses them).
WIRED_JUDGE_FIELDS = ("generations", "compare")

NAME_RULE = {
    "rule": f"size(self.metadata.name) <= {PIPELINE_MAX_NAME} && "
            "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "message": f"metadata.name must be a DNS-1035 label of at most {PIPELINE_MAX_NAME} characters (lower-case "
               "letters, digits and '-', starting with a letter): stage DPOJobs are named "
               "<name>-r<round>-<stage>",
}
NO_CREDENTIALS = "!self.matches('^[A-Za-z][-A-Za-z0-9+.]*://[^/?#]*@')"

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
    {"name": "Round", "type": "string", "jsonPath": ".status.roundOf",
     "description": "Current round / rounds planned."},
    {"name": "Pairs", "type": "integer", "jsonPath": ".status.results[-1:].pairs",
     "description": "Preference pairs of the last finished round."},
    {"name": "Win-Rate", "type": "number", "jsonPath": ".status.results[-1:].winRateVsInitial",
     "description": "Last measured win rate over the initial policy."},
    {"name": "Job", "type": "string", "jsonPath": ".status.currentJob", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def pipeline_spec_schema() -> dict[str, Any]:
    raw = DPOPipelineSpec.model_json_schema(by_alias=True)
    schema = structural(raw, raw.get("$defs", {}))
    schema["description"] = ("SFT (optional), then rounds of generate -> judge -> train, each stage a DPOJob "
                             "the pipeline owns.")
    props = schema["properties"]
    schema["properties"] = props = {**{k: props[k] for k in LEAD if k in props},
                                    **{k: v for k, v in props.items() if k not in LEAD}}
    for name, doc in SECTION_DOCS.items():
        props[name].setdefault("description", doc)
    judge = props["judge"]
    for key in WIRED_JUDGE_FIELDS:
        judge["properties"].pop(key, None)
        if key in judge.get("required", []):
            judge["required"].remove(key)
    for field in IMMUTABLE:
        props[field].setdefault("x-kubernetes-validations", []).append({
            "rule": "self == oldSelf",
            "message": f"{field} is immutable: the pipeline's stages and outputs assume it; create a new "
                       "DPOPipeline",
        })
    props["rounds"]["x-kubernetes-validations"] = [{
        "rule": "self >= oldSelf", "message": "rounds may grow (more rounds), never shrink"}]
    props["output"]["maxLength"] = 4096
    props["output"]["x-kubernetes-validations"].append({
        "rule": NO_CREDENTIALS, "message": "output: no credentials in URIs; put them in a Secret and use envFrom"})
    for section, key in URI_FIELDS:
        field = props[section]["properties"][key]
        field["maxLength"] = field.get("maxLength", 4096)
        field.setdefault("x-kubernetes-validations", []).append({
            "rule": NO_CREDENTIALS,
            "message": f"{section}.{key}: no credentials in URIs; put them in a Secret and use envFrom",
        })
    props["env"]["items"]["properties"]["name"]["maxLength"] = 256
    reserved = ", ".join(f"'{n}'" for n in RESERVED_ENV)
    props["env"]["x-kubernetes-validations"] = [{
        "rule": f"self.all(e, !(e.name in [{reserved}]) && !e.name.startsWith('{RESERVED_ENV_PREFIX}'))",
        "message": f"env: {', '.join(RESERVED_ENV)} and {RESERVED_ENV_PREFIX}* are set by the operator",
    }]
    return schema


def pipeline_status_schema() -> dict[str, Any]:
    raw = DPOPipelineStatus.model_json_schema(by_alias=True)
    schema = structural(raw, raw.get("$defs", {}))
    schema["description"] = "Observed state, written by the operator."
    return schema


def build_pipeline_crd() -> dict[str, Any]:
    return crd_document(PIPELINE_KIND, PIPELINE_PLURAL, PIPELINE_SINGULAR, PIPELINE_SHORT_NAME, PRINTER_COLUMNS,
                        NAME_RULE, PIPELINE_MAX_NAME,
                        "Iterative DPO from one manifest: an optional SFT stage, then rounds of "
                        "generate -> judge -> train, each stage a DPOJob owned by the pipeline.",
                        pipeline_spec_schema(), pipeline_status_schema())


def render_pipeline_crd() -> str:
    header = "# Generated by `kubedpo crd --kind DPOPipeline` from kubedpo_operator/pipeline_api.py: do not edit.\n"
    return header + yaml.safe_dump(build_pipeline_crd(), sort_keys=False, width=100)


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(to_jsonschema(pipeline_spec_schema()))


def pipeline_schema_problems(spec: Any) -> list[tuple[str, str]]:
    """What the API server's schema check refuses in a raw DPOPipeline spec, as (field, message)."""
    out = []
    for err in _validator().iter_errors(spec):
        field = "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        out.append((field, err.message.replace("Additional properties are not allowed", "unknown field")))
    return sorted(out)
