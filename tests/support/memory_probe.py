"""Peak host memory of real DPO steps on CPU, for checking the memory plan (one config per process).

    python tests/support/memory_probe.py CONFIG.yaml BATCH LENGTH  ->  prints {"peak_bytes": ...}

Loads policy and reference through the trainer's own loader, then runs three optimizer steps of
the trainer's forward/loss on a (2B, L) batch whose every position after the first is a response
token (the plan's worst case). Peak = the high-water mark of RSS (VmHWM) at the end minus RSS
before loading, with the high-water mark reset at that baseline (/proc/self/clear_refs): a peak
reached while importing (seen on a fresh clone: ~480 MB, above every training peak) must not
count. Run it with OMP_NUM_THREADS=1 and MALLOC_MMAP_THRESHOLD_ low, so freed tensors leave RSS
and the high-water mark tracks live tensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kubedpo_trainer.config import load_config
from kubedpo_trainer.distributed import host_rss_bytes
from kubedpo_trainer.forward import concatenated_forward
from kubedpo_trainer.losses import LossInputs, compute_loss
from kubedpo_trainer.models import load_models
from kubedpo_trainer.reference import Reference


def _high_water_mark_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(path: str, batch: int, length: int) -> None:
    cfg = load_config(path)
    # Code, thread pools and kernels loaded before the baseline: only tensors should count.
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    torch.ones(64, 64) @ torch.ones(64, 64)
    base = host_rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    models = load_models(cfg)
    vocab = models.unwrap(models.policy).config.vocab_size
    params = [p for p in models.policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    if cfg.training.reference_logps == "precompute":  # as the trainer does after its pass
        models.release_reference()
        reference = Reference(models, {str(i): (-1.0, -1.0) for i in range(batch)})
    else:
        reference = Reference(models)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2 * batch, length), generator=g)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[:, 0] = False
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask,
         "margin": torch.zeros(batch), "weight": torch.ones(batch), "row_ids": [str(i) for i in range(batch)],
         "num_tokens": ids.numel()}
    for _ in range(3):
        policy = concatenated_forward(models.policy, b)
        ref = reference.logps(b)
        out = compute_loss(cfg.training.loss, LossInputs.from_forward(policy, ref, b), 0.1, cfg.training)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del policy, ref, out
    peak = _high_water_mark_bytes() - base
    print(json.dumps({"peak_bytes": peak}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
