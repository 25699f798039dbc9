"""The pure classification of child-creation errors, and the operator's allow-lists."""

from __future__ import annotations

import json

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from kubedpo_operator.api import SpecError, parse_spec
from kubedpo_operator.api_errors import Refused, Retry, backoff, classify
from kubedpo_operator.policy import policy_problems
from kubedpo_operator.settings import OperatorSettings
from tests.operator.conftest import minimal_spec


def _api(status: int, reason: str, body: dict | None = None, headers: dict | None = None) -> ApiException:
    err = ApiException(status=status, reason=reason)
    err.body = json.dumps(body or {"message": f"{reason} message"})
    err.headers = headers or {}
    return err


def test_4xx_is_final_and_quotes_the_field_and_the_servers_message():
    body = {"message": 'Service "a.b-0" is invalid: metadata.name: Invalid value: "a.b-0"',
            "details": {"causes": [{"field": "metadata.name", "message": "must be a DNS-1035 label"}]}}
    got = classify(_api(422, "Unprocessable Entity", body), "create Service a.b-0")
    assert got == Refused("create Service a.b-0: metadata.name",
                          f"API server refused (422 Unprocessable Entity): {body['message']}", 422)
    assert isinstance(classify(_api(403, "Forbidden"), "create Job x"), Refused)
    assert isinstance(classify(_api(400, "Bad Request"), "create Job x"), Refused)


@pytest.mark.parametrize(("status", "headers", "attempt", "delay"), [
    (500, {}, 0, 1.0), (503, {}, 3, 8.0), (429, {"Retry-After": "30"}, 0, 30.0),
    (429, {"Retry-After": "1"}, 4, 16.0), (500, {}, 40, 300.0), (429, {"Retry-After": "soon"}, 1, 2.0),
])
def test_5xx_and_429_retry_with_exponential_backoff_never_before_retry_after(status, headers, attempt, delay):
    got = classify(_api(status, "x", headers=headers), "create Job x-0", attempt)
    assert isinstance(got, Retry) and got.delay == delay and f"answered {status}" in got.reason


def test_client_side_and_transport_errors():
    assert classify(ValueError("Invalid value for `containers`, must not be `None`"), "create Job x") == Refused(
        "create Job x", "kubernetes client refused: Invalid value for `containers`, must not be `None`")
    assert isinstance(classify(urllib3.exceptions.MaxRetryError(None, "/x"), "create Job x"), Retry)
    assert isinstance(classify(ConnectionResetError(), "create Job x"), Retry)
    assert isinstance(classify(AttributeError("'str' object has no attribute 'get'"), "create Job x"), Refused)
    assert classify(SpecError("spec.env[0].name", "reserved"), "spec") == Refused("spec.env[0].name", "reserved")
    assert [backoff(n, 0.5, 4) for n in range(5)] == [0.5, 1, 2, 4, 4]


@pytest.mark.parametrize(("extra", "settings", "field"), [
    ({"image": "evil.io/miner:1"}, OperatorSettings(allowed_images="ghcr.io/kubedpo/*"), "spec.image"),
    ({"serviceAccountName": "admin"}, OperatorSettings(allowed_service_accounts="dpo-*"), "spec.serviceAccountName"),
    ({"priorityClassName": "system-node-critical"}, OperatorSettings(allowed_priority_classes="team-*,low"),
     "spec.priorityClassName"),
    ({"pod": {"addCapabilities": ["IPC_LOCK"]}}, OperatorSettings(), "spec.pod.addCapabilities[0]"),
    ({"pod": {"volumes": [{"name": "ib", "hostPath": {"path": "/dev/infiniband"}}]}}, OperatorSettings(),
     "spec.pod.volumes[0].hostPath.path"),
    ({"pod": {"volumes": [{"name": "ib", "hostPath": {"path": "/dev/infiniband-evil"}}]}},
     OperatorSettings(allowed_host_paths="/dev/infiniband"), "spec.pod.volumes[0].hostPath.path"),
    ({"metrics": {"port": 29400}}, OperatorSettings(rendezvous_port=29400), "spec.metrics.port"),
])
def test_allow_lists_refuse_naming_the_field(extra, settings, field):
    assert policy_problems(parse_spec(minimal_spec(**extra)), settings)[0][0] == field


def test_allow_lists_admit_what_they_name():
    settings = OperatorSettings(allowed_images="ghcr.io/kubedpo/*", allowed_service_accounts="dpo-*",
                                allowed_capabilities="IPC_LOCK", allowed_host_paths="/dev/infiniband")
    spec = parse_spec(minimal_spec(image="ghcr.io/kubedpo/trainer:2", serviceAccountName="dpo-team-a", pod={
        "addCapabilities": ["IPC_LOCK"], "volumes": [{"name": "ib", "hostPath": {"path": "/dev/infiniband/uverbs0"}}],
        "volumeMounts": [{"name": "ib", "mountPath": "/dev/infiniband/uverbs0"}]}))
    assert policy_problems(spec, settings) == []
