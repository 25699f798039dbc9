"""Kubernetes' own OpenAPI schemas, offline: strict validation of objects, and core/v1 schemas for the CRD.

The schemas are the ones the `kubernetes-validate` package ships (JSON Schema 2020-12 converted
from each release's OpenAPI document, `-strict` = unknown fields refused). Two uses:

- `object_errors` / `errors`: a child (ConfigMap, Service, Job) or a spec fragment (env,
  resources, ...) is checked the way the API server's schema check would, before we send it.
- `crd_node`: the CRD embeds the real core/v1 schemas for env, resources, tolerations, affinity,
  volumes... (so `kubectl explain` works below them and typos are refused) instead of
  x-kubernetes-preserve-unknown-fields. They are converted here, never written by hand.

Validators are built once per (version, definition) and cached: loading a release's 1.8 MB of
definitions takes ~0.1 s, validating a Job against it ~ms.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema
import kubernetes_validate
from referencing import Registry, Resource

OLDEST = "1.28"
"""The chart's kubeVersion floor: the CRD embeds this release's core/v1 schemas, so whatever a
DPOJob may say is understood by every supported cluster."""

DEFS_ID = "https://kubernetes.io/api/_definitions.json"
CORE = "io.k8s.api.core.v1."
KINDS = {"ConfigMap": CORE + "ConfigMap", "Service": CORE + "Service", "Job": "io.k8s.api.batch.v1.Job",
         "Pod": CORE + "Pod", "NetworkPolicy": "io.k8s.api.networking.v1.NetworkPolicy"}
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
# controller-gen's pattern for resource.Quantity (what CRDs of other operators embed).
QUANTITY_PATTERN = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


def newest() -> str:
    """Newest Kubernetes minor release whose schemas kubernetes-validate ships."""
    return kubernetes_validate.utils.major_minor(kubernetes_validate.latest_version())


def supported_versions() -> tuple[str, str]:
    """Children are checked against both ends of the supported range."""
    return OLDEST, newest()


@functools.cache
def definitions(version: str) -> dict[str, Any]:
    """The `$defs` document of one release (strict flavour: additionalProperties false)."""
    ref = resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json")
    return json.loads(ref.read_text())


@functools.cache
def _validator(version: str, definition: str) -> jsonschema.protocols.Validator:
    registry: Registry = Resource.from_contents(definitions(version)) @ Registry()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "$ref": f"{DEFS_ID}#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _path(prefix: str, err: jsonschema.ValidationError) -> str:
    out = prefix
    for part in err.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: jsonschema.ValidationError) -> str:
    """Quantity and IntOrString are oneOf(string, number): say what is expected, not 'not valid'."""
    if err.validator == "oneOf":
        return f"{err.instance!r} is not a string or a number"
    if err.validator == "additionalProperties":
        return err.message.replace("Additional properties are not allowed", "unknown field")
    return err.message


def errors(instance: Any, definition: str, version: str = OLDEST, where: str = "") -> list[tuple[str, str]]:
    """(field path, message) for each schema violation of `instance` as `definition`, sorted."""
    found = [(_path(where, e), _message(e)) for e in _validator(version, definition).iter_errors(instance)]
    return sorted(set(found))


def object_errors(obj: dict[str, Any], version: str) -> list[tuple[str, str]]:
    """Schema violations of a whole child object (its kind picks the definition)."""
    return errors(obj, KINDS[obj["kind"]], version)


# --- core/v1 schemas → structural OpenAPI v3 for the CRD ------------------------------------------

_KEEP = ("description", "enum", "format", "required", "minimum", "maximum", "pattern")


def crd_node(definition: str, version: str = OLDEST) -> dict[str, Any]:
    """One definition, $refs inlined, in the structural subset a CRD accepts.

    Nullable types are dropped (as controller-gen does), Quantity/IntOrString become
    x-kubernetes-int-or-string, list-map markers are dropped (they constrain merges, and their
    keys would have to be required or defaulted), and unknown fields are pruned/refused by the
    API server as for any structural schema.
    """
    return _convert({"$ref": f"#/$defs/{definition}"}, definitions(version)["$defs"], ())


def _convert(node: dict[str, Any], defs: dict[str, Any], seen: tuple[str, ...]) -> dict[str, Any]:
    extra = {k: node[k] for k in ("description",) if k in node}
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in (QUANTITY, INT_OR_STRING):
            out: dict[str, Any] = {"x-kubernetes-int-or-string": True}
            if name == QUANTITY:
                out["pattern"] = QUANTITY_PATTERN
            return {**out, **extra}
        if name in seen:  # no core/v1 type we embed is recursive; refuse rather than loop
            raise ValueError(f"recursive definition {name}")
        return {**_convert(defs[name], defs, (*seen, name)), **extra}
    kinds = node.get("type")
    kind = next((t for t in kinds if t != "null"), None) if isinstance(kinds, list) else kinds
    out = {k: node[k] for k in _KEEP if k in node}
    if out.get("format") not in (None, "int32", "int64", "double"):
        del out["format"]
    if kind is None:
        return {**out, "x-kubernetes-preserve-unknown-fields": True}
    out["type"] = kind
    if kind == "object":
        props = node.get("properties")
        if props:
            out["properties"] = {k: _convert(v, defs, seen) for k, v in props.items()}
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = _convert(node["additionalProperties"], defs, seen)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = _convert(node.get("items", {}), defs, seen)
    return out
