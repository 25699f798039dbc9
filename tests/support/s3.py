"""pytest plugin: a real SeaweedFS per test session, a fresh bucket per test, a fault proxy.

Enable with `pytest_plugins = ["tests.support.s3"]` in tests/conftest.py.

- `seaweedfs` (session): the running store (`.endpoint`, `.access_key`, `.secret_key`,
  `.env()` for subprocesses, `.client()` for arranging data, `.new_bucket()`).
- `s3` (function): a fresh bucket, AWS_* env set to the good credentials, and
  `kubedpo_trainer.storage` configured against the store directly (2 s read timeout,
  short backoff, so fault tests stay fast). `s3.uri("a/b.jsonl")` builds URIs.
- `fault_proxy` (function): a `FaultProxy` between client and store; call
  `s3.via(fault_proxy)` to route `storage` (and `s3.env(...)` for subprocesses) through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kubedpo_trainer import storage
from kubedpo_trainer.config import S3Config

from .faultproxy import FaultProxy
from .seaweed import SeaweedFS


@dataclass
class S3Fixture:
    server: SeaweedFS
    bucket: str
    endpoint: str
    max_attempts: int = 4

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def configure(self, endpoint: str | None = None, **overrides: Any) -> None:
        """Point `storage` at `endpoint` (default: the current one) with test-friendly timing."""
        self.endpoint = endpoint or self.endpoint
        settings: dict[str, Any] = {"read_timeout": 2.0, "connect_timeout": 2.0, "resume_wait_initial": 0.01}
        settings.update(overrides)
        storage.configure(S3Config(endpoint_url=self.endpoint, max_attempts=self.max_attempts), **settings)

    def via(self, proxy: FaultProxy) -> None:
        self.configure(proxy.endpoint)

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should use the same endpoint as `storage`."""
        return self.server.env(self.endpoint)

    def client(self) -> Any:
        """A raw boto3 client straight to the store (no proxy), for arranging and checking data."""
        return self.server.client()


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    server = SeaweedFS().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Fixture]:
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    fx = S3Fixture(seaweedfs, seaweedfs.new_bucket(), seaweedfs.endpoint)
    fx.configure()
    yield fx
    storage.configure()


@pytest.fixture
def fault_proxy(seaweedfs: SeaweedFS) -> Iterator[FaultProxy]:
    with FaultProxy(seaweedfs.endpoint) as proxy:
        yield proxy
