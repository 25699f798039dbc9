"""kubedpo vs TRL's DPOTrainer: same model, data and settings, one run, ratios reported.

    .venv/bin/python bench/trl_compare.py                     # CPU: short and long-prompt data
    .venv/bin/python bench/trl_compare.py --variants long --long-steps 20
    .venv/bin/python bench/trl_compare.py --bf16 --hidden 2048 --layers 16 --batch 8   # on a GPU

Each side runs in its own subprocess (fresh allocator, its own peak memory) on the same locally
built Llama and the same preference rows, read in the same order (one shard, no shuffling on
either side), so the per-step losses must agree: the largest per-step loss difference is
printed as the proof that the settings are equal. Settings: full fine-tune, sigmoid loss,
beta 0.1, AdamW (torch, not fused) lr 1e-4 constant without warm-up, weight decay 0, grad-norm
clip 1.0, no gradient checkpointing, live reference (no precompute), fp32 on CPU (`--bf16`:
bf16 weights and bf16 autocast on both sides).

Variants: `short` is the tiny task (15-token prompts, 2-token answers); `long` has ~200-token
prompts and the same short answers, where computing logits only from the first response token
(kubedpo's `logits_to_keep`) should pay off. The model has a 32k vocabulary by default (like
Llama 2), larger than the tokenizer needs, so the LM head costs what it costs in real models.

Measured: mean step time after warm-up (optimizer step included, data loading excluded), peak
memory (CPU: the process's peak RSS, and the peak over the RSS at the first step, i.e. what
training adds to the loaded models; GPU: CUDA max allocated), final train loss, process wall.
Nothing reaches the Hugging Face hub: model paths are local and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

LR, BETA, MAX_GRAD_NORM, SEED = 1e-4, 0.1, 1.0, 0
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- inputs: one model, two data variants ---------------------------------------------------


def build_model(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A seeded Llama (GQA, untied head) with the tiny task's tokenizer, saved to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubedpo_trainer.tiny import build_tokenizer

    tok = build_tokenizer(out)
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 63) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


def preference_rows(n: int, words_per_prompt: tuple[int, int], seed: int) -> list[dict[str, str]]:
    """The tiny task's rows (category of the first word) with prompts of a chosen length."""
    from kubedpo_trainer.tiny import CATEGORIES, WORD_CATEGORY, make_row

    rng, vocab = random.Random(seed), list(WORD_CATEGORY)
    rows = []
    for _ in range(n):
        words = tuple(rng.choice(vocab) for _ in range(rng.randint(*words_per_prompt)))
        wrong = rng.choice([c for c in CATEGORIES if c != WORD_CATEGORY[words[0]]])
        rows.append(make_row(words, wrong, "standard"))
    return rows


VARIANTS = {"short": (3, 5), "long": (185, 195)}  # prompt words; each word is one token


