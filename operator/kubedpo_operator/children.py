"""Pure builders of one attempt's children: ConfigMap, headless Service, Indexed Job.

Everything here is a function of (DPOJob name/namespace/uid, parsed spec, attempt, settings) and
returns plain dicts, so tests assert whole objects and `kubedpo run` (local.py) reuses the exact
command and environment the pods get (`trainer_args`, `trainer_env`).

Why the trainer's own launcher instead of torchrun in the pod: torchrun reports any failed rank
as exit code 1, which would erase the exit-code contract the podFailurePolicy below acts on
(2 = bad config, 75 = preempted); see kubedpo_trainer.launch.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from kubedpo_trainer.errors import EXIT_CONFIG, EXIT_PREEMPTED
from kubedpo_trainer.stage_config import RESULT_FILE_ENV

from .api import API_VERSION, KIND, DPOJobSpec, PodOverrides
from .settings import OperatorSettings

CONTAINER = "trainer"
LABEL_JOB = "kubedpo.io/job-name"
LABEL_ATTEMPT = "kubedpo.io/attempt"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
MANAGED_BY = "kubedpo-operator"
CONFIG_FILE = "config.yaml"
# The task's result (kubedpo_trainer/result.py) goes to the termination log, which the kubelet
# keeps in the pod's status after exit; the operator copies it into status.result (task_result.py).
TERMINATION_LOG = "/dev/termination-log"
JUDGE_API_KEY_ENV = "KUBEDPO_JUDGE_API_KEY"
WRITABLE_ENV = [{"name": "HOME", "value": "/tmp"}, {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"}]
# Index of the podFailurePolicy rules; status.py maps a Job's failure message back to them.
RULE_DISRUPTION, RULE_CONFIG, RULE_PREEMPTED = 0, 1, 2


def job_name(name: str, attempt: int) -> str:
    """Name of attempt `attempt`'s Job and Service; pods are `<job_name>-<index>`."""
    return f"{name}-{attempt}"


def config_map_name(name: str, attempt: int) -> str:
    return f"{name}-{attempt}-config"


def master_addr(name: str, attempt: int, workers: int) -> str:
    """Worker 0's stable DNS name via the headless Service (loopback for a single worker)."""
    if workers == 1:
        return "127.0.0.1"
    return f"{job_name(name, attempt)}-0.{job_name(name, attempt)}"


