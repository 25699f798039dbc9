"""A real Prometheus (Debian's `prometheus` binary) on 127.0.0.1, scraping targets the test names.

Started per test with its own config, data dir and free port; stopped by its PID. Scrapes every
second, with honor_labels or without (then target labels win over the trainer's, as with
annotation-based scrapers); the trainer's `dpojob` label survives either way.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.manifests.tools import require_tool
from tests.support.runs import free_port

READY_TIMEOUT_S = 20.0




class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as rsp:
                body = json.load(rsp)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"prometheus {path} {params}: {err.code} {err.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        data = self.api("query", query=expr, **({"time": f"{at:.3f}"} if at is not None else {}))
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return require_tool("prometheus")


@pytest.fixture
def start_prometheus(prometheus_bin: str, tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    procs: list[subprocess.Popen] = []
    stack = contextlib.ExitStack()

    def _start(targets: list[str], honor_labels: bool = True, labels: dict[str, str] | None = None,
               rule_files: list[str] | None = None) -> Prometheus:
        port = free_port()
        home = tmp_path / f"prometheus-{len(procs)}"  # several instances may scrape the same run
        home.mkdir()
        config = home / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "kubedpo-trainer", "honor_labels": honor_labels,
                                "static_configs": [{"targets": targets, **({"labels": labels} if labels else {})}]}],
            **({"rule_files": rule_files} if rule_files else {}),
        }))
        log = stack.enter_context(open(home / "prometheus.log", "w"))
        proc = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"prometheus exited: {(home / 'prometheus.log').read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as rsp:
                    if rsp.status == 200:
                        return Prometheus(url)
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"prometheus not ready after {READY_TIMEOUT_S}s")

    yield _start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    stack.close()
