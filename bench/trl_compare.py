"""kubedpo vs TRL's DPOTrainer: same model, data and settings, one run, ratios reported.

    .venv/bin/python bench/trl_compare.py                       # CPU, small Llama
    .venv/bin/python bench/trl_compare.py --hidden 1024 --layers 8 --steps 40   # on a GPU

Each side runs in its own subprocess (fresh allocator, fair peak memory) on the same locally
built Llama-style model and the same preference rows, with full fine-tuning, the sigmoid loss,
the same batch size, max length, learning rate and step count. Measured: mean step time after
warm-up steps, peak memory (CUDA max allocated on GPU, max RSS on CPU), final train loss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

from kubedpo_trainer.tiny import build_model, build_tokenizer, write_preference_task

TRL_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time, glob
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    a = json.loads(sys.argv[1])
    files = sorted(glob.glob(a["train"] + "/*.jsonl"))
    ds = load_dataset("json", data_files=files, split="train")
    tok = AutoTokenizer.from_pretrained(a["model"])
    model = AutoModelForCausalLM.from_pretrained(a["model"])
    ref = AutoModelForCausalLM.from_pretrained(a["model"])
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    cfg = DPOConfig(output_dir=a["out"], per_device_train_batch_size=a["batch"], max_steps=a["steps"],
                    learning_rate=a["lr"], lr_scheduler_type="constant", max_length=a["max_length"],
                    beta=0.1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                    bf16=a["bf16"], seed=0, dataloader_num_workers=0, gradient_checkpointing=False)
    tr = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok,
                    callbacks=[Timer()])
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \\
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    w = a["warmup"]
    print("RESULT " + json.dumps({"step_s": sum(times[w:]) / len(times[w:]), "peak_bytes": peak,
                                  "final_loss": losses[-1]}))
    """
)


def run_kubedpo(a: dict, root: Path) -> dict:
    cfg = {
        "model": {"uri": a["model"], "dtype": "bfloat16" if a["bf16"] else "float32"},
        "data": {"train": a["train"], "maxLength": a["max_length"], "maxPromptLength": a["max_length"],
                 "shuffleBuffer": 1},
        "training": {"batchSize": a["batch"], "maxSteps": a["steps"], "learningRate": a["lr"],
                     "lrScheduler": "constant", "warmupRatio": 0.0, "loggingSteps": 1, "beta": 0.1},
        "output": {"uri": str(root / "kubedpo-out")},
        "metrics": {"port": 0},
    }
    path = root / "kubedpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "kubedpo_trainer.cli", "--config", str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = json.loads((root / "kubedpo-out" / "kubedpo_summary.json").read_text())
    t = s["timing"]
    w = a["warmup"]
    return {"step_s": sum(t["step_seconds"][w:]) / len(t["step_seconds"][w:]),
            "peak_bytes": t["peak_memory_bytes"], "final_loss": s["train"]["loss"]}


def run_trl(a: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(a)], check=True, capture_output=True,
                         text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kubedpo-bench-"))
    tok = build_tokenizer(root / "model")
    build_model(root / "model", tok, hidden_size=args.hidden, num_layers=args.layers)
    train, _ = write_preference_task(root / "data", 1024, 16, seed=0, fmt="standard")
    a = {"model": str(root / "model"), "train": train, "out": str(root / "trl-out"), "batch": args.batch,
         "steps": args.steps, "lr": 1e-4, "max_length": args.max_length, "bf16": args.bf16,
         "warmup": args.warmup}
    ours, trl = run_kubedpo(a, root), run_trl(a)
    print("| model | batch | steps | metric | kubedpo | TRL DPOTrainer | kubedpo / TRL |")
    print("|---|---|---|---|---|---|---|")
    label = f"Llama h{args.hidden} L{args.layers}"
    for key, name in (("step_s", "mean step time (s)"), ("peak_bytes", "peak memory (MB)"),
                      ("final_loss", "final train loss")):
        scale = 1 / 2**20 if key == "peak_bytes" else 1
        o, t = ours[key] * scale, trl[key] * scale
        print(f"| {label} | {args.batch} | {args.steps} | {name} | {o:.4g} | {t:.4g} | {o / t:.3f} |")


if __name__ == "__main__":
    main()