def labels(name: str, attempt: int, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubedpo",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "kubedpo",
        LABEL_JOB: name,
        LABEL_ATTEMPT: str(attempt),
    }


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """Children are owned by the DPOJob, so `kubectl delete dpoj` removes them all."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def _meta(name: str, namespace: str, owner: tuple[str, str], attempt: int, component: str) -> dict:
    return {"name": name, "namespace": namespace, "labels": labels(owner[0], attempt, component),
            "ownerReferences": [owner_reference(*owner)]}


def procs_per_worker(spec: DPOJobSpec) -> int:
    return max(spec.gpus_per_worker, 1)


def trainer_args(spec: DPOJobSpec, name: str, attempt: int, config_path: str,
                 addr: str | None = None, port: int = 29500) -> list[str]:
    """Arguments after `python -m kubedpo_trainer.cli`; node rank comes from JOB_COMPLETION_INDEX."""
    return [
        "--config", config_path,
        "--nnodes", str(spec.workers),
        "--nproc-per-node", str(procs_per_worker(spec)),
        "--master-addr", addr if addr is not None else master_addr(name, attempt, spec.workers),
        "--master-port", str(port),
    ]


def trainer_env(name: str, namespace: str, attempt: int) -> list[dict[str, Any]]:
    """The operator's env for every worker (metric labels); user env is appended after it."""
    return [
        {"name": "KUBEDPO_JOB_NAME", "value": name},
        {"name": "KUBEDPO_NAMESPACE", "value": namespace},
        {"name": "KUBEDPO_ATTEMPT", "value": str(attempt)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def secret_env(spec: DPOJobSpec) -> list[dict[str, Any]]:
    """Secrets the task needs, as secretKeyRef env: the value never enters the ConfigMap or status."""
    llm = spec.judge.llm if spec.judge is not None else None
    if llm is None or llm.api_key_secret is None:
        return []
    ref = llm.api_key_secret
    return [{"name": JUDGE_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def build_config_map(name: str, namespace: str, uid: str, spec: DPOJobSpec, attempt: int) -> dict:
    """The resolved trainer config; env/envFrom (credentials) never land here."""
    text = yaml.safe_dump(spec.trainer_config().to_wire(), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(config_map_name(name, attempt), namespace, (name, uid), attempt, "config"),
        "data": {CONFIG_FILE: text},
    }


def build_service(name: str, namespace: str, uid: str, spec: DPOJobSpec, attempt: int,
                  settings: OperatorSettings) -> dict:
    """Headless, publishing not-ready pods: rendezvous must resolve before any pod is Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job_name(name, attempt), namespace, (name, uid), attempt, "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: name, LABEL_ATTEMPT: str(attempt)},
            "ports": [
                {"name": "rendezvous", "port": settings.rendezvous_port, "protocol": "TCP"},
                {"name": "metrics", "port": spec.metrics.port or 9400, "protocol": "TCP"},
            ],
        },
    }


def pod_failure_policy() -> dict:
    """Disruptions are ignored (the Job recreates the pod); exit codes end the Job at once.

    The rule order is a contract with status.py, which reads the matched rule's index from
    the Job's failure message: config error → Failed, preempted → free gang restart.
    """
    rules: list[dict[str, Any]] = [None, None, None]  # type: ignore[list-item]
    # status is required by Kubernetes 1.28's schema (optional, defaulting to True, later).
    rules[RULE_DISRUPTION] = {"action": "Ignore",
                              "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    # An empty onPodConditions: 1.28's schema lists the field as required (its validation only
    # refuses a non-empty one next to onExitCodes).
    rules[RULE_CONFIG] = {"action": "FailJob", "onPodConditions": [], "onExitCodes": {
        "containerName": CONTAINER, "operator": "In", "values": [EXIT_CONFIG]}}
    rules[RULE_PREEMPTED] = {"action": "FailJob", "onPodConditions": [], "onExitCodes": {
        "containerName": CONTAINER, "operator": "In", "values": [EXIT_PREEMPTED]}}
    return {"rules": rules}


def _resources(spec: DPOJobSpec) -> dict[str, Any]:
    """User resources with quantities as strings (the API's canonical form) plus the GPU limit."""
    res: dict[str, Any] = {
        k: {q: str(v) for q, v in (vals or {}).items()} if isinstance(vals, dict) else vals
        for k, vals in (spec.resources or {}).items()
    }
    if spec.gpus_per_worker:
        res.setdefault("limits", {})["nvidia.com/gpu"] = str(spec.gpus_per_worker)
    return res


def _container(name: str, namespace: str, spec: DPOJobSpec, attempt: int,
               settings: OperatorSettings) -> dict[str, Any]:
    pod = spec.pod or PodOverrides()
    c: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.default_image,
        "command": [settings.python, "-m", "kubedpo_trainer.cli"],
        "args": trainer_args(spec, name, attempt, f"{settings.config_mount_path}/{CONFIG_FILE}",
                             port=settings.rendezvous_port),
        # The root filesystem is read-only: HOME and caches go to the /tmp emptyDir (as in our
        # image); user env comes last, so a custom image may point them elsewhere it mounts.
        "env": trainer_env(name, namespace, attempt) + [{"name": RESULT_FILE_ENV, "value": TERMINATION_LOG}]
        + secret_env(spec) + WRITABLE_ENV + [dict(e) for e in spec.env or []],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "ports": [{"name": "rendezvous", "containerPort": settings.rendezvous_port}],
        "resources": _resources(spec),
        "volumeMounts": [
            {"name": "config", "mountPath": settings.config_mount_path, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            *[dict(m) for m in pod.volume_mounts or []],
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], **({"add": list(pod.add_capabilities)} if pod.add_capabilities
                                                 else {})},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.metrics.port:
        c["ports"].append({"name": "metrics", "containerPort": spec.metrics.port})
    if spec.env_from:
        c["envFrom"] = [dict(e) for e in spec.env_from]
    if spec.image_pull_policy:
        c["imagePullPolicy"] = spec.image_pull_policy
    return c


def _pod_spec(name: str, namespace: str, spec: DPOJobSpec, attempt: int,
              settings: OperatorSettings) -> dict[str, Any]:
    shm: dict[str, Any] = {"medium": "Memory"}
    if settings.shm_size_limit:
        shm["sizeLimit"] = settings.shm_size_limit
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        # SIGTERM -> finish the step, write a checkpoint, exit 75: give it the configured grace
        # plus slack for the launcher to collect its workers, before the kubelet's SIGKILL.
        "terminationGracePeriodSeconds": math.ceil(spec.checkpoint.preemption_grace_seconds) + 15,
        "subdomain": job_name(name, attempt),  # pods resolve as <job>-<attempt>-<index>.<service>
        "automountServiceAccountToken": False,  # the trainer needs no Kubernetes permissions
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(name, namespace, spec, attempt, settings)],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(name, attempt)}},
            {"name": "dshm", "emptyDir": shm},
            {"name": "tmp", "emptyDir": {}},
            *[dict(v) for v in (spec.pod.volumes if spec.pod else None) or []],
        ],
    }
    optional = {
        "serviceAccountName": spec.service_account_name,
        "priorityClassName": spec.priority_class_name,
        "nodeSelector": spec.node_selector,
        "tolerations": spec.tolerations,
        "affinity": spec.affinity,
        "imagePullSecrets": [dict(r) for r in spec.pod.image_pull_secrets or []] if spec.pod else None,
    }
    pod.update({k: v for k, v in optional.items() if v})
    return pod