def write_data(folder: Path, variant: str, n: int) -> str:
    """One JSONL shard, so both trainers can read it in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = preference_rows(n, VARIANTS[variant], SEED)
    (folder / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


# --- memory probes (run inside the workers) ---------------------------------------------------


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Memory:
    """Peak memory of the training steps: reset at the first step, read at the end.

    CPU: Linux resets the peak RSS (VmHWM) on `clear_refs 5`; GPU: torch's peak counters.
    """

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.base = 0

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _proc_status_kb("VmRSS") * 1024

    def result(self, process_peak: int) -> dict[str, int]:
        import torch

        peak = torch.cuda.max_memory_allocated() if self.cuda else _proc_status_kb("VmHWM") * 1024
        return {"peak_bytes": peak if self.cuda else process_peak, "train_extra_bytes": peak - self.base}


def _process_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- the two workers -----------------------------------------------------------------------


def worker_kubedpo(a: dict[str, Any]) -> dict[str, Any]:
    """The real CLI entry point, with a probe around the first `train_step` for memory."""
    from kubedpo_trainer import cli
    from kubedpo_trainer import train as ktrain

    root = Path(a["root"]) / "kubedpo"
    cfg = {
        "model": {"uri": a["model"], "dtype": "bfloat16" if a["bf16"] else "float32"},
        "data": {"train": a["train"], "format": "standard", "maxLength": a["max_length"],
                 "maxPromptLength": a["max_length"], "shuffleBuffer": 1, "seed": SEED},
        "training": {"loss": "sigmoid", "beta": BETA, "batchSize": a["batch"], "maxSteps": a["steps"],
                     "learningRate": LR, "lrScheduler": "constant", "warmupRatio": 0.0, "weightDecay": 0.0,
                     "maxGradNorm": MAX_GRAD_NORM, "loggingSteps": 1, "seed": SEED,
                     "precision": "bf16" if a["bf16"] else "fp32", "gradientCheckpointing": False,
                     "referenceLogps": "live"},
        "output": {"uri": str(root / "out")},
        "metrics": {"port": 0},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    mem, original = Memory(), ktrain.Trainer.train_step

    def probed(self: Any, batches: list[dict[str, Any]]) -> dict[str, float]:
        if self.step == 0:
            mem.reset()
        return original(self, batches)

    ktrain.Trainer.train_step = probed  # type: ignore[method-assign]
    code = cli.run(["--config", str(root / "config.yaml")])
    if code:
        raise SystemExit(f"kubedpo-trainer exited {code}")
    s = json.loads((root / "out" / "kubedpo_summary.json").read_text())
    truncated = s["data"]["truncated_prompts"] + s["data"]["truncated_responses"]
    return {"step_seconds": s["timing"]["step_seconds"], "losses": [], "truncated": truncated,
            **mem.result(_process_peak())}


def worker_trl(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if a["bf16"] else torch.float32
    ds = load_dataset("json", data_files=sorted(str(p) for p in Path(a["train"]).glob("*.jsonl")), split="train")
    tok = AutoTokenizer.from_pretrained(a["model"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dtype)
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
        output_dir=str(Path(a["root"]) / "trl"), loss_type=["sigmoid"], beta=BETA,
        per_device_train_batch_size=a["batch"], gradient_accumulation_steps=1, max_steps=a["steps"],
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, optim=a["trl_optim"], max_length=a["max_length"],
        precompute_ref_log_probs=False, gradient_checkpointing=False, bf16=a["bf16"], fp16=False,
        use_cpu=not cuda, train_sampling_strategy="sequential", seed=SEED, dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[Probe()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
               for r in trainer.train_dataset]
    return {"step_seconds": times, "losses": losses, "truncated": sum(n > a["max_length"] for n in lengths),
            "prompt_tokens": sum(len(r["prompt_ids"]) for r in trainer.train_dataset) / len(lengths),
            **mem.result(_process_peak())}


# --- the parent: run both, compare ---------------------------------------------------------


def _train_losses(stderr: str) -> list[float]:
    out = []
    for line in stderr.splitlines():
        i = line.find('{"event": "train"')
        if i >= 0:
            out.append(json.loads(line[i:])["loss"])
    return out


def run_side(side: str, a: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(Path(a["root"]) / "hf-datasets")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", side, json.dumps(a)], capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} worker failed (exit {proc.returncode})")
    res = json.loads(line.removeprefix("RESULT "))
    if side == "kubedpo":
        res["losses"] = _train_losses(proc.stderr)
    w = a["warmup"]
    steps = res["step_seconds"][w:]
    res.update(step_s=sum(steps) / len(steps), wall_s=wall, final_loss=res["losses"][-1])
    return res


ROWS = (("step_s", "mean step time (s)", 1.0), ("peak_bytes", "peak memory, process (MiB)", 2**-20),
        ("train_extra_bytes", "peak memory added by training (MiB)", 2**-20),
        ("final_loss", "final train loss", 1.0), ("wall_s", "process wall time (s)", 1.0))


def compare(variant: str, args: argparse.Namespace, root: Path, model: Path) -> list[str]:
    steps = args.long_steps if variant == "long" else args.steps
    train = write_data(root / f"data-{variant}", variant, max(1024, steps * args.batch))
    a = {"root": str(root / variant), "model": str(model), "train": train, "batch": args.batch,
         "steps": steps, "max_length": args.max_length[variant], "bf16": args.bf16, "warmup": args.warmup,
         "trl_optim": args.trl_optim}
    ours, trl = run_side("kubedpo", a), run_side("trl", a)
    for name, res in (("kubedpo", ours), ("TRL", trl)):
        if res["truncated"]:
            raise SystemExit(f"{variant}: {name} truncated {res['truncated']} sequences; raise --max-length")
        if len(res["losses"]) != steps:
            raise SystemExit(f"{variant}: {name} logged {len(res['losses'])} losses, expected {steps}")
    diff = max(abs(x - y) for x, y in zip(ours["losses"], trl["losses"], strict=True))
    label = f"{variant} (prompt ~{trl['prompt_tokens']:.0f} tok)"
    lines = []
    for key, name, scale in ROWS:
        o, t = ours[key] * scale, trl[key] * scale
        lines.append(f"| {label} | {name} | {o:.4g} | {t:.4g} | {o / t:.3f} |")
    lines.append(f"| {label} | max per-step loss difference, {steps} steps | {diff:.2g} | | |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "ARGS"), help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["short", "long"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000, help="LM head size (>= the tokenizer's 512).")
    p.add_argument("--steps", type=int, default=40, help="Steps on the short data.")
    p.add_argument("--long-steps", type=int, default=12,
                   help="Steps on the long-prompt data (TRL takes ~6.5 s a step there on 2 CPU cores).")
    p.add_argument("--warmup", type=int, default=3, help="Steps left out of the mean step time.")
    p.add_argument("--batch", type=int, default=8, help="Preference pairs per step.")
    p.add_argument("--trl-optim", default="adamw_torch",
                   help="TRL's optim; adamw_torch is kubedpo's torch.optim.AdamW (TRL's default: adamw_torch_fused).")
    p.add_argument("--bf16", action="store_true", help="bf16 weights + autocast on both sides (GPU).")
    args = p.parse_args()
    if args.worker:
        side, raw = args.worker
        res = (worker_kubedpo if side == "kubedpo" else worker_trl)(json.loads(raw))
        print("RESULT " + json.dumps(res), flush=True)
        return
    args.max_length = {"short": 64, "long": 256}
    root = Path(tempfile.mkdtemp(prefix="kubedpo-bench-trl-"))
    model = build_model(root / "model", args.hidden, args.layers, args.vocab)
    device = "GPU bf16" if args.bf16 else "CPU fp32"
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch} pairs, "
          f"{args.steps} steps short / {args.long_steps} long ({args.warmup} warm-up); {device}; "
          f"TRL optim {args.trl_optim}\n")
    print("| data | metric | kubedpo | TRL DPOTrainer | kubedpo / TRL |")
    print("|---|---|---|---|---|")
    for variant in args.variants:
        for line in compare(variant, args, root, model):
            print(line, flush=True)


if __name__ == "__main__":
    main()
