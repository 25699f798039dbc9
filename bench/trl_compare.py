"""kubedpo vs TRL's DPOTrainer, end to end: same model, data, batch and math; one JSON line per setting.

    .venv/bin/python bench/trl_compare.py                            # CPU, vocab 512 and 32000
    .venv/bin/python bench/trl_compare.py --vocab 512 --reps 3 --variants spread
    .venv/bin/python bench/trl_compare.py --bf16 --hidden 2048 --layers 16 --batch 8   # on a GPU

Each side runs in its own subprocess (fresh allocator, its own peak memory), on the same locally
built Llama and the same preference rows in the same order (one shard, no shuffling on either
side), one epoch of exactly `steps x batch` rows, so both train (and, with a precomputed
reference, precompute) exactly the same pairs. Both sides run alternately in one invocation,
`--reps` times each; min and median are reported.

Settings on both sides: full fine-tune, sigmoid loss, beta 0.1, AdamW lr 1e-4 constant without
warm-up (fused on both: TRL `adamw_torch_fused`, kubedpo's default), weight decay 0, grad-norm
clip 1.0, no gradient checkpointing, fp32 on CPU (`--bf16`: bf16 on both). Two TRL settings:
- `equal`: live reference on both sides (TRL `precompute_ref_log_probs=False`);
- `best`: both precompute the reference log-probs (TRL `precompute_ref_log_probs=True`, kubedpo
  `referenceLogps: precompute`), the precompute pass counted in the end-to-end time.
kubedpo runs with `training.packing` (padding-free rows, the prompt shared by chosen and
rejected, `--max-tokens` per micro-batch) unless `--kubedpo-padded`. TRL 1.16's own defaults
(`bf16=True`, gradient checkpointing on) are far slower on CPU and are not a headline here.

End to end = from the moment both models are loaded to the end of the last optimizer step:
TRL's dataset tokenization and precompute (in `DPOTrainer.__init__`) and kubedpo's streaming,
tokenization and precompute are inside it; Python imports and model loading are not. Peak
memory = the process's peak RSS over that span (Linux `clear_refs` resets the high-water mark
when it starts; GPU: CUDA max allocated). samples/s = pairs trained / end-to-end seconds;
tokens/s counts prompt+chosen and prompt+rejected tokens of those pairs (the same rows on both
sides, so the two ratios differ only by rounding). On a shared CPU box wall time swings with
other work, so CPU seconds of each process over the same span are reported too
(`samples_per_cpu_s_ratio`: with one thread per side, the work each side did). Losses are read unrounded on both sides
(kubedpo: the value `train_step` returns; TRL: `compute_loss`), and the largest per-step
difference is printed: the proof that the two compute the same thing.

Variants: `spread` (prompts 8-120 words, responses 1-60), `longprompt` (prompts 150-400 words,
responses 1-30: prompts long relative to responses, like HH or UltraFeedback), `short` (the tiny
task: ~18-token prompts, 2-token answers). Each word is one token. Nothing reaches the hub.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from bench_models import build_model

LR, BETA, MAX_GRAD_NORM, SEED = 1e-4, 0.1, 1.0, 0
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- inputs: one model, three data variants ---------------------------------------------------


VARIANTS = {"short": ((3, 5), None), "spread": ((8, 120), (1, 60)), "longprompt": ((150, 400), (1, 30))}
MAX_LENGTH = {"short": 64, "spread": 256, "longprompt": 512}


def preference_rows(n: int, variant: str, seed: int) -> list[dict[str, str]]:
    """The tiny task's rows (category of the first word); responses padded out with words when the
    variant asks for longer answers. Prompt and response lengths are drawn per row."""
    from kubedpo_trainer.tiny import CATEGORIES, WORD_CATEGORY, make_row

    (plo, phi), resp = VARIANTS[variant]
    rng, vocab = random.Random(seed), list(WORD_CATEGORY)
    rows = []
    for _ in range(n):
        words = tuple(rng.choice(vocab) for _ in range(rng.randint(plo, phi)))
        wrong = rng.choice([c for c in CATEGORIES if c != WORD_CATEGORY[words[0]]])
        row = make_row(words, wrong, "standard")
        if resp is not None:
            for key in ("chosen", "rejected"):
                extra = " ".join(rng.choice(vocab) for _ in range(rng.randint(*resp) - 1))
                row[key] = f"{row[key]} {extra}".rstrip()
        rows.append(row)
    return rows


def write_data(folder: Path, variant: str, n: int) -> str:
    """One JSONL shard, so both trainers read it in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = preference_rows(n, variant, SEED)
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

    def result(self) -> dict[str, int]:
        import torch

        peak = torch.cuda.max_memory_allocated() if self.cuda else _proc_status_kb("VmHWM") * 1024
        return {"peak_bytes": peak, "train_extra_bytes": peak - self.base}


