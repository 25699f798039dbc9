"""Operator settings: one frozen dataclass, every field overridable by env `KUBEDPO_<FIELD>`.

A dataclass rather than module constants so tests can run several operators with different
settings in one process, and so the Helm chart has one documented list of knobs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OperatorSettings:
    default_image: str = "ghcr.io/kubedpo/trainer:0.1.0"
    """Trainer image used when a DPOJob has no spec.image."""

    rendezvous_port: int = 29500
    """TCP port of torch.distributed's static rendezvous on worker 0."""

    config_mount_path: str = "/etc/kubedpo"
    """Where the ConfigMap with config.yaml is mounted in every pod."""

    python: str = "python"
    """Interpreter in the trainer image that runs `-m kubedpo_trainer.cli`."""

    run_as_user: int = 1000
    """UID of the trainer container (the restricted Pod Security Standard needs non-root)."""

    shm_size_limit: str = "16Gi"
    """sizeLimit of the memory-backed /dev/shm emptyDir (it counts against the pod's memory; empty: no limit)."""

    allowed_images: str = ""
    """Comma-separated fnmatch patterns a DPOJob's spec.image must match (empty: any image)."""

    allowed_service_accounts: str = ""
    """Comma-separated fnmatch patterns for spec.serviceAccountName (empty: any)."""

    allowed_priority_classes: str = ""
    """Comma-separated fnmatch patterns for spec.priorityClassName (empty: any)."""

    allowed_capabilities: str = ""
    """Comma-separated Linux capabilities spec.pod.addCapabilities may add (empty: none, e.g. IPC_LOCK)."""

    allowed_host_paths: str = ""
    """Comma-separated path prefixes hostPath volumes may use (empty: no hostPath volumes)."""

    progress_interval_s: float = 15.0
    """Seconds between reads of rank 0's metrics into status.progress (and TTL checks)."""

    metrics_url_template: str = "http://{pod}.{service}.{namespace}.svc:{port}/metrics"
    """Rank 0's metrics URL; fields pod, service, namespace, port. Tests point it at loopback."""

    metrics_timeout_s: float = 5.0
    """Timeout of one metrics read; a slow trainer never blocks the operator."""

    memory_plan_timeout_s: float = 5.0
    """Seconds to read a GPU job's model config.json for the MemoryPlan condition (0: no plan)."""

    metrics_max_bytes: int = 1048576
    """Largest /metrics body read from rank 0 (bytes); a larger one is refused with a condition.
    The trainer's own exposition is a few KiB: the cap bounds operator memory per DPOJob."""

    metrics_max_samples: int = 20000
    """Most samples parsed from rank 0's /metrics; more are refused with a condition."""

    network_policy: bool = False
    """Give each attempt a NetworkPolicy: any port from the same gang only, metrics from the peers below."""

    network_policy_metrics_from: str = ""
    """JSON list of NetworkPolicyPeer objects allowed to reach the metrics port (the operator, Prometheus)."""

    handler_backoff_s: float = 10.0
    """Seconds before kopf retries a failed create/resume handler (the tick also resyncs)."""

    api_retry_base_s: float = 1.0
    """First delay after a 5xx/429 from the API server when creating children; doubles per try."""

    api_retry_max_s: float = 300.0
    """Longest delay between those tries (a larger Retry-After from the server still wins)."""

    operator_metrics_port: int = 8080
    """Port of the operator's own Prometheus endpoint (0 disables)."""

    liveness_endpoint: str = "http://0.0.0.0:8081/healthz"
    """kopf's liveness endpoint (empty disables)."""

    peering_name: str = ""
    """kopf peering object for an active/standby pair (empty: standalone)."""

    namespaces: str = ""
    """Comma-separated namespaces to watch (empty: cluster-wide)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Apply `KUBEDPO_<FIELD_UPPER>` overrides, converted to each field's type."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"KUBEDPO_{f.name.upper()}")
            if raw is None:
                continue
            if f.default is dataclasses.MISSING:
                raise TypeError(f"OperatorSettings.{f.name} has no default to take its type from")
            kind = type(f.default)
            try:
                values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                raise ValueError(f"KUBEDPO_{f.name.upper()}={raw!r}: expected {kind.__name__}") from None
        return cls(**values)


def _parse_bool(raw: str) -> bool:
    """"true"/"false" (any case), as Helm renders booleans; bool("false") would be True."""
    if raw.strip().lower() in ("true", "1", "yes"):
        return True
    if raw.strip().lower() in ("false", "0", "no", ""):
        return False
    raise ValueError(raw)
