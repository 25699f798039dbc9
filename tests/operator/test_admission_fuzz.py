"""Fuzzed DPOJobs that the CRD's schema and CEL rules admit: every one either yields children that
Kubernetes' own strict OpenAPI schemas (1.28, the oldest supported release, and the newest that
kubernetes-validate ships) and an independent semantic oracle accept, or fails with a SpecError
naming a field of the manifest. Never any other exception (a handler traceback or retry loop).

The children are built in-process through `admission` (the path the kopf handlers take), so
hundreds of examples run in seconds; the kopf-on-kmock half is in test_refusals.py.
Mutations are drawn from values that broke the operator in the review of issue 9 (names with
dots, `resources.limits: "4Gi"`, `lots`, `-1Gi`, `A=B`, value+valueFrom, `envFrom: [{}]`,
queue names with spaces, 2^63 deadlines, 1e308 grace periods...) and from their valid siblings.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections import Counter
from decimal import Decimal
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from kubernetes.utils import parse_quantity
from referencing import Registry, Resource

from kubedpo_operator.admission import admit, plan_attempt
from kubedpo_operator.api import SpecError
from kubedpo_operator.crd import build_crd, to_jsonschema
from kubedpo_operator.settings import OperatorSettings
from tests.operator.conftest import minimal_spec
from tests.operator.test_crd_cel import violations

VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
CRD_SCHEMA = to_jsonschema(build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
SETTINGS = (OperatorSettings(),
            OperatorSettings(allowed_capabilities="IPC_LOCK", allowed_host_paths="/dev/infiniband",
                             allowed_images="ghcr.io/kubedpo/*", rendezvous_port=29400))
OUTCOMES: Counter[str] = Counter()


@functools.cache
def _k8s_validator(version: str, kind: str, api_version: str) -> jsonschema.protocols.Validator:
    """kubernetes_validate.validate's own schema lookup, cached (it re-reads 1.8 MB per call)."""
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = kubernetes_validate.utils.schema_contents(f"{folder}/{kind.lower()}-{group}.json", version)
    defs = kubernetes_validate.utils.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


# --- what to mutate ---------------------------------------------------------------------------

NAMES = st.one_of(st.sampled_from(["job.v2", "a.b", "1st-run", "run-1", "UPPER", "a-", "x" * 52, "x" * 53, "a"]),
                  st.from_regex(r"[a-z][a-z0-9-]{0,60}", fullmatch=True))
QUANTITIES = st.sampled_from(["1", "2", "500m", "4Gi", "lots", "-1Gi", "1.5", "0", 1, 2, 0, "1e3", "+1", "16Gi ",
                              "", "0.5", "1Ki", "3m"])
RESOURCE_NAMES = st.sampled_from(["cpu", "memory", "nvidia.com/gpu", "rdma/hca", "ephemeral-storage", "bad name"])
RESOURCES = st.one_of(
    st.fixed_dictionaries({}, optional={"limits": st.dictionaries(RESOURCE_NAMES, QUANTITIES, max_size=3),
                                        "requests": st.dictionaries(RESOURCE_NAMES, QUANTITIES, max_size=3)}),
    st.sampled_from([{"limits": "4Gi"}, {"requests": {"cpu": [1]}}]))
ENV_NAMES = st.sampled_from(["A", "A=B", "1X", "RANK", "KUBEDPO_X", "AWS_REGION", "a.b", "", "MASTER_PORT",
                             "LOCAL_RANK", "HF_HOME", "_x-y.z"])
VALUE_FROM = st.sampled_from([{"secretKeyRef": {"name": "s3", "key": "k"}}, {}, {"secretKeyRef": {"name": "s3"}},
                              {"fieldRef": {"fieldPath": "metadata.name"}, "secretKeyRef": {"name": "s", "key": "k"}},
                              {"configMapKeyRef": {"name": "Bad_Name", "key": "k"}},
                              {"fieldRef": {"fieldPath": "metadata.name"}}])
ENV = st.lists(st.fixed_dictionaries({"name": ENV_NAMES}, optional={"value": st.sampled_from(["", "x", "1"]),
                                                                   "valueFrom": VALUE_FROM}), max_size=3)
ENV_FROM = st.lists(st.sampled_from([{}, {"secretRef": {"name": "s3"}}, {"secretRef": {"name": "s3"},
                                     "configMapRef": {"name": "c"}}, {"prefix": "1A", "secretRef": {"name": "x"}},
                                     {"secretRef": {}}, {"configMapRef": {"name": "cfg", "optional": True}}]),
                    max_size=2)
TOLERATIONS = st.lists(st.sampled_from([
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, {"operator": "Exists", "value": "x"},
    {"key": "a", "effect": "Bogus"}, {"key": "a", "tolerationSeconds": 5}, {"key": "a b", "value": "v"},
    {"key": "a", "operator": "Equal", "value": "bad value!"}, {"operator": "Exists"}]), max_size=2)
