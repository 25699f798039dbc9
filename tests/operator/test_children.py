"""The pure child builders: whole objects valid against Kubernetes 1.37's schemas, and the
fields the gang, restarts, Kueue and the trainer's exit-code contract depend on."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from kubedpo_operator.api import parse_spec
from kubedpo_operator.children import (
    LABEL_QUEUE,
    RULE_CONFIG,
    RULE_PREEMPTED,
    build_children,
    build_config_map,
    build_job,
    trainer_args,
)
from kubedpo_operator.settings import OperatorSettings
from kubedpo_trainer.config import parse_config
from kubedpo_trainer.errors import EXIT_CONFIG, EXIT_PREEMPTED
from tests.operator.conftest import minimal_spec

K8S = kubernetes_validate.latest_version()
OLDEST = "1.28.0"  # the chart's kubeVersion floor


def _spec(**extra):
    return parse_spec(minimal_spec(**extra))


@pytest.mark.parametrize("extra", [
    {},
    {"workers": 4, "gpusPerWorker": 8, "runPolicy": {"queueName": "q", "activeDeadlineSeconds": 60},
     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}], "nodeSelector": {"a": "b"},
     "resources": {"requests": {"cpu": 4, "memory": "8Gi"}}, "priorityClassName": "high",
     "env": [{"name": "AWS_REGION", "value": "x"}], "envFrom": [{"secretRef": {"name": "s3"}}]},
])
def test_children_are_valid_kubernetes_objects(extra):
    for obj in build_children("j", "ns", "uid-1", _spec(**extra), 0, OperatorSettings(), 30):
        for version in (OLDEST, K8S):  # 1.28 required onPodConditions[].status: found this way
            kubernetes_validate.validate(obj, version, strict=True)


def test_pod_section_reaches_the_pod_and_operator_labels_win():
    spec = _spec(pod={"labels": {"team": "a", "cost-centre": "ml"}, "annotations": {"note": "x"},
                      "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "cache"}}],
                      "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
                      "imagePullSecrets": [{"name": "regcred"}], "addCapabilities": ["IPC_LOCK"]},
                 resources={"limits": {"rdma/hca": 1}})
    job = build_job("j", "ns", "u", spec, 0, OperatorSettings())
    tpl = job["spec"]["template"]
    assert tpl["metadata"]["labels"]["team"] == "a" and tpl["metadata"]["labels"]["kubedpo.io/job-name"] == "j"
    assert tpl["metadata"]["annotations"] == {"note": "x"}
    pod = tpl["spec"]
    c = pod["containers"][0]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "cache"}} in pod["volumes"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert c["resources"]["limits"]["rdma/hca"] == "1"
    for version in (OLDEST, K8S):
        kubernetes_validate.validate(job, version, strict=True)


def test_gang_job_shape():
    job = build_job("llama", "ns", "u", _spec(workers=3, gpusPerWorker=4), 2, OperatorSettings())
    s = job["spec"]
    assert (s["completionMode"], s["completions"], s["parallelism"], s["backoffLimit"]) == ("Indexed", 3, 3, 0)
    assert s["suspend"] is False and "activeDeadlineSeconds" not in s
    pod = s["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == "llama-2"
    assert pod["terminationGracePeriodSeconds"] == 25 + 15  # checkpoint.preemptionGraceSeconds + slack
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # the one writable path: HOME lives there
    assert {"name": "HOME", "value": "/tmp"} in c["env"]
    args = c["args"]
    assert args[args.index("--nnodes") + 1] == "3" and args[args.index("--nproc-per-node") + 1] == "4"
    assert args[args.index("--master-addr") + 1] == "llama-2-0.llama-2"
    assert job["metadata"]["labels"]["kubedpo.io/attempt"] == "2"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u"


def test_pod_failure_policy_matches_the_trainer_exit_codes():
    rules = build_job("j", "ns", "u", _spec(), 0, OperatorSettings())["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[RULE_CONFIG]["action"] == "FailJob"
    assert rules[RULE_CONFIG]["onExitCodes"]["values"] == [EXIT_CONFIG]
    assert rules[RULE_PREEMPTED]["onExitCodes"]["values"] == [EXIT_PREEMPTED]


def test_kueue_queue_creates_suspended_and_labelled():
    job = build_job("j", "ns", "u", _spec(runPolicy={"queueName": "team-a"}), 0, OperatorSettings())
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][LABEL_QUEUE] == "team-a"


def test_single_worker_uses_loopback_rendezvous():
    args = trainer_args(_spec(), "j", 0, "/etc/kubedpo/config.yaml")
    assert args[args.index("--master-addr") + 1] == "127.0.0.1"


def test_config_map_is_the_trainer_config_without_secrets():
    spec = _spec(env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}],
                 envFrom=[{"secretRef": {"name": "creds"}}], workers=2)
    text = build_config_map("j", "ns", "u", spec, 0)["data"]["config.yaml"]
    assert "hunter2" not in text and "creds" not in text and "workers" not in text
    cfg = parse_config(yaml.safe_load(text))  # the trainer's own loader accepts it as is
    assert cfg.model.uri == spec.model.uri and cfg.checkpoint.every_steps == 10


def test_user_env_follows_operator_env():
    spec = _spec(env=[{"name": "AWS_REGION", "value": "eu"}])
    env = build_job("j", "ns", "u", spec, 1, OperatorSettings())["spec"]["template"]["spec"]["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert names[:3] == ["KUBEDPO_JOB_NAME", "KUBEDPO_NAMESPACE", "KUBEDPO_ATTEMPT"] and names[-1] == "AWS_REGION"
    assert env[2]["value"] == "1"
