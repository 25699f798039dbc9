"""Check a built child (ConfigMap, Service, Job) as the API server would, before creating it.

Kubernetes' strict OpenAPI schemas of the oldest and newest supported releases catch types and
unknown fields; `k8s_rules` adds the semantic checks a schema cannot express (names, label
values, quantities, requests <= limits, env, ports, volumes). A problem here is a bug in the
spec checks or the builders, never something to retry: the handler fails the DPOJob with the
child's field in the condition.
"""

from __future__ import annotations

from typing import Any

from . import k8s_rules as rules
from .k8s_openapi import object_errors, supported_versions

Problem = tuple[str, str]
INT64_MAX = 2**63 - 1


def _meta(obj: dict[str, Any], name_rule: Any) -> list[Problem]:
    meta = obj.get("metadata") or {}
    out = name_rule(meta.get("name"), "metadata.name")
    out += rules.labels(meta.get("labels") or {}, "metadata.labels")
    out += rules.annotations(meta.get("annotations") or {}, "metadata.annotations")
    return out


def _service(obj: dict[str, Any]) -> list[Problem]:
    return _meta(obj, rules.dns1035_label) + rules.ports(obj["spec"].get("ports") or [], "spec.ports", "port")


def _container(c: dict[str, Any], where: str, volume_names: set[str]) -> list[Problem]:
    out = rules.dns1123_label(c.get("name"), f"{where}.name")
    out += rules.env(c.get("env") or [], f"{where}.env")
    out += rules.env_from(c.get("envFrom") or [], f"{where}.envFrom")
    out += rules.resources(c.get("resources") or {}, f"{where}.resources")
    out += rules.ports(c.get("ports") or [], f"{where}.ports", "containerPort")
    out += rules.volume_mounts(c.get("volumeMounts") or [], f"{where}.volumeMounts", volume_names)
    caps = ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
    out += rules.capabilities(caps, f"{where}.securityContext.capabilities.add")
    if not c.get("image"):
        out.append((f"{where}.image", "required"))
    return out


def _pod(tpl: dict[str, Any], where: str) -> list[Problem]:
    meta, pod = tpl.get("metadata") or {}, tpl.get("spec") or {}
    out = rules.labels(meta.get("labels") or {}, f"{where}.metadata.labels")
    out += rules.annotations(meta.get("annotations") or {}, f"{where}.metadata.annotations")
    w = f"{where}.spec"
    out += rules.volumes(pod.get("volumes") or [], f"{w}.volumes")
    names = {v["name"] for v in pod.get("volumes") or [] if isinstance(v, dict) and isinstance(v.get("name"), str)}
    for i, c in enumerate(pod.get("containers") or []):
        out += _container(c, f"{w}.containers[{i}]", names)
    out += rules.tolerations(pod.get("tolerations") or [], f"{w}.tolerations")
    out += rules.node_selector(pod.get("nodeSelector") or {}, f"{w}.nodeSelector")
    for field in ("serviceAccountName", "priorityClassName"):
        if pod.get(field):
            out += rules.dns1123_subdomain(pod[field], f"{w}.{field}")
    for i, ref in enumerate(pod.get("imagePullSecrets") or []):
        out += rules.dns1123_subdomain((ref or {}).get("name"), f"{w}.imagePullSecrets[{i}].name")
    if pod.get("subdomain"):
        out += rules.dns1123_label(pod["subdomain"], f"{w}.subdomain")
    grace = pod.get("terminationGracePeriodSeconds")
    if grace is not None and not (isinstance(grace, int) and 0 <= grace <= INT64_MAX):
        out.append((f"{w}.terminationGracePeriodSeconds", f"{grace!r} must be a non-negative int64"))
    return out


def _job(obj: dict[str, Any]) -> list[Problem]:
    out = _meta(obj, rules.dns1123_subdomain)
    name = (obj.get("metadata") or {}).get("name")
    # The Job controller labels pods job-name=<name> and names them <name>-<index>-<suffix>.
    out += rules.label_value(name, "metadata.name")
    spec = obj.get("spec") or {}
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and not (isinstance(deadline, int) and 1 <= deadline <= INT64_MAX):
        out.append(("spec.activeDeadlineSeconds", f"{deadline!r} must be a positive int64"))
    ttl = spec.get("ttlSecondsAfterFinished")
    if ttl is not None and not (isinstance(ttl, int) and 0 <= ttl <= rules.INT32_MAX):
        out.append(("spec.ttlSecondsAfterFinished", f"{ttl!r} must be a non-negative int32"))
    return out + _pod(spec.get("template") or {}, "spec.template")


_SEMANTIC = {"ConfigMap": lambda o: _meta(o, rules.dns1123_subdomain), "Service": _service, "Job": _job,
             "NetworkPolicy": lambda o: _meta(o, rules.dns1123_subdomain)}


def child_problems(obj: dict[str, Any], versions: tuple[str, ...] | None = None) -> list[Problem]:
    """Everything the API server of any supported release would refuse in `obj`, as (field, message)."""
    out: list[Problem] = []
    for version in versions or supported_versions():
        out += [(f, f"{m} (Kubernetes {version} schema)") for f, m in object_errors(obj, version)]
    if not out:  # semantic checks assume the schema's shapes
        out = _SEMANTIC[obj["kind"]](obj)
    return list(dict.fromkeys(out))