AFFINITY = st.sampled_from([
    {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
    {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operatr": "In"}]}]}}},
    {"podAntiAffinity": {}}])
VOLUMES = st.lists(st.sampled_from([
    {"name": "models", "persistentVolumeClaim": {"claimName": "cache"}}, {"name": "ib", "hostPath": {"path": "/dev/infiniband"}},
    {"name": "root", "hostPath": {"path": "/"}}, {"name": "models", "emptyDir": {}}, {"name": "nosrc"},
    {"name": "tmp", "emptyDir": {}}, {"name": "Bad_Vol", "emptyDir": {}},
    {"name": "two", "emptyDir": {}, "configMap": {"name": "c"}}]), max_size=2)
MOUNTS = st.lists(st.sampled_from([
    {"name": "models", "mountPath": "/models"}, {"name": "ib", "mountPath": "/dev/infiniband"},
    {"name": "missing", "mountPath": "/x"}, {"name": "models", "mountPath": "/tmp/models"},
    {"name": "models", "mountPath": "relative"}]), max_size=2)
POD = st.fixed_dictionaries({}, optional={
    "labels": st.dictionaries(st.sampled_from(["team", "kubedpo.io/job-name", "bad key!", "kueue.x-k8s.io/x"]),
                              st.sampled_from(["a", "bad value!", "x" * 64]), max_size=2),
    "annotations": st.dictionaries(st.sampled_from(["note", "x/y", "bad key!"]), st.sampled_from(["", "v"]),
                                   max_size=2),
    "volumes": VOLUMES, "volumeMounts": MOUNTS,
    "imagePullSecrets": st.lists(st.sampled_from([{"name": "regcred"}, {"name": "Bad_Secret"}, {}]), max_size=2),
    "addCapabilities": st.lists(st.sampled_from(["IPC_LOCK", "SYS_ADMIN", "bad"]), max_size=2)})
URIS = st.sampled_from(["s3://KEY:SECRET@bucket/m/", "s3://bkt/m/", "https://u:p@host/x", "s3://bkt/m/?X-Amz-Signature=1"])

MUTATIONS: dict[tuple[str, ...], Any] = {
    ("metadata", "name"): NAMES,
    ("spec", "workers"): st.integers(1, 4),
    ("spec", "gpusPerWorker"): st.integers(0, 8),
    ("spec", "resources"): RESOURCES,
    ("spec", "env"): ENV,
    ("spec", "envFrom"): ENV_FROM,
    ("spec", "tolerations"): TOLERATIONS,
    ("spec", "affinity"): AFFINITY,
    ("spec", "nodeSelector"): st.sampled_from([{"a": "b"}, {"bad key!": "v"}, {"k": "bad value!"}]),
    ("spec", "serviceAccountName"): st.sampled_from(["sa", "Bad_SA", "a.b", ""]),
    ("spec", "priorityClassName"): st.sampled_from(["high", "Bad_PC", ""]),
    ("spec", "image"): st.sampled_from(["ghcr.io/kubedpo/trainer:1", "evil.io/miner:1", " ", "img"]),
    ("spec", "imagePullPolicy"): st.sampled_from(["Always", "Sometimes"]),
    ("spec", "metrics", "port"): st.sampled_from([0, 1, 9400, 29500, 29400, 65535, 70000]),
    ("spec", "runPolicy", "queueName"): st.sampled_from(["team-a", "team a", "x" * 63, "x" * 64, "a.b", "-a", ""]),
    ("spec", "runPolicy", "activeDeadlineSeconds"): st.sampled_from([1, 60, 2**31 - 1, 2**31, 2**63 - 1, 2**62]),
    ("spec", "runPolicy", "ttlSecondsAfterFinished"): st.sampled_from([0, 60, 2**31, 2**40]),
    ("spec", "runPolicy", "maxRestarts"): st.sampled_from([0, 3, 10**6]),
    ("spec", "checkpoint", "preemptionGraceSeconds"): st.sampled_from([1e308, 0.5, 3600, 3601.0, 25, "inf"]),
    ("spec", "training", "learningRate"): st.sampled_from([1e-5, "2", "inf", 0.001]),
    ("spec", "training", "batchSize"): st.sampled_from([2, "2", 2.5]),
    ("spec", "model", "uri"): URIS,
    ("spec", "s3", "endpointUrl"): st.sampled_from(["http://user:pw@minio:9000", "http://minio:9000"]),
    ("spec", "pod"): POD,
}
PATHS = sorted(MUTATIONS)


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    doc = {"apiVersion": "kubedpo.io/v1alpha1", "kind": "DPOJob", "metadata": {"name": "fuzz", "namespace": "ns"},
           "spec": minimal_spec(workers=2)}
    for path in draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=4, unique=True)):
        node = doc
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = copy.deepcopy(draw(MUTATIONS[path]))
    return doc


# --- the oracle: what a real API server (and the Job controller) would refuse ---------------

