"""What the operator's settings allow a DPOJob author (the cluster admin's allow-lists).

Creating a DPOJob is equivalent to creating pods; these optional lists let an admin narrow that
(images, service accounts, priority classes) and keep the dangerous pod features off unless
named (added capabilities, hostPath volumes). Settings are the operator's, so CEL cannot know
them: they are checked here, before any child exists, and a refusal fails the DPOJob naming
the field.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from .settings import OperatorSettings

Problem = tuple[str, str]


def _items(csv: str) -> list[str]:
    return [x.strip() for x in csv.split(",") if x.strip()]


def _allowed(value: str | None, patterns: str, field: str, what: str) -> list[Problem]:
    allowed = _items(patterns)
    if value is None or not allowed or any(fnmatchcase(value, p) for p in allowed):
        return []
    return [(field, f"{value!r} is not an allowed {what} (operator setting allows {', '.join(allowed)})")]


def policy_problems(spec: Any, settings: OperatorSettings) -> list[Problem]:
    out = _allowed(spec.image, settings.allowed_images, "spec.image", "image")
    out += _allowed(spec.service_account_name, settings.allowed_service_accounts, "spec.serviceAccountName",
                    "service account")
    out += _allowed(spec.priority_class_name, settings.allowed_priority_classes, "spec.priorityClassName",
                    "priority class")
    if spec.metrics.port and spec.metrics.port == settings.rendezvous_port:
        out.append(("spec.metrics.port", f"{spec.metrics.port} is the rendezvous port; pick another"))
    pod = spec.pod
    if pod is None:
        return out
    caps = set(_items(settings.allowed_capabilities))
    for i, cap in enumerate(pod.add_capabilities or []):
        if cap not in caps:
            out.append((f"spec.pod.addCapabilities[{i}]", f"{cap!r} is not allowed by the operator's settings "
                         f"(allowed: {', '.join(sorted(caps)) or 'none'})"))
    prefixes = [p.rstrip("/") for p in _items(settings.allowed_host_paths)]
    for i, vol in enumerate(pod.volumes or []):
        host = vol.get("hostPath")
        if host is None:
            continue
        path = str((host or {}).get("path", "")).rstrip("/")
        if not any(path == p or path.startswith(p + "/") for p in prefixes):
            out.append((f"spec.pod.volumes[{i}].hostPath.path", f"{path!r} is not under a host path the "
                         f"operator's settings allow (allowed: {', '.join(prefixes) or 'none'})"))
    return out
