"""Checks of a DPOJob spec's cluster fields that pydantic types cannot say, naming the spec field.

The embedded Kubernetes objects (env, resources, tolerations, affinity, pod volumes...) are
checked against core/v1's schema of the oldest supported release (strict: unknown fields are
typos) and then against the API server's semantic rules (`k8s_rules`). On top: what the
operator and the trainer's launcher reserve (env names, labels, volume names and paths), and no
credentials inside URIs. The CRD's CEL rules mirror the reserved-name and credential rules, so
`kubectl apply` refuses them too; `tests/operator/test_crd_cel.py` checks both agree.
"""

from __future__ import annotations

import re
from typing import Any

from . import k8s_rules as rules
from .k8s_openapi import CORE, errors

Problem = tuple[str, str]

RESERVED_ENV = ("JOB_COMPLETION_INDEX", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RESERVED_ENV_PREFIX = "KUBEDPO_"
RESERVED_LABEL_PREFIXES = ("kubedpo.io/", "app.kubernetes.io/", "batch.kubernetes.io/")
# Kueue's queue label is set from runPolicy.queueName; its other keys (topology, priority) are the user's.
RESERVED_LABELS = ("job-name", "controller-uid", "kueue.x-k8s.io/queue-name")
RESERVED_ANNOTATION_PREFIXES = ("kubedpo.io/", "batch.kubernetes.io/")
# The operator's own volumes and where they are mounted (children.py); user volumes may not shadow them.
RESERVED_VOLUMES = ("config", "dshm", "tmp")
RESERVED_PATHS = ("/etc/kubedpo", "/dev/shm", "/tmp")
CREDENTIALS_IN_URI = re.compile(r"^[A-Za-z][-A-Za-z0-9+.]*://[^/?#]*@")
SIGNED_QUERY = re.compile(r"[?&](X-Amz-Credential|X-Amz-Signature|AWSAccessKeyId|Signature|sig)=", re.I)
URI_FIELDS = (("model", "uri"), ("model", "referenceUri"), ("model", "tokenizerUri"), ("data", "train"),
              ("data", "eval"), ("checkpoint", "uri"), ("output", "uri"), ("s3", "endpointUrl"))


def _schema(value: Any, definition: str, where: str, many: bool = False) -> list[Problem]:
    if value is None:
        return []
    if many:
        if not isinstance(value, list):
            return [(where, "must be a list")]
        return [p for i, v in enumerate(value) for p in errors(v, CORE + definition, where=f"{where}[{i}]")]
    return errors(value, CORE + definition, where=where)


def uri_problems(wire: dict[str, Any]) -> list[Problem]:
    """Credentials never go in a URI: it is copied to the ConfigMap, logs and status."""
    out = []
    for section, key in URI_FIELDS:
        part = wire.get(section)  # a DPOPipeline's output is a plain URI, checked by pipeline_api
        value = part.get(key) if isinstance(part, dict) else None
        if has_credentials(value):
            out.append((f"spec.{section}.{key}", CREDENTIALS_MESSAGE))
    return out


CREDENTIALS_MESSAGE = ("must not embed credentials (user:password@ or a signed query): put them in a Secret "
                       "and reference it with envFrom (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")


def has_credentials(value: Any) -> bool:
    return isinstance(value, str) and bool(CREDENTIALS_IN_URI.match(value) or SIGNED_QUERY.search(value))


def env_names(env: list[Any], where: str) -> list[Problem]:
    out = []
    for i, e in enumerate(env):
        name = e.get("name") if isinstance(e, dict) else None
        if isinstance(name, str) and (name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIX)):
            out.append((f"{where}[{i}].name", f"{name!r} is reserved: the operator and the trainer's "
                        f"launcher set {', '.join(RESERVED_ENV)} and KUBEDPO_*"))
    return out


def _gpu(spec: Any) -> list[Problem]:
    res = spec.resources or {}
    out = []
    for part in ("limits", "requests"):
        gpu = (res.get(part) or {}).get("nvidia.com/gpu")
        if gpu is not None and str(gpu) != str(spec.gpus_per_worker):
            out.append((f"spec.resources.{part}[nvidia.com/gpu]",
                        f"must be omitted or equal gpusPerWorker ({gpu} != {spec.gpus_per_worker})"))
    return out