ENV_NAME_128 = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _oracle(children: list[dict[str, Any]], workers: int) -> None:
    cm, svc, job = children
    for child in children:
        json.dumps(child, allow_nan=False)  # no Infinity/NaN reaches the API
        for version in VERSIONS:
            errs = sorted(_k8s_validator(version, child["kind"], child["apiVersion"]).iter_errors(child), key=str)
            assert not errs, f"{child['kind']} invalid for Kubernetes {version}: {errs[0].message} at {list(errs[0].path)}"
        for k, v in (child["metadata"].get("labels") or {}).items():
            assert len(v) <= 63 and LABEL_VALUE.match(v), (k, v)
    name = svc["metadata"]["name"]
    assert len(name) <= 63 and DNS_LABEL.match(name)
    for i in range(workers):  # pod hostnames <job>-<index>
        assert len(f"{job['metadata']['name']}-{i}") <= 63
    ports = [p["port"] for p in svc["spec"]["ports"]]
    assert len(ports) == len(set(ports)) and all(1 <= p <= 65535 for p in ports)
    spec = job["spec"]
    assert 1 <= spec.get("activeDeadlineSeconds", 1) <= 2**63 - 1
    pod = spec["template"]["spec"]
    assert 0 <= pod["terminationGracePeriodSeconds"] <= 2**63 - 1
    for k, v in spec["template"]["metadata"]["labels"].items():
        assert len(v) <= 63 and LABEL_VALUE.match(v), (k, v)
    c = pod["containers"][0]
    reserved = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "JOB_COMPLETION_INDEX"}
    names = [e["name"] for e in c["env"]]
    assert not reserved & set(names)
    # KUBEDPO_* are the operator's alone (user env cannot set them): each once, only ours.
    kubedpo = [n for n in names if n.startswith("KUBEDPO_")]
    always = {"KUBEDPO_JOB_NAME", "KUBEDPO_NAMESPACE", "KUBEDPO_ATTEMPT", "KUBEDPO_RESULT_FILE"}
    assert len(kubedpo) == len(set(kubedpo)) and always <= set(kubedpo) <= always | {"KUBEDPO_JUDGE_API_KEY"}, kubedpo
    for e in c["env"]:
        assert ENV_NAME_128.match(e["name"]), e
        assert not (e.get("value") and "valueFrom" in e), e
        if "valueFrom" in e:
            assert len(e["valueFrom"]) == 1, e
    for e in c.get("envFrom") or []:
        assert len([k for k in ("configMapRef", "secretRef") if k in e]) == 1, e
    res = c.get("resources") or {}
    parsed = {part: {k: parse_quantity(v) for k, v in (res.get(part) or {}).items()} for part in ("limits", "requests")}
    for part in parsed.values():
        assert all(q >= 0 for q in part.values())
    for k, q in parsed["requests"].items():
        assert k not in parsed["limits"] or q <= parsed["limits"][k], (k, res)
        if "/" in k:
            assert parsed["limits"].get(k) == q and q == q.to_integral_value(), (k, res)
    assert parsed["limits"].get("nvidia.com/gpu", Decimal(0)) == Decimal(int(c["args"][c["args"].index(
        "--nproc-per-node") + 1]) if pod["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu") else 0)
    vols = {v["name"] for v in pod["volumes"]}
    assert len(vols) == len(pod["volumes"])
    assert all(m["name"] in vols for m in c["volumeMounts"])
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def _names_a_field(field: str, doc: dict[str, Any]) -> bool:
    """The refusal points into the manifest: metadata.name or a spec key the manifest has."""
    if field == "metadata.name":
        return True
    if not field.startswith("spec"):
        return False
    parts = re.split(r"[.\[]", field.removeprefix("spec.").removeprefix("spec"), maxsplit=1)
    return field == "spec" or parts[0] in doc["spec"]


@pytest.mark.slow  # 400 generated manifests, each admitted and built
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(manifests(), st.sampled_from(SETTINGS))
def test_admitted_manifests_run_with_valid_children_or_fail_naming_the_field(doc, operator_settings):
    # Only what the API server admits reaches the operator: the CRD's schema and its CEL rules.
    assume(jsonschema.Draft202012Validator(CRD_SCHEMA).is_valid(doc))
    assume(not violations(doc))
    name = doc["metadata"]["name"]
    try:
        spec = admit(name, doc["spec"], operator_settings)
        children = plan_attempt(name, "ns", "uid-1", spec, 0, operator_settings,
                                spec.run_policy.active_deadline_seconds)
    except SpecError as err:
        OUTCOMES["failed"] += 1
        assert err.message, err
        # Spec checks catch everything before a child is built: a child-level refusal would mean
        # the spec rules miss something the API server enforces.
        assert _names_a_field(err.field, doc), f"{err.field!r} does not name a field of {doc}"
        return
    OUTCOMES["valid"] += 1
    _oracle(children, spec.workers)


@pytest.mark.slow  # reads what the fuzz test above recorded
def test_the_fuzzer_reaches_both_outcomes():
    """Run after the fuzz test (same module, file order): both branches were exercised."""
    if not OUTCOMES:
        pytest.skip("run together with the fuzz test")
    print(f"fuzz outcomes: {dict(OUTCOMES)}")
    assert OUTCOMES["valid"] >= 20 and OUTCOMES["failed"] >= 20, OUTCOMES
