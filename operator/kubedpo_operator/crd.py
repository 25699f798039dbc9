"""The DPOJob CustomResourceDefinition, generated from the pydantic models in api.py.

`kubedpo crd > crds/kubedpo.io_dpojobs.yaml`; CI diffs the file against this output, so the
schema has one source. Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural*
OpenAPI v3 subset: no $ref, no anyOf-with-null (→ `nullable`), numeric `exclusiveMinimum` (→
boolean), every node typed. Fields that are Kubernetes objects (env, resources, tolerations,
affinity, pod volumes...) get core/v1's own schema (k8s_openapi.crd_node), so `kubectl explain`
works below them and unknown fields are refused.

`to_jsonschema` turns the result back into JSON Schema: `kubedpo validate` and the operator check
raw specs against exactly what the API server enforces (no "2" for an integer, no "inf").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jsonschema
import yaml

from .api import GROUP, KIND, MAX_NAME, PLURAL, SHORT_NAME, SINGULAR, VERSION, DPOJobSpec, DPOJobStatus
from .k8s_openapi import crd_node
from .spec_rules import RESERVED_ENV, RESERVED_ENV_PREFIX, URI_FIELDS

# Sections whose pydantic field has no description of its own (the trainer's models carry
# docs on leaf fields); `kubectl explain` needs one on every node.
SECTION_DOCS = {
    "model": "Policy (and optional reference) model to fine-tune.",
    "data": "Preference data to stream (TRL formats) and how to tokenize it.",
    "training": "DPO loss, optimizer and schedule. Immutable after creation.",
    "checkpoint": "Where and how often checkpoints are written; restarts resume from the newest.",
    "output": "Where the final model goes.",
    "s3": "S3-compatible store settings (credentials come from env/envFrom, never from here).",
    "metrics": "Trainer metrics endpoint on rank 0 (read by the operator for status.progress).",
}
KEEP = ("type", "description", "default", "enum", "minimum", "maximum", "minLength", "maxLength",
        "pattern", "minItems", "maxItems", "format", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
        "x-kubernetes-validations")  # the last: URI types (uris.py)
IMMUTABLE = ("model", "data")
# workers may change (the gang restarts, rescale.py), and with it the per-rank batch split, so that
# the global batch batchSize x gradientAccumulationSteps x workers (which exact resume needs) can stay.
RESCALABLE = ("batchSize", "gradientAccumulationSteps")


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a $ref (or single allOf), keeping the referring node's description/default."""
    ref = node.get("$ref") or (node.get("allOf") or [{}])[0].get("$ref")
    if not ref:
        return node
    target = dict(defs[ref.split("/")[-1]])
    target.pop("title", None)
    for key in ("description", "default"):
        if key in node:
            target[key] = node[key]
    return target


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON-schema node → one structural OpenAPI v3 node (recursively)."""
    node = _resolve(node, defs)
    if "x-kubedpo-core" in node:
        return _core(node)
    nullable = False
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        if len(options) != 1:
            return {"x-kubernetes-preserve-unknown-fields": True,
                    **({"description": node["description"]} if "description" in node else {})}
        node = {**_resolve(options[0], defs), **{k: v for k, v in node.items() if k != "anyOf"}}
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
    out: dict[str, Any] = {k: node[k] for k in KEEP if k in node}
    if "x-kubernetes-validations" in out:  # a copy: rules are appended below, and $defs nodes are shared
        out["x-kubernetes-validations"] = [dict(r) for r in out["x-kubernetes-validations"]]
    if out.get("default", 0) is None:
        del out["default"]
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            out[flag] = node[bound]
            out[bound] = True
    if nullable and "enum" not in out:  # null is outside an enum; omitting the field means the same
        out["nullable"] = True
    if out.get("type") == "object":
        props = node.get("properties")
        if props:
            out["properties"] = {
                k: _describe(k, structural(v, defs)) for k, v in props.items()
            }
            if node.get("required"):
                out["required"] = list(node["required"])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra and not props:
            out["additionalProperties"] = structural(extra, defs)
        elif not props and extra is not False:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif out.get("type") == "array":
        out["items"] = structural(node.get("items", {}), defs)
    elif "type" not in out and "enum" in out:
        out["type"] = "string"
    elif "type" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _core(node: dict[str, Any]) -> dict[str, Any]:
    """A field marked with a core/v1 definition (api._core): Kubernetes' schema, our description."""
    item = crd_node(node["x-kubedpo-core"])
    out = {"type": "array", "items": item} if node.get("x-kubedpo-many") else item
    out = {**out, "description": node.get("description", out.get("description", ""))}
    for option in [node, *node.get("anyOf", [])]:
        if "maxItems" in option:
            out["maxItems"] = option["maxItems"]
    return out


def _describe(name: str, node: dict[str, Any]) -> dict[str, Any]:
    if "description" not in node and name in SECTION_DOCS:
        return {"description": SECTION_DOCS[name], **node}
    return node


