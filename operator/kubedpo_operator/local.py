"""`kubedpo run dpojob.yaml`: a DPOJob's workers as local processes, before any cluster.

Each worker runs exactly the command and environment its pod would (children.trainer_args /
trainer_env, node rank from JOB_COMPLETION_INDEX), with rendezvous on 127.0.0.1, and the
same restart policy the operator applies: exit 2 fails at once, 75 (preempted) restarts for
free, anything else restarts the whole gang up to runPolicy.maxRestarts. The trainer resumes
from its newest complete checkpoint, as in the cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

import yaml

from kubedpo_trainer.config import LOG_FORMAT_ENV, resolve_log_format
from kubedpo_trainer.errors import EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED, combine_exit_codes

from .api import KIND, DPOJobSpec, SpecError, check_name, parse_spec
from .children import trainer_args, trainer_env


def load_manifest(path: str) -> tuple[str, str, DPOJobSpec]:
    """(name, namespace, spec) of the first DPOJob in `path`; SpecError names the bad field."""
    name, namespace, raw = first_document(path, KIND)
    check_name(name)
    return name, namespace, parse_spec(raw)


def first_document(path: str, kind: str) -> tuple[str, str, Any]:
    """(name, namespace, raw spec) of the first `kind` document in a YAML file; the name defaults
    to the file's stem, the namespace to default."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict) and d.get("kind") == kind]
    if not docs:
        raise SpecError("kind", f"{path}: no {kind} document")
    meta = docs[0].get("metadata") or {}
    return meta.get("name") or Path(path).stem, meta.get("namespace", "default"), docs[0].get("spec")


def local_env(spec: DPOJobSpec, name: str, namespace: str, attempt: int, index: int,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    """The pod's env on this machine: ours, then the user's literal values (valueFrom needs a cluster).

    `extra`: what the operator would set besides (the local pipeline runner's result file).
    """
    env = {**os.environ, **(extra or {})}
    for e in trainer_env(name, namespace, attempt):
        env[e["name"]] = e["value"]
    for e in spec.env or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
    env["JOB_COMPLETION_INDEX"] = str(index)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pipe(stream: IO[bytes], prefix: str, out: IO[str]) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"{prefix}{line.decode(errors='replace')}")
        out.flush()


def run_attempt(spec: DPOJobSpec, name: str, namespace: str, attempt: int, config_path: str,
                out: IO[str] = sys.stdout, log_format: str = "json", extra_env: dict[str, str] | None = None) -> int:
    """All workers of one attempt; their output streamed with a `[worker i]` prefix.

    With `log_format` "rich", worker 0 (global rank 0) owns the terminal and draws the live
    display; the others log warnings only, still prefixed.
    """
    port = _free_port()
    args = trainer_args(spec, name, attempt, config_path, addr="127.0.0.1", port=port)
    if spec.gpus_per_worker and not shutil.which("nvidia-smi"):
        print(f"no GPU here: running {spec.gpus_per_worker} ranks per worker on the CPU", file=out)
    procs, pipes = [], []
    for i in range(spec.workers):
        env = {**local_env(spec, name, namespace, attempt, i, extra_env), LOG_FORMAT_ENV: log_format}
        if i == 0 and log_format == "rich":
            procs.append(subprocess.Popen([sys.executable, "-m", "kubedpo_trainer.cli", *args], env=env))
            continue
        p = subprocess.Popen([sys.executable, "-m", "kubedpo_trainer.cli", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        t = threading.Thread(target=_pipe, args=(p.stdout, f"[worker {i}] ", out), daemon=True)
        t.start()
        procs.append(p)
        pipes.append(t)
    codes = [p.wait() for p in procs]
    for t in pipes:
        t.join(timeout=5)
    return combine_exit_codes([c if c >= 0 else 1 for c in codes])


def run(manifest: str, out: IO[str] = sys.stdout, log_format: str | None = None) -> int:
    """`log_format`: auto (None: rich when `out` is a terminal), json or rich."""
    try:
        name, namespace, spec = load_manifest(manifest)
        fmt = resolve_log_format(log_format, out)
    except (SpecError, ValueError) as err:
        print(f"{manifest}: {err}", file=sys.stderr)
        return EXIT_CONFIG
    with tempfile.TemporaryDirectory(prefix=f"kubedpo-{name}-") as workdir:
        config_path = Path(workdir) / "config.yaml"
        config_path.write_text(yaml.safe_dump(spec.trainer_config().to_wire(), sort_keys=False))
        return run_attempts(spec, name, namespace, str(config_path), out, fmt)


def run_attempts(spec: DPOJobSpec, name: str, namespace: str, config_path: str, out: IO[str],
                 log_format: str = "json", extra_env: dict[str, str] | None = None) -> int:
    """Attempts until success, a configuration error, or runPolicy.maxRestarts failures."""
    restarts, attempt = 0, 0
    max_restarts = spec.run_policy.max_restarts
    while True:
        print(f"{KIND}/{name}: attempt {attempt} with {spec.workers} worker(s)", file=out, flush=True)
        code = run_attempt(spec, name, namespace, attempt, config_path, out, log_format, extra_env)
        if code == EXIT_OK:
            print(f"{KIND}/{name}: Succeeded; output in {spec.output.uri}", file=out)
            return 0
        if code == EXIT_CONFIG:
            print(f"{KIND}/{name}: Failed (configuration or input error, not retried)", file=out)
            return code
        if code != EXIT_PREEMPTED:
            restarts += 1
            if restarts > max_restarts:
                print(f"{KIND}/{name}: Failed after {max_restarts} restarts (exit {code})", file=out)
                return code
        print(f"{KIND}/{name}: Restarting (exit {code}; restarts {restarts}/{max_restarts})", file=out)
        attempt += 1
