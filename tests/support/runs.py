"""Run the real trainer as subprocesses (1 process, or N ranks through our launcher/torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_config(tiny: Any, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config for the tiny task; `sections` update the defaults section by section."""
    cfg: dict[str, Any] = {
        "model": {"uri": str(tiny.model_dir)},
        "data": {"train": tiny.train_uri, "eval": tiny.eval_uri, "maxLength": 64, "maxPromptLength": 32,
                 "shuffleBuffer": 64},
        "training": {"learningRate": 1e-3, "batchSize": 8, "maxSteps": 10, "loggingSteps": 1,
                     "warmupRatio": 0.0, "lrScheduler": "constant"},
        "output": {"uri": str(out / "output")},
        "metrics": {"port": 0},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@dataclass
class Run:
    returncode: int
    stderr: str
    out: Path

    def train_logs(self) -> list[dict[str, Any]]:
        """The structured per-step log lines rank 0 wrote."""
        rows = []
        for line in self.stderr.splitlines():
            i = line.find('{"event": "train"')
            if i >= 0:
                rows.append(json.loads(line[i:]))
        return rows

    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / "output" / "kubedpo_summary.json").read_text())


def run_trainer(cfg: dict[str, Any], out: Path, nproc: int | None = None, torchrun: bool = False,
                env: dict[str, str] | None = None, timeout: float = 300) -> Run:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    base = [sys.executable]
    if torchrun:
        cmd = [*base, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "kubedpo_trainer.cli", "--config", str(path)]
    else:
        cmd = [*base, "-m", "kubedpo_trainer.cli", "--config", str(path)]
        if nproc:
            cmd += ["--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    return Run(proc.returncode, proc.stderr, out)