def spec_schema() -> dict[str, Any]:
    raw = DPOJobSpec.model_json_schema(by_alias=True)
    schema = structural(raw, raw.get("$defs", {}))
    schema["description"] = "What to train and where: the trainer's config plus cluster fields."
    props = schema["properties"]
    for field in IMMUTABLE:
        props[field].setdefault("x-kubernetes-validations", []).append({
            "rule": "self == oldSelf",
            "message": f"{field} is immutable: checkpoints of this run assume it; create a new DPOJob",
        })
    fixed = [f for f in props["training"]["properties"] if f not in RESCALABLE]
    props["training"].setdefault("x-kubernetes-validations", []).append({
        "rule": " && ".join(f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})"
                            for f in fixed),
        "message": "training is immutable except batchSize and gradientAccumulationSteps (change them with "
                   "workers so that batchSize x gradientAccumulationSteps x workers stays the same); "
                   "create a new DPOJob",
    })
    props["checkpoint"]["x-kubernetes-validations"] = [{
        "rule": "!(has(self.everySteps) || has(self.everyMinutes)) || has(self.uri)",
        "message": "checkpoint.uri is required when everySteps/everyMinutes is set",
    }]
    schema["x-kubernetes-validations"] = [{
        "rule": "!(has(self.training) && has(self.training.loss) && self.training.loss == 'simpo'"
                " && has(self.model.referenceUri))",
        "message": "training.loss: simpo is reference-free; remove model.referenceUri",
    }]
    # Bounded strings keep the CEL rules' estimated cost far below the API server's budget (an
    # unbounded string is costed at the request size limit, and the CRD would be refused).
    props["env"]["items"]["properties"]["name"]["maxLength"] = 256
    reserved = ", ".join(f"'{n}'" for n in RESERVED_ENV)
    props["env"]["x-kubernetes-validations"] = [{
        "rule": f"self.all(e, !(e.name in [{reserved}]) && !e.name.startsWith('{RESERVED_ENV_PREFIX}'))",
        "message": f"env: {', '.join(RESERVED_ENV)} and {RESERVED_ENV_PREFIX}* are set by the operator",
    }]
    props["metrics"]["x-kubernetes-validations"] = [{
        "rule": f"!has(self.port) || self.port != {DEFAULT_RENDEZVOUS_PORT}",
        "message": f"metrics.port: {DEFAULT_RENDEZVOUS_PORT} is the rendezvous port; pick another",
    }]
    for section, key in URI_FIELDS:
        field = props[section]["properties"][key]
        field["maxLength"] = field.get("maxLength", 4096)
        rules = field.setdefault("x-kubernetes-validations", [])
        if any("://[^/?#]*@" in r["rule"] for r in rules):
            continue  # a storage or model URI: its type (kubedpo_trainer.uris) carries the rule
        rules.append({
            "rule": "!self.matches('^[A-Za-z][-A-Za-z0-9+.]*://[^/?#]*@')",
            "message": f"{section}.{key}: no credentials in URIs; put them in a Secret and use envFrom",
        })
    return schema


DEFAULT_RENDEZVOUS_PORT = 29500  # settings.OperatorSettings.rendezvous_port; a custom one is checked by policy.py
NAME_RULE = {
    "rule": f"size(self.metadata.name) <= {MAX_NAME} && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "message": f"metadata.name must be a DNS-1035 label of at most {MAX_NAME} characters (lower-case letters, "
               "digits and '-', starting with a letter): it names the Service and the pods' hostnames",
}


def status_schema() -> dict[str, Any]:
    raw = DPOJobStatus.model_json_schema(by_alias=True)
    schema = structural(raw, raw.get("$defs", {}))
    schema["description"] = "Observed state, written by the operator."
    return schema


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Reward-Acc", "type": "number", "jsonPath": ".status.progress.rewardAccuracy"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Workers", "type": "integer", "jsonPath": ".spec.workers", "priority": 1},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    return crd_document(KIND, PLURAL, SINGULAR, SHORT_NAME, PRINTER_COLUMNS, NAME_RULE, MAX_NAME,
                        "A DPO fine-tuning run of a causal language model, as a gang of pods.",
                        spec_schema(), status_schema())


def crd_document(kind: str, plural: str, singular: str, short_name: str, columns: Sequence[object],
                 name_rule: dict[str, Any], max_name: int, description: str, spec: dict[str, Any],
                 status: dict[str, Any]) -> dict[str, Any]:
    """The CustomResourceDefinition around one kind's schema (DPOJob and DPOPipeline share it)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": singular, "shortNames": [short_name],
                      "listKind": f"{kind}List", "categories": ["all", "kubedpo", "ml"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": list(columns),
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "required": ["spec"],
                    "x-kubernetes-validations": [name_rule],
                    "properties": {
                        "apiVersion": {"type": "string", "description": "API version of this object."},
                        "kind": {"type": "string", "description": f"{kind}."},
                        # Only name/generateName may be restricted here; maxLength also bounds the name rule's cost.
                        "metadata": {"type": "object", "properties": {
                            "name": {"type": "string", "maxLength": max_name}}},
                        "spec": spec,
                        "status": status,
                    },
                }},
            }],
        },
    }


def render_crd() -> str:
    header = "# Generated by `kubedpo crd` from kubedpo_operator/api.py: do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes flavour) → JSON Schema: nullable, boolean bounds, int-or-string, and
    unknown fields refused (the API server prunes them, or refuses them under kubectl's default
    strict field validation)."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(bound) is True:
            out[bound] = out.pop(flag)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False):
        out["type"] = [out["type"], "null"]
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
        if isinstance(out["properties"].get("metadata"), dict):  # ObjectMeta: only name is restricted
            out["properties"]["metadata"].pop("additionalProperties", None)
    return out


@functools.cache
def _spec_validator() -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(to_jsonschema(spec_schema()))


def spec_schema_problems(spec: Any) -> list[tuple[str, str]]:
    """What the API server's schema check refuses in a raw spec, as (field, message), sorted by field."""
    out = []
    for err in _spec_validator().iter_errors(spec):
        field = "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        out.append((field, err.message.replace("Additional properties are not allowed", "unknown field")))
    return sorted(out)