# --- the two workers -----------------------------------------------------------------------


def worker_kubedpo(a: dict[str, Any]) -> dict[str, Any]:
    """The real CLI entry point; the clock and memory probe start when the models are loaded."""
    from kubedpo_trainer import cli
    from kubedpo_trainer import train as ktrain

    root = Path(a["root"])
    training: dict[str, Any] = {
        "loss": "sigmoid", "beta": BETA, "batchSize": a["batch"], "maxSteps": a["steps"], "learningRate": LR,
        "lrScheduler": "constant", "warmupRatio": 0.0, "weightDecay": 0.0, "maxGradNorm": MAX_GRAD_NORM,
        "loggingSteps": 1, "seed": SEED, "precision": "bf16" if a["bf16"] else "fp32",
        "gradientCheckpointing": False, "referenceLogps": "precompute" if a["precompute"] else "live"}
    if a["max_tokens"]:
        training["packing"] = {"maxTokens": a["max_tokens"], "sharePrompt": True}
    cfg = {
        "model": {"uri": a["model"], "dtype": "bfloat16" if a["bf16"] else "float32"},
        "data": {"train": a["train"], "format": "standard", "maxLength": a["max_length"],
                 "maxPromptLength": a["max_length"], "shuffleBuffer": 1, "seed": SEED},
        "training": training, "output": {"uri": str(root / "out")}, "metrics": {"port": 0},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    mem, clock, losses = Memory(), {}, []
    load, step = ktrain.load_models, ktrain.Trainer.train_step

    def loaded(*args: Any, **kw: Any) -> Any:
        models = load(*args, **kw)
        mem.reset()
        clock["start"], clock["cpu_start"] = time.perf_counter(), time.process_time()
        return models

    def probed(self: Any, batches: list[dict[str, Any]]) -> dict[str, float]:
        values = step(self, batches)
        if mem.cuda:
            import torch

            torch.cuda.synchronize()
        clock["end"], clock["cpu_end"], clock["tokens"] = time.perf_counter(), time.process_time(), self.tokens_total
        losses.append(values["loss"])
        if len(losses) == a["steps"]:
            clock["memory"] = mem.result()
        return values

    ktrain.load_models, ktrain.Trainer.train_step = loaded, probed  # type: ignore[method-assign]
    code = cli.run(["--config", str(root / "config.yaml")])
    if code:
        raise SystemExit(f"kubedpo-trainer exited {code}")
    s = json.loads((root / "out" / "kubedpo_summary.json").read_text())
    truncated = s["data"]["truncated_prompts"] + s["data"]["truncated_responses"]
    return {"seconds": clock["end"] - clock["start"], "cpu_seconds": clock["cpu_end"] - clock["cpu_start"],
            "losses": losses, "truncated": truncated,
            "tokens": clock["tokens"], **clock["memory"]}


def worker_trl(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if a["bf16"] else torch.float32
    ds = load_dataset("json", data_files=sorted(str(p) for p in Path(a["train"]).glob("*.jsonl")), split="train")
    tok = AutoTokenizer.from_pretrained(a["model"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dtype)
    losses: list[float] = []

    class Recording(DPOTrainer):
        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kw: Any) -> Any:
            out = super().compute_loss(model, inputs, *args, **kw)
            if model.training:
                losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    cfg = DPOConfig(
        output_dir=str(Path(a["root"]) / "trl"), loss_type=["sigmoid"], beta=BETA,
        per_device_train_batch_size=a["batch"], gradient_accumulation_steps=1, max_steps=a["steps"],
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, optim=a["trl_optim"], max_length=a["max_length"],
        precompute_ref_log_probs=a["precompute"], gradient_checkpointing=False, bf16=a["bf16"], fp16=False,
        use_cpu=not cuda, train_sampling_strategy="sequential", seed=SEED, dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    mem = Memory()
    mem.reset()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer = Recording(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    memory = mem.result()
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
               for r in trainer.train_dataset]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "losses": losses, "truncated": sum(n > a["max_length"] for n in lengths),
            "prompt_tokens": sum(len(r["prompt_ids"]) for r in trainer.train_dataset) / len(lengths), **memory}


# --- the parent: run both sides alternately, compare ------------------------------------------


def run_side(side: str, a: dict[str, Any], tag: str) -> dict[str, Any]:
    a = {**a, "root": str(Path(a["root"]) / tag)}  # fresh folders: no cache from an earlier repetition
    threads = {"OMP_NUM_THREADS": str(a["threads"])} if a["threads"] else {}
    env = {**os.environ, **OFFLINE, **threads, "HF_DATASETS_CACHE": str(Path(a["root"]) / "hf-datasets"),
           "KUBEDPO_CACHE_DIR": str(Path(a["root"]) / "kubedpo-cache")}
    proc = subprocess.run([sys.executable, __file__, "--worker", side, json.dumps(a)], capture_output=True,
                          text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} worker failed (exit {proc.returncode})")
    res = json.loads(line.removeprefix("RESULT "))
    if res["truncated"]:
        raise SystemExit(f"{tag}: {side} truncated {res['truncated']} sequences; raise MAX_LENGTH")
    if len(res["losses"]) != a["steps"]:
        raise SystemExit(f"{tag}: {side} recorded {len(res['losses'])} losses, expected {a['steps']}")
    return res


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values)}


