"""The API server's semantic checks that its OpenAPI schema cannot express, as pure functions.

Each function takes a value and the field path it sits at, and returns `(field, message)` pairs
with the API server's wording where it has one. They run twice: on the DPOJob spec (paths like
`spec.env[2].name`, so the user sees their own field) and on every child before it is created
(paths inside the child), so nothing the API server would refuse is ever sent.
Rules follow Kubernetes 1.28 (the oldest supported release), which is the strictest where they
changed later (e.g. env names, relaxed in 1.34).
"""

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from .k8s_openapi import QUANTITY_PATTERN

Problem = tuple[str, str]

DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")  # 1.28's rule (relaxed in 1.34)
CAPABILITY = re.compile(r"^[A-Z][A-Z0-9_]*$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_QUANTITY = re.compile(QUANTITY_PATTERN)
_SUFFIX: dict[str, int | Decimal] = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6,
           "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
MAX_ANNOTATIONS = 256 * 1024
INT32_MAX = 2**31 - 1


def _pattern(value: Any, where: str, max_len: int, pattern: re.Pattern[str], rule: str) -> list[Problem]:
    """The API server's shape checks: a string, at most `max_len` long, matching `pattern`."""
    if not isinstance(value, str) or len(value) > max_len or not pattern.match(value):
        return [(where, f"{value!r} must be {rule}")]
    return []


def dns1035_label(value: Any, where: str) -> list[Problem]:
    return _pattern(value, where, 63, DNS1035_LABEL, "a DNS-1035 label: at most 63 lower-case letters, "
                    "digits or '-', starting with a letter and ending with a letter or digit")


def dns1123_label(value: Any, where: str) -> list[Problem]:
    return _pattern(value, where, 63, DNS1123_LABEL, "a DNS-1123 label: at most 63 lower-case letters, "
                    "digits or '-', starting and ending with a letter or digit")


def dns1123_subdomain(value: Any, where: str) -> list[Problem]:
    return _pattern(value, where, 253, DNS1123_SUBDOMAIN, "a DNS-1123 subdomain: lower-case letters, "
                    "digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit")


def label_value(value: Any, where: str) -> list[Problem]:
    return _pattern(value, where, 63, LABEL_VALUE, "a valid label value: at most 63 characters, letters, "
                    "digits, '-', '_' or '.', starting and ending with a letter or digit")


def qualified_name(value: Any, where: str) -> list[Problem]:
    """Label/annotation keys and resource names: `[prefix/]name`, prefix a DNS-1123 subdomain."""
    if not isinstance(value, str) or value.count("/") > 1:
        return [(where, f"{value!r} must be a qualified name ([prefix/]name)")]
    prefix, _, name = value.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        return [(where, f"{value!r}: prefix must be a DNS-1123 subdomain")]
    if len(name) > 63 or not QUALIFIED_NAME.match(name):
        return [(where, f"{value!r}: name part must be at most 63 letters, digits, '-', '_' or '.', "
                        "starting and ending with a letter or digit")]
    return []


def labels(value: Any, where: str) -> list[Problem]:
    if not isinstance(value, dict):
        return [(where, "must be a map of strings")]
    out: list[Problem] = []
    for k, v in value.items():
        out += qualified_name(k, f"{where}[{k}]") + label_value(v, f"{where}[{k}]")
    return out


def annotations(value: Any, where: str) -> list[Problem]:
    if not isinstance(value, dict):
        return [(where, "must be a map of strings")]
    out: list[Problem] = []
    for k, v in value.items():
        out += qualified_name(k, f"{where}[{k}]")
        if not isinstance(v, str):
            out.append((f"{where}[{k}]", "must be a string"))
    if sum(len(str(k)) + len(str(v)) for k, v in value.items()) > MAX_ANNOTATIONS:
        out.append((where, f"may not be more than {MAX_ANNOTATIONS} bytes"))
    return out


def parse_quantity(value: Any) -> Decimal | None:
    """A resource.Quantity as a Decimal, or None if the API server would refuse it."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = str(value) if not isinstance(value, float) else repr(value)
    if not _QUANTITY.match(text):
        return None
    m = re.match(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9.]+)?)([a-zA-Z]*)$", text)
    if m is None or m.group(2) not in _SUFFIX:
        return None
    try:
        return Decimal(m.group(1)) * Decimal(_SUFFIX[m.group(2)])
    except InvalidOperation:
        return None


def _extended(resource: str) -> bool:
    """Extended resources (nvidia.com/gpu, rdma/hca): integers, never overcommitted."""
    return "/" in resource and not resource.startswith(("kubernetes.io/", "requests."))


def resources(value: Any, where: str) -> list[Problem]:
    """Quantities valid and non-negative, requests <= limits (== for extended resources)."""
    if not isinstance(value, dict):
        return [(where, "must be a map with requests and/or limits")]
    parsed: dict[str, dict[str, Decimal]] = {}
    out: list[Problem] = []
    for part in ("limits", "requests"):
        section = value.get(part) or {}
        if not isinstance(section, dict):
            out.append((f"{where}.{part}", f"must be a map of resource name to quantity, not {section!r}"))
            continue
        parsed[part] = {}
        for name, raw in section.items():
            field = f"{where}.{part}[{name}]"
            out += qualified_name(name, field)
            q = parse_quantity(raw)
            if q is None:
                out.append((field, f"{raw!r} is not a valid quantity (e.g. 500m, 2, 16Gi)"))
            elif q < 0:
                out.append((field, f"{raw!r} must be greater than or equal to 0"))
            elif _extended(name) and q != q.to_integral_value():
                out.append((field, f"{raw!r} must be a whole number for an extended resource"))
            else:
                parsed[part][name] = q
    limits, requests = parsed.get("limits", {}), parsed.get("requests", {})
    for name, req in requests.items():
        if name in limits and req > limits[name]:
            out.append((f"{where}.requests[{name}]", f"must be less than or equal to {name} limit "
                                                      f"{value['limits'][name]!r}"))
        elif _extended(name) and req != limits.get(name, req):
            out.append((f"{where}.requests[{name}]", "must equal the limit for an extended resource"))
        elif _extended(name) and name not in limits:
            out.append((f"{where}.limits[{name}]", "an extended resource needs a limit"))
    return out


def env(value: Any, where: str) -> list[Problem]:
    """Names valid and unique-safe, value XOR valueFrom, exactly one source in valueFrom."""
    if not isinstance(value, list):
        return [(where, "must be a list")]
    out: list[Problem] = []
    for i, e in enumerate(value):
        field = f"{where}[{i}]"
        if not isinstance(e, dict):
            out.append((field, "must be an object with name and value or valueFrom"))
            continue
        name = e.get("name")
        if not isinstance(name, str) or not ENV_NAME.match(name):
            out.append((f"{field}.name", f"{name!r} must be a valid environment variable name: letters, "
                                         "digits, '_', '-' or '.', not starting with a digit"))
        if e.get("value") and e.get("valueFrom") is not None:
            out.append((f"{field}.valueFrom", "may not be specified when `value` is not empty"))
        source = e.get("valueFrom")
        if isinstance(source, dict):
            kinds = [k for k, v in source.items() if v is not None]
            if len(kinds) != 1:
                out.append((f"{field}.valueFrom", "must have exactly one of configMapKeyRef, secretKeyRef, "
                                                  "fieldRef or resourceFieldRef"))
            for kind in ("configMapKeyRef", "secretKeyRef"):
                ref = source.get(kind)
                if isinstance(ref, dict):
                    out += _ref_name(ref, f"{field}.valueFrom.{kind}")
                    if not ref.get("key"):
                        out.append((f"{field}.valueFrom.{kind}.key", "required"))
    return out


def _ref_name(ref: dict[str, Any], where: str) -> list[Problem]:
    if not ref.get("name"):
        return [(f"{where}.name", "required")]
    return dns1123_subdomain(ref["name"], f"{where}.name")


def env_from(value: Any, where: str) -> list[Problem]:
    if not isinstance(value, list):
        return [(where, "must be a list")]
    out: list[Problem] = []
    for i, e in enumerate(value):
        field = f"{where}[{i}]"
        if not isinstance(e, dict):
            out.append((field, "must be an object"))
            continue
        refs = [k for k in ("configMapRef", "secretRef") if e.get(k) is not None]
        if len(refs) != 1:
            out.append((field, "must have exactly one of configMapRef or secretRef"))
        for k in refs:
            if isinstance(e[k], dict):
                out += _ref_name(e[k], f"{field}.{k}")
        prefix = e.get("prefix")
        if prefix and not ENV_NAME.match(str(prefix)):
            out.append((f"{field}.prefix", f"{prefix!r} must be a valid environment variable name"))
    return out


def tolerations(value: Any, where: str) -> list[Problem]:
    if not isinstance(value, list):
        return [(where, "must be a list")]
    out: list[Problem] = []
    for i, t in enumerate(value):
        field = f"{where}[{i}]"
        if not isinstance(t, dict):
            out.append((field, "must be an object"))
            continue
        if t.get("key"):
            out += qualified_name(t["key"], f"{field}.key")
        op = t.get("operator") or "Equal"
        if op not in ("Equal", "Exists"):
            out.append((f"{field}.operator", f"{op!r}: supported values are Equal, Exists"))
        if op == "Exists" and t.get("value"):
            out.append((f"{field}.value", "must be empty when operator is Exists"))
        if not t.get("key") and op != "Exists":
            out.append((f"{field}.operator", "must be Exists when key is empty"))
        if op == "Equal" and t.get("value"):
            out += label_value(t["value"], f"{field}.value")
        effect = t.get("effect")
        if effect and effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            out.append((f"{field}.effect", f"{effect!r}: supported values are NoSchedule, PreferNoSchedule, "
                                           "NoExecute"))
        if t.get("tolerationSeconds") is not None and effect != "NoExecute":
            out.append((f"{field}.effect", "must be NoExecute when tolerationSeconds is set"))
    return out


def node_selector(value: Any, where: str) -> list[Problem]:
    return labels(value, where)


def volumes(value: Any, where: str) -> list[Problem]:
    """Names unique DNS-1123 labels, exactly one volume source each."""
    if not isinstance(value, list):
        return [(where, "must be a list")]
    out: list[Problem] = []
    seen: set[str] = set()
    for i, v in enumerate(value):
        field = f"{where}[{i}]"
        if not isinstance(v, dict):
            out.append((field, "must be an object"))
            continue
        out += dns1123_label(v.get("name"), f"{field}.name")
        if v.get("name") in seen:
            out.append((f"{field}.name", f"{v.get('name')!r}: duplicate volume name"))
        seen.add(str(v.get("name")))
        sources = [k for k, s in v.items() if k != "name" and s is not None]
        if len(sources) != 1:
            out.append((field, f"must have exactly one volume source, found {sources or 'none'}"))
        path = (v.get("hostPath") or {}).get("path") if isinstance(v.get("hostPath"), dict) else None
        if "hostPath" in sources and (not isinstance(path, str) or not path.startswith("/") or ".." in path):
            out.append((f"{field}.hostPath.path", "must be an absolute path without '..'"))
    return out


def volume_mounts(value: Any, where: str, volume_names: set[str]) -> list[Problem]:
    if not isinstance(value, list):
        return [(where, "must be a list")]
    out: list[Problem] = []
    paths: set[str] = set()
    for i, m in enumerate(value):
        field = f"{where}[{i}]"
        if not isinstance(m, dict):
            out.append((field, "must be an object"))
            continue
        if m.get("name") not in volume_names:
            out.append((f"{field}.name", f"{m.get('name')!r}: not found among the pod's volumes"))
        path = m.get("mountPath")
        if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/"):
            out.append((f"{field}.mountPath", f"{path!r} must be an absolute path without '..'"))
        elif path.rstrip("/") in paths:
            out.append((f"{field}.mountPath", f"{path!r}: must be unique"))
        else:
            paths.add(path.rstrip("/"))
    return out


def capabilities(value: Any, where: str) -> list[Problem]:
    if not isinstance(value, list):
        return [(where, "must be a list")]
    return [(f"{where}[{i}]", f"{c!r} is not a capability name (e.g. IPC_LOCK)")
            for i, c in enumerate(value) if not isinstance(c, str) or not CAPABILITY.match(c)]


def ports(value: list[dict[str, Any]], where: str, port_key: str) -> list[Problem]:
    """Service ports / container ports: in range, numbers and names unique (per protocol)."""
    out: list[Problem] = []
    numbers: set[tuple[Any, Any]] = set()
    names: set[Any] = set()
    for i, p in enumerate(value):
        field = f"{where}[{i}]"
        number = p.get(port_key)
        if not isinstance(number, int) or not 1 <= number <= 65535:
            out.append((f"{field}.{port_key}", f"{number!r} must be between 1 and 65535, inclusive"))
        key = (number, p.get("protocol", "TCP"))
        if key in numbers:
            out.append((f"{field}.{port_key}", f"{number!r}: duplicate port"))
        numbers.add(key)
        name = p.get("name")
        if name is not None:
            if not isinstance(name, str) or len(name) > 15 or not IANA_SVC_NAME.match(name) or "--" in name:
                out.append((f"{field}.name", f"{name!r} must be an IANA service name (at most 15 characters)"))
            if name in names:
                out.append((f"{field}.name", f"{name!r}: duplicate port name"))
            names.add(name)
    return out
