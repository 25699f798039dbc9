"""bench/gpu_check.py runs as is with --smoke (CPU, tiny model), so the GPU check cannot rot.

It runs every side for real (kubedpo live, precompute, FSDP via torchrun, TRL's DPOTrainer);
on CPU accelerate does not grant FSDP (the line says so) and MFU is null (no GPU peak known).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parents[2] / "bench" / "gpu_check.py"


def test_gpu_check_smoke_prints_one_json_line_with_every_number() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["smoke"] and out["device"] == "cpu" and out["params"] > 0
    for side in ("kubedpo_live", "kubedpo_precompute", "kubedpo_fsdp", "trl"):
        r = out[side]
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0, side
        assert r["changed_fraction"] > 0.9, side  # fp32 masters: nearly every weight moves, even at lr 5e-7
        assert r["mfu"] is None  # no GPU peak on CPU
    assert out["fsdp_granted"] is False
    assert out["ratio_tokens_per_s_live_vs_trl"] > 0
