"""Host memory per rank while loading under FSDP2: rank-0 load + broadcast vs every rank reading.

    .venv/bin/python bench/fsdp_loading.py                      # ~170M-parameter Llama, 2 ranks, CPU/gloo
    .venv/bin/python bench/fsdp_loading.py --hidden 2048 --layers 8
    MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python bench/fsdp_loading.py   # freed tensors leave RSS

Runs the real trainer (full fine-tune, live reference: two models to load) on 2 ranks through
the forced-FSDP launcher (tests/support/fsdp_launcher.py; accelerate grants FSDP on GPUs only)
with `training.distributed.memoryEfficientLoading` on and off, and DDP for reference, for one
step. Prints, per rank, what the trainer's summary records: parameters held (policy +
reference), and host RSS growth across loading+sharding (now and peak), in MiB and in copies of
the full model. Memory-efficient loading should leave the non-zero rank at about one model's
worth (two half-shards) and keep rank 0 near one full copy plus its shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
LAUNCHER = ROOT / "tests" / "support" / "fsdp_launcher.py"


def build(root: Path, hidden: int, layers: int, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubedpo_trainer.tiny import build_tokenizer, write_preference_task

    model = root / "model"
    tok = build_tokenizer(model)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(model))
    write_preference_task(root / "data", 64, 8, 0, "standard")
    return model


def run(root: Path, model: Path, strategy: str, efficient: bool) -> dict:
    out = root / f"{strategy}-{efficient}"
    cfg = {"model": {"uri": str(model), "dtype": "float32"},
           "data": {"train": str(root / "data" / "train"), "maxLength": 64, "maxPromptLength": 32},
           "training": {"maxSteps": 1, "batchSize": 2, "distributed": {
               "strategy": strategy, **({"memoryEfficientLoading": efficient} if strategy == "fsdp" else {})}},
           "output": {"uri": str(out / "output")}, "metrics": {"port": 0}}
    out.mkdir(parents=True)
    (out / "job.yaml").write_text(yaml.safe_dump(cfg))
    entry = [str(LAUNCHER)] if strategy == "fsdp" else ["-m", "kubedpo_trainer.cli"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-port=29655", *entry, "--config", str(out / "job.yaml")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{strategy} run failed")
    return json.loads((out / "output" / "kubedpo_summary.json").read_text())["memory"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--runs", nargs="+", default=["ddp", "fsdp-read-all", "fsdp-efficient"],
                   choices=["ddp", "fsdp-read-all", "fsdp-efficient"])
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kubedpo-fsdp-loading-"))
    model = build(root, args.hidden, args.layers, args.vocab)
    mib = 2**20
    print("| run | rank | params held (MiB) | RSS growth after load (MiB) | peak RSS growth (MiB) | peak / full model |")
    print("|---|---|---|---|---|---|")
    runs = {"ddp": ("ddp", False), "fsdp-read-all": ("fsdp", False), "fsdp-efficient": ("fsdp", True)}
    for strategy, efficient in (runs[r] for r in args.runs):
        m = run(root, model, strategy, efficient)
        full = m["policy_full_bytes"]
        name = strategy if strategy == "ddp" else f"fsdp, memoryEfficientLoading {str(efficient).lower()}"
        for r in range(2):
            held = m["policy_local_bytes"][r] + m["reference_local_bytes"][r]
            print(f"| {name} | {r} | {held / mib:.0f} | {m['load_rss_growth_bytes'][r] / mib:.0f} | "
                  f"{m['load_peak_rss_growth_bytes'][r] / mib:.0f} | {m['load_peak_rss_growth_bytes'][r] / full:.2f} |",
                  flush=True)
    print(f"\nfull model: {full / mib:.0f} MiB fp32 ({full // 4 / 1e6:.0f}M parameters); policy + reference = 2 copies")


if __name__ == "__main__":
    main()
