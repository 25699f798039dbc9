"""The optional per-attempt NetworkPolicy: a pure builder.

torch's rendezvous store (and gloo/NCCL's sockets after it) is unauthenticated: any pod that can
reach worker 0 could join or disrupt the gang. With the operator setting `network_policy`, each
attempt gets a NetworkPolicy selecting exactly its pods (job-name + attempt labels) that admits
traffic on any port only from those same pods, and the metrics port only from the peers in
`network_policy_metrics_from` (the chart renders the operator's pods and Prometheus). A policy
per attempt, not per namespace, because "the same gang" is a label value no namespace-wide
policy can express. It is created before the Job, so no pod of the gang starts unprotected.
"""

from __future__ import annotations

import json
from typing import Any

from .api import DPOJobSpec
from .children import LABEL_ATTEMPT, LABEL_JOB, _meta, job_name
from .settings import OperatorSettings


def metrics_peers(settings: OperatorSettings) -> list[dict[str, Any]]:
    """The NetworkPolicyPeers allowed to scrape the metrics port (JSON list in the settings)."""
    if not settings.network_policy_metrics_from:
        return []
    peers = json.loads(settings.network_policy_metrics_from)
    if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
        raise ValueError("KUBEDPO_NETWORK_POLICY_METRICS_FROM: expected a JSON list of NetworkPolicyPeer objects")
    return peers


def build_network_policy(name: str, namespace: str, uid: str, spec: DPOJobSpec, attempt: int,
                         settings: OperatorSettings) -> dict[str, Any]:
    gang = {"matchLabels": {LABEL_JOB: name, LABEL_ATTEMPT: str(attempt)}}
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": gang}]}]
    peers = metrics_peers(settings)
    if spec.metrics.port and peers:
        ingress.append({"from": peers, "ports": [{"port": spec.metrics.port, "protocol": "TCP"}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(job_name(name, attempt), namespace, (name, uid), attempt, "network-policy"),
        "spec": {"podSelector": gang, "policyTypes": ["Ingress"], "ingress": ingress},
    }
