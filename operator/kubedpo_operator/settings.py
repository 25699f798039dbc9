"""Operator settings: one frozen dataclass, every field overridable by env `KUBEDPO_<FIELD>`.

A dataclass rather than module constants so tests can run several operators with different
settings in one process, and so the Helm chart has one documented list of knobs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass


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

    shm_size_limit: str = ""
    """sizeLimit of the memory-backed /dev/shm emptyDir (empty: no limit, bounded by the pod's memory)."""

    progress_interval_s: float = 15.0
    """Seconds between reads of rank 0's metrics into status.progress (and TTL checks)."""

    metrics_url_template: str = "http://{pod}.{service}.{namespace}.svc:{port}/metrics"
    """Rank 0's metrics URL; fields pod, service, namespace, port. Tests point it at loopback."""

    metrics_timeout_s: float = 5.0
    """Timeout of one metrics read; a slow trainer never blocks the operator."""

    handler_backoff_s: float = 10.0
    """Seconds before kopf retries a failed create/resume handler (the tick also resyncs)."""

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
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"KUBEDPO_{f.name.upper()}")
            if raw is None:
                continue
            if f.default is dataclasses.MISSING:
                raise TypeError(f"OperatorSettings.{f.name} has no default to take its type from")
            kind = type(f.default)
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise ValueError(f"KUBEDPO_{f.name.upper()}={raw!r}: expected {kind.__name__}") from None
        return cls(**values)