def _effective_resources(spec: Any) -> Any:
    """What the container gets: the builder adds the nvidia.com/gpu limit from gpusPerWorker."""
    res = spec.resources or {}
    if not spec.gpus_per_worker or not isinstance(res, dict) or not isinstance(res.get("limits") or {}, dict):
        return res
    return {**res, "limits": {**(res.get("limits") or {}), "nvidia.com/gpu": str(spec.gpus_per_worker)}}


def pod_problems(pod: Any) -> list[Problem]:
    if pod is None:
        return []
    w = "spec.pod"
    out = _schema(pod.volumes, "Volume", f"{w}.volumes", many=True)
    out += _schema(pod.volume_mounts, "VolumeMount", f"{w}.volumeMounts", many=True)
    out += _schema(pod.image_pull_secrets, "LocalObjectReference", f"{w}.imagePullSecrets", many=True)
    if out:
        return out
    out += rules.labels(pod.labels or {}, f"{w}.labels")
    out += rules.annotations(pod.annotations or {}, f"{w}.annotations")
    for key in pod.labels or {}:
        if key.startswith(RESERVED_LABEL_PREFIXES) or key in RESERVED_LABELS:
            out.append((f"{w}.labels[{key}]", "is reserved for the operator, the Job controller or Kueue"))
    for key in pod.annotations or {}:
        if key.startswith(RESERVED_ANNOTATION_PREFIXES):
            out.append((f"{w}.annotations[{key}]", "is reserved for the operator and the Job controller"))
    volumes = pod.volumes or []
    out += rules.volumes(volumes, f"{w}.volumes")
    for i, v in enumerate(volumes):
        if v.get("name") in RESERVED_VOLUMES:
            out.append((f"{w}.volumes[{i}].name", f"{v['name']!r} is one of the operator's volumes"))
    names = {v.get("name") for v in volumes}
    out += rules.volume_mounts(pod.volume_mounts or [], f"{w}.volumeMounts", names)
    for i, m in enumerate(pod.volume_mounts or []):
        path = str(m.get("mountPath", "")).rstrip("/")
        if any(path == p or path.startswith(p + "/") or p.startswith(path + "/") for p in RESERVED_PATHS):
            out.append((f"{w}.volumeMounts[{i}].mountPath", f"{path!r} overlaps the operator's mounts "
                        f"({', '.join(RESERVED_PATHS)})"))
    for i, ref in enumerate(pod.image_pull_secrets or []):
        out += rules.dns1123_subdomain((ref or {}).get("name"), f"{w}.imagePullSecrets[{i}].name")
    out += rules.capabilities(pod.add_capabilities or [], f"{w}.addCapabilities")
    return out


def spec_problems(spec: Any) -> list[Problem]:
    """Every problem of the cluster fields of a parsed DPOJobSpec, schema errors first."""
    out = _schema(spec.env, "EnvVar", "spec.env", many=True)
    out += _schema(spec.env_from, "EnvFromSource", "spec.envFrom", many=True)
    out += _schema(spec.resources, "ResourceRequirements", "spec.resources")
    out += _schema(spec.tolerations, "Toleration", "spec.tolerations", many=True)
    out += _schema(spec.affinity, "Affinity", "spec.affinity")
    if out:
        return out
    out += rules.env(spec.env or [], "spec.env") + env_names(spec.env or [], "spec.env")
    out += rules.env_from(spec.env_from or [], "spec.envFrom")
    out += _gpu(spec) + rules.resources(_effective_resources(spec), "spec.resources")
    out += rules.tolerations(spec.tolerations or [], "spec.tolerations")
    out += rules.node_selector(spec.node_selector or {}, "spec.nodeSelector")
    for field, value in (("spec.serviceAccountName", spec.service_account_name),
                         ("spec.priorityClassName", spec.priority_class_name)):
        if value is not None:
            out += rules.dns1123_subdomain(value, field)
    if spec.image is not None and (not spec.image.strip() or spec.image != spec.image.strip()):
        out.append(("spec.image", f"{spec.image!r} must be an image reference without spaces"))
    out += pod_problems(spec.pod)
    out += uri_problems(spec.model_dump(by_alias=True, include={"model", "data", "checkpoint", "output", "s3"}))
    return out