def compare(variant: str, mode: str, args: argparse.Namespace, root: Path, model: Path) -> dict[str, Any]:
    steps = args.steps[variant]
    train = write_data(root / f"data-{variant}", variant, steps * args.batch)
    a = {"root": str(root / f"{variant}-{mode}"), "model": str(model), "train": train, "batch": args.batch,
         "steps": steps, "max_length": MAX_LENGTH[variant], "bf16": args.bf16, "trl_optim": args.trl_optim,
         "precompute": mode == "best", "max_tokens": 0 if args.kubedpo_padded else args.max_tokens,
         "threads": args.threads}
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for rep in range(args.reps):  # alternate, so load from other work hits both sides alike
        ours.append(run_side("kubedpo", a, f"kubedpo-{rep}"))
        theirs.append(run_side("trl", a, f"trl-{rep}"))
    pairs = steps * args.batch
    tokens = ours[0]["tokens"]
    k_sec, t_sec = [r["seconds"] for r in ours], [r["seconds"] for r in theirs]
    k_cpu, t_cpu = [r["cpu_seconds"] for r in ours], [r["cpu_seconds"] for r in theirs]
    k_mem, t_mem = [r["peak_bytes"] for r in ours], [r["peak_bytes"] for r in theirs]
    diff = max(abs(x - y) for r, q in zip(ours, theirs, strict=True)
               for x, y in zip(r["losses"], q["losses"], strict=True))
    med = statistics.median
    return {
        "vocab": args.vocab, "data": variant, "trl": mode, "steps": steps, "batch": args.batch, "reps": args.reps,
        "prompt_tokens_mean": round(theirs[0]["prompt_tokens"], 1), "tokens_per_step": tokens / steps,
        "kubedpo": "padded" if args.kubedpo_padded else f"packing maxTokens {args.max_tokens}, sharePrompt",
        "samples_per_s_ratio": round(med(t_sec) / med(k_sec), 3),
        "samples_per_s_ratio_best": round(min(t_sec) / min(k_sec), 3),
        "tokens_per_s_ratio": round((tokens / med(k_sec)) / (tokens / med(t_sec)), 3),
        "samples_per_cpu_s_ratio": round(med(t_cpu) / med(k_cpu), 3),
        "samples_per_cpu_s_ratio_best": round(min(t_cpu) / min(k_cpu), 3),
        "peak_memory_ratio": round(med(k_mem) / med(t_mem), 3),
        "train_extra_memory_ratio": round(med([r["train_extra_bytes"] for r in ours])
                                          / med([r["train_extra_bytes"] for r in theirs]), 3),
        "kubedpo_samples_per_s": {k: round(pairs / v, 2) for k, v in _stats(k_sec).items()},
        "trl_samples_per_s": {k: round(pairs / v, 2) for k, v in _stats(t_sec).items()},
        "kubedpo_seconds": _stats(k_sec), "trl_seconds": _stats(t_sec),
        "kubedpo_cpu_seconds": _stats(k_cpu), "trl_cpu_seconds": _stats(t_cpu),
        "kubedpo_peak_mib": round(med(k_mem) / 2**20, 1), "trl_peak_mib": round(med(t_mem) / 2**20, 1),
        "max_loss_diff": diff, "final_loss": ours[0]["losses"][-1],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "ARGS"), help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["spread", "longprompt"])
    p.add_argument("--trl-modes", nargs="+", choices=["equal", "best"], default=["equal", "best"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, nargs="+", default=[512, 32000], help="LM head sizes (>= 512).")
    p.add_argument("--steps", type=int, default=8, help="Optimizer steps (= one epoch) per run.")
    p.add_argument("--reps", type=int, default=2, help="Runs of each side, alternating.")
    p.add_argument("--batch", type=int, default=8, help="Preference pairs per step.")
    p.add_argument("--max-tokens", type=int, default=8192, help="kubedpo packing.maxTokens.")
    p.add_argument("--kubedpo-padded", action="store_true", help="kubedpo without packing.")
    p.add_argument("--trl-optim", default="adamw_torch_fused", help="TRL's optim (kubedpo uses fused AdamW).")
    p.add_argument("--bf16", action="store_true", help="bf16 weights + autocast on both sides (GPU).")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of both sides (0: torch's default). On a shared box one thread "
                   "per side avoids OpenMP barriers stalling on a descheduled sibling thread.")
    args = p.parse_args()
    if args.worker:
        side, raw = args.worker
        res = (worker_kubedpo if side == "kubedpo" else worker_trl)(json.loads(raw))
        print("RESULT " + json.dumps(res), flush=True)
        return
    args.steps = {v: args.steps for v in VARIANTS}
    root = Path(tempfile.mkdtemp(prefix="kubedpo-bench-trl-"))
    device = "GPU bf16" if args.bf16 else "CPU fp32"
    print(f"# Llama hidden {args.hidden}, {args.layers} layers; batch {args.batch} pairs; {device}; "
          f"TRL optim {args.trl_optim}; {args.reps} alternating runs per side; threads {args.threads or 'default'}",
          flush=True)
    for vocab in args.vocab:
        args_v = argparse.Namespace(**{**vars(args), "vocab": vocab})
        model = build_model(root / f"model-{vocab}", args.hidden, args.layers, vocab, SEED)
        for variant in args.variants:
            for mode in args.trl_modes:
                print(json.dumps(compare(variant, mode, args_v, root, model)), flush=True)


if __name__ == "__main__":
    main()