def _pod_meta(name: str, attempt: int, spec: DPOJobSpec) -> dict[str, Any]:
    """User labels/annotations first, ours over them (spec_rules refuses reserved keys anyway)."""
    pod = spec.pod or PodOverrides()
    meta: dict[str, Any] = {"labels": {**(pod.labels or {}), **labels(name, attempt, "trainer")}}
    if pod.annotations:
        meta["annotations"] = dict(pod.annotations)
    return meta


def build_job(name: str, namespace: str, uid: str, spec: DPOJobSpec, attempt: int,
              settings: OperatorSettings, active_deadline_seconds: int | None = None) -> dict:
    """The gang: an Indexed Job, all-or-nothing (backoffLimit 0), suspended for Kueue/suspend."""
    rp = spec.run_policy
    meta = _meta(job_name(name, attempt), namespace, (name, uid), attempt, "trainer")
    if rp.queue_name:
        meta["labels"][LABEL_QUEUE] = rp.queue_name
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.workers,
        "parallelism": spec.workers,
        "backoffLimit": 0,
        "suspend": bool(rp.suspend or rp.queue_name),
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": _pod_meta(name, attempt, spec),
            "spec": _pod_spec(name, namespace, spec, attempt, settings),
        },
    }
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def build_children(name: str, namespace: str, uid: str, spec: DPOJobSpec, attempt: int,
                   settings: OperatorSettings, active_deadline_seconds: int | None = None) -> list[dict]:
    """In creation order: the Job last, so its pods never start before config and DNS exist."""
    from .netpol import build_network_policy  # netpol builds on this module's labels

    policy = [build_network_policy(name, namespace, uid, spec, attempt, settings)] if settings.network_policy else []
    return [
        build_config_map(name, namespace, uid, spec, attempt),
        build_service(name, namespace, uid, spec, attempt, settings),
        *policy,  # before the Job: no pod of the gang starts unprotected
        build_job(name, namespace, uid, spec, attempt, settings, active_deadline_seconds),
    ]
