"""One prepared GPU check: kubedpo (live reference, precompute, FSDP2) and TRL's DPOTrainer, one JSON line.

    python bench/gpu_check.py            # one H100/H200: a ~0.5B Llama built here, < 8 minutes
    python bench/gpu_check.py --smoke    # CPU, tiny model, seconds (tests/bench/test_gpu_check.py)

Nothing is downloaded: the model (random weights, Llama-shaped, GQA, untied head) and the
preference rows (the tiny task, ~350-token prompts) are built locally; HF_HUB_OFFLINE=1.
Every run is a subprocess of the real entry points, on the same model, rows and order:
  kubedpo live        bf16-mixed (fp32 weights + AdamW state, bf16 autocast), live reference
  kubedpo precompute  the same, reference log-probs precomputed and the reference freed
  kubedpo fsdp        the same as live under training.distributed.strategy fsdp (FSDP2, 1 GPU, torchrun)
  trl                 DPOTrainer, bf16=True on fp32 weights (autocast), explicit ref_model
Reported per run: tokens/s (non-padding tokens of the timed steps over their time; both sides
train on the same rows in the same order, so kubedpo's token counts serve for TRL too), peak
memory (CUDA max allocated; CPU: peak RSS), MFU = 8 N tokens/s / peak bf16 dense FLOP/s
(policy forward+backward 6N, reference forward 2N; precompute does 6N a step and is counted so),
and the fraction of weight elements that differ from the initial model after training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from bench_models import build_model

BETA, LR, SEED = 0.1, 5e-7, 0
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
# bf16 dense tensor-core peak (FLOP/s) by device name, from the vendors' datasheets (SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


# --- inputs, built here (runs as is on a bare GPU machine: only this folder and the project) -----


def write_data(folder: Path, n: int, prompt_words: tuple[int, int]) -> str:
    """The tiny task's rows (one token a word) in one JSONL shard, read in file order by both sides."""
    import random

    from kubedpo_trainer.tiny import CATEGORIES, WORD_CATEGORY, make_row

    rng, vocab = random.Random(SEED), list(WORD_CATEGORY)
    rows = []
    for _ in range(n):
        words = tuple(rng.choice(vocab) for _ in range(rng.randint(*prompt_words)))
        rows.append(make_row(words, rng.choice([c for c in CATEGORIES if c != WORD_CATEGORY[words[0]]]), "standard"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


class Memory:
    """Peak memory of the training steps: CUDA's peak counter (reset at the first step); on CPU
    the peak RSS (VmHWM, reset by `clear_refs 5`)."""

    def reset(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def result(self) -> dict[str, int]:
        import torch

        if torch.cuda.is_available():
            return {"peak_bytes": int(torch.cuda.max_memory_allocated())}
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return {"peak_bytes": int(line.split()[1]) * 1024}


def _changed_fraction(model: Any, initial_dir: str) -> float:
    """Elements that differ from the initial model's, over every weight but the input embedding
    (whose rows for tokens the data never uses get no gradient and cannot move)."""
    import torch
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(initial_dir, dtype=torch.float32).state_dict()
    changed = total = 0
    for k, v in model.state_dict().items():
        if k in init and "embed_tokens" not in k:
            changed += int((v.detach().float().cpu() != init[k]).sum())
            total += v.numel()
    return changed / max(total, 1)


def _training_section(a: dict[str, Any], reference: str, strategy: str) -> dict[str, Any]:
    t: dict[str, Any] = {"loss": "sigmoid", "beta": BETA, "batchSize": a["batch"], "maxSteps": a["steps"],
                         "learningRate": LR, "lrScheduler": "constant", "warmupRatio": 0.0, "loggingSteps": 1,
                         "seed": SEED, "referenceLogps": reference, "distributed": {"strategy": strategy},
                         "precision": "bf16-mixed"}
    return t


def worker_kubedpo(a: dict[str, Any]) -> dict[str, Any]:
    """The real CLI; a probe around train_step times steps, counts tokens and resets peak memory."""
    import torch

    from kubedpo_trainer import cli
    from kubedpo_trainer import train as ktrain

    root = Path(a["root"])
    cfg = {"model": {"uri": a["model"]},
           "data": {"train": a["train"], "format": "standard", "maxLength": a["max_length"],
                    "maxPromptLength": a["max_length"], "shuffleBuffer": 1, "seed": SEED},
           "training": _training_section(a, a["reference"], a["strategy"]),
           "output": {"uri": str(root / "out")}, "metrics": {"port": 0}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    mem, original, times, tokens = Memory(), ktrain.Trainer.train_step, [], []

    def probed(self: Any, batches: list[dict[str, Any]]) -> dict[str, float]:
        if self.step == 0:
            mem.reset()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = original(self, batches)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(sum(b["num_tokens"] for b in batches))
        return out

    ktrain.Trainer.train_step = probed  # type: ignore[method-assign]
    code = cli.run(["--config", str(root / "config.yaml")])
    if code:
        raise SystemExit(f"kubedpo-trainer exited {code}")
    res = {"step_seconds": times, "tokens": tokens, **mem.result()}
    if int(os.environ.get("RANK", "0")) == 0:
        from transformers import AutoModelForCausalLM

        final = AutoModelForCausalLM.from_pretrained(str(root / "out"), dtype=torch.float32)
        res["changed_fraction"] = _changed_fraction(final, a["model"])
    return res


def worker_trl(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    ds = load_dataset("json", data_files=sorted(str(p) for p in Path(a["train"]).glob("*.jsonl")), split="train")
    tok = AutoTokenizer.from_pretrained(a["model"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    mem, times = Memory(), []

    class Probe(TrainerCallback):
        def on_train_begin(self, *args: Any, **kw: Any) -> None:
            mem.reset()

        def on_step_begin(self, *args: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *args: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    cfg = DPOConfig(
        output_dir=str(Path(a["root"])), loss_type=["sigmoid"], beta=BETA, per_device_train_batch_size=a["batch"],
        gradient_accumulation_steps=1, max_steps=a["steps"], learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, max_length=a["max_length"], precompute_ref_log_probs=False, gradient_checkpointing=False,
        bf16=True, use_cpu=not cuda, train_sampling_strategy="sequential", seed=SEED, dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[Probe()])
    trainer.train()
    return {"step_seconds": times, **mem.result(),
            "changed_fraction": _changed_fraction(trainer.model, a["model"])}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_side(side: str, a: dict[str, Any], torchrun: bool = False) -> tuple[dict[str, Any], str]:
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(Path(a["root"]) / "hf-datasets")}
    cmd = [sys.executable, __file__, "--worker", side, json.dumps(a)]
    if torchrun:
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={free_port()}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} worker failed (exit {proc.returncode})")
    return json.loads(line.removeprefix("RESULT ")), proc.stderr


def summarise(res: dict[str, Any], tokens: list[int], warmup: int, n_params: int, peak: float | None,
              flops_per_token: int) -> dict[str, Any]:
    steps = res["step_seconds"][warmup:]
    tok_s = sum(tokens[warmup:len(res["step_seconds"])]) / sum(steps)
    return {"tokens_per_s": round(tok_s, 1), "step_s": round(sum(steps) / len(steps), 4),
            "peak_memory_gib": round(res["peak_bytes"] / 2**30, 3),
            "mfu": round(flops_per_token * n_params * tok_s / peak, 4) if peak else None,
            "changed_fraction": round(res.get("changed_fraction", float("nan")), 6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "ARGS"), help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="Tiny model, few steps, CPU is fine (the suite's check).")
    args = p.parse_args()
    if args.worker:
        side, raw = args.worker
        res = (worker_kubedpo if side == "kubedpo" else worker_trl)(json.loads(raw))
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(res), flush=True)
        return
    import torch

    t_start = time.perf_counter()
    # ~0.47B: 32 layers of hidden 1024 (FFN 2752, 16 heads, 8 KV heads), vocab 49152 untied; smoke: tiny.
    hidden, layers, vocab, steps, batch, length, warmup = (
        (64, 2, 512, 4, 4, 64, 1) if args.smoke else (1024, 32, 49152, 30, 8, 512, 5))
    root = Path(tempfile.mkdtemp(prefix="kubedpo-gpucheck-"))
    model = build_model(root / "model", hidden, layers, vocab, SEED)
    n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        str(model)).parameters())
    train = write_data(root / "data", max(1024, steps * batch), (3, 5) if args.smoke else (300, 400))
    a = {"model": str(model), "train": train, "batch": batch, "steps": steps, "max_length": length}
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if cuda else None

    live, _ = run_side("kubedpo", {**a, "root": str(root / "live"), "reference": "live", "strategy": "ddp"})
    pre, _ = run_side("kubedpo", {**a, "root": str(root / "pre"), "reference": "precompute", "strategy": "ddp"})
    fsdp, fsdp_log = run_side("kubedpo", {**a, "root": str(root / "fsdp"), "reference": "live", "strategy": "fsdp"},
                              torchrun=True)
    trl, _ = run_side("trl", {**a, "root": str(root / "trl")})
    tokens = live["tokens"]
    assert pre["tokens"] == tokens == fsdp["tokens"], "the runs must see the same batches"
    out = {
        "device": name, "params": n_params, "steps": steps, "timed_steps": steps - warmup,
        "batch_pairs": batch, "max_length": length, "peak_bf16_flops": peak, "smoke": args.smoke,
        "kubedpo_live": summarise(live, tokens, warmup, n_params, peak, 8),
        "kubedpo_precompute": summarise(pre, tokens, warmup, n_params, peak, 6),
        "kubedpo_fsdp": summarise(fsdp, tokens, warmup, n_params, peak, 8),
        "fsdp_granted": "distributed: FSDP2" in fsdp_log,
        "trl": summarise(trl, tokens, warmup, n_params, peak, 8),
    }
    out["ratio_tokens_per_s_live_vs_trl"] = round(out["kubedpo_live"]["tokens_per_s"] / out["trl"]["tokens_per_s"], 3)
    out["ratio_peak_memory_live_vs_trl"] = round(out["kubedpo_live"]["peak_memory_gib"]
                                                 / max(out["trl"]["peak_memory_gib"], 1e-9), 3)
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
