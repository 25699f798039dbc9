"""The DPOJob CustomResourceDefinition, generated from the pydantic models in api.py.

`kubedpo crd > crds/kubedpo.io_dpojobs.yaml`; CI diffs the file against this output, so the
schema has one source. Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural*
OpenAPI v3 subset: no $ref, no anyOf-with-null (→ `nullable`), numeric `exclusiveMinimum` (→
boolean), every node typed (free-form Kubernetes objects → x-kubernetes-preserve-unknown-fields).
"""

from __future__ import annotations

from typing import Any

import yaml

from .api import GROUP, KIND, PLURAL, SHORT_NAME, SINGULAR, VERSION, DPOJobSpec, DPOJobStatus

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
        "pattern", "minItems", "maxItems", "format")
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
    return schema


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
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR, "shortNames": [SHORT_NAME],
                      "listKind": f"{KIND}List", "categories": ["all", "kubedpo", "ml"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A DPO fine-tuning run of a causal language model, as a gang of pods.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string", "description": "API version of this object."},
                        "kind": {"type": "string", "description": "DPOJob."},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": status_schema(),
                    },
                }},
            }],
        },
    }


def render_crd() -> str:
    header = "# Generated by `kubedpo crd` from kubedpo_operator/api.py: do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)
