"""The memory plan's estimate against peak memory measured on CPU (fp32), within 25 %.

Real models (random Llama weights, built here), the trainer's loader, forward and loss; the
measurement is host RSS growth (tests/support/memory_probe.py says how it is kept honest).
Four setups cover the plan's branches: full fine-tune with a live reference, the same with
gradient checkpointing, LoRA (no reference copy), and a precomputed reference (none in memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedpo_operator.api import parse_spec
from kubedpo_operator.memory_plan import ModelShape, estimate, setup_of

PROBE = Path(__file__).parents[1] / "support" / "memory_probe.py"
BATCH, LENGTH = 4, 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~6M parameters: big enough that tensors, not the runtime, dominate the measurement."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("plan-model")
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


SETUPS: dict[str, dict[str, Any]] = {
    "full-live": {},
    "full-checkpointing": {"training": {"gradientCheckpointing": True}},
    "lora": {"model": {"lora": {"rank": 8}}},
    "precompute": {"training": {"referenceLogps": "precompute"}},
}


def _clean_env() -> dict[str, str]:
    """The probe measures the plain loader: settings that earlier in-process tests may leave in this
    process's environment (accelerate/FSDP loading switches, the trainer's own) must not reach it."""
    leaked = ("ACCELERATE_", "FSDP_", "KUBEDPO_")
    return {k: v for k, v in os.environ.items() if not k.startswith(leaked)}


@pytest.mark.parametrize("name", list(SETUPS))
def test_estimate_is_within_25_percent_of_measured_peak(model_dir: Path, tmp_path: Path, name: str) -> None:
    spec: dict[str, Any] = {"model": {"uri": str(model_dir), "dtype": "float32"},
                            "data": {"train": "unused", "maxLength": LENGTH},
                            "training": {"batchSize": BATCH}, "output": {"uri": str(tmp_path / "out")}}
    for section, values in SETUPS[name].items():
        spec[section].update(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, str(PROBE), str(path), str(BATCH), str(LENGTH)], capture_output=True,
                          text=True, timeout=300,
                          env={**_clean_env(), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    est = estimate(shape, setup_of(parse_spec(spec)))["peak"]
    print(f"{name}: estimated {est / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert est == pytest.approx(measured, rel=0.25), (name, est, measured)
