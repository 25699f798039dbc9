"""Task sft with the real trainer process on the tiny task: it learns the answer format, it is
exact over ranks, accumulation and FSDP, it resumes exactly after a kill, LoRA works.

Every run is a real `kubedpo-trainer` subprocess (CPU, gloo for 2 ranks) on the locally built
tiny Llama; the greedy answers come from the real task generate on the SFT'd model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedpo_trainer.tiny import CATEGORIES, WORD_CATEGORY
from tests.support.runs import run_trainer, tiny_config
from tests.trainer.test_fsdp import LAUNCHER, run_fsdp
from tests.trainer.test_resume import Launch

pytestmark = pytest.mark.slow


def sft_config(tiny: Any, out: Path, **training: Any) -> dict[str, Any]:
    cfg = tiny_config(tiny, out, training={"learningRate": 3e-3, "batchSize": 16, "maxSteps": 60,
                                           "loggingSteps": 10, **training})
    cfg["task"] = "sft"
    return cfg


def test_sft_lowers_held_out_nll_and_greedy_answers_name_a_category(tiny, tmp_path: Path) -> None:
    """60 steps of batch 16 (a few seconds): held-out NLL per answer token falls from about ln(V)
    (random weights, ~6) below 0.6, and greedy answers to held-out prompts name one of the four
    categories (measured: 64/64, 49 of them the right one, before DPO)."""
    result_file = tmp_path / "result.json"
    cfg = sft_config(tiny, tmp_path / "sft", evalOnStart=True)
    cfg["data"]["evalMaxRows"] = 64
    run = run_trainer(cfg, tmp_path / "sft", env={"KUBEDPO_RESULT_FILE": str(result_file)})
    assert run.returncode == 0, run.stderr[-3000:]
    s = run.summary()
    before, after = s["eval_at_start"]["eval_loss"], s["eval"]["eval_loss"]
    assert before > 4.0 and after < 0.6, (before, after)
    assert s["eval"]["eval_mean_token_accuracy"] > 0.7
    assert "eval_rewards_accuracies" not in s["eval"] and "rewards_accuracies" not in s["train"]
    assert all("rewards" not in k for k in run.train_logs()[-1])
    result = json.loads(result_file.read_text())
    assert result == {"step": 60, "loss": pytest.approx(s["train"]["loss"]), "evalLoss": pytest.approx(after),
                      "outputUri": str(tmp_path / "sft" / "output")}

    gen = {"task": "generate", "model": {"uri": str(tmp_path / "sft" / "output")},
           "data": {"train": tiny.train_uri, "eval": tiny.eval_uri, "evalMaxRows": 64},
           "output": {"uri": str(tmp_path / "gen")}, "metrics": {"port": 0},
           "generate": {"samplesPerPrompt": 1, "maxPrompts": 1, "heldOutSamples": 1, "temperature": 0,
                        "maxNewTokens": 4, "batchSize": 32}}
    g = run_trainer(gen, tmp_path / "genrun")
    assert g.returncode == 0, g.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "gen" / "heldout" / "part-00000.jsonl").read_text().splitlines()]
    answers = [r["responses"][0].strip() for r in rows]
    named = sum(a in CATEGORIES for a in answers)
    right = sum(a == WORD_CATEGORY[r["prompt"].split()[1]] for a, r in zip(answers, rows, strict=True))
    assert len(rows) == 64 and named >= 0.8 * 64, Counter(answers).most_common(8)
    assert right > 64 / 4  # above chance: the first word was read, not one favourite category


@pytest.mark.multiproc
def test_one_rank_two_ranks_accumulation_and_fsdp_train_the_same(tiny, tmp_path: Path) -> None:
    """The loss is the step's mean NLL per target token over all ranks and micro-batches: 1 rank x 8
    rows, 1 rank x 4 rows x 2 accumulation steps, 2 ranks x 4 (DDP) and 2 ranks x 4 under FSDP2 (the
    forced-FSDP shim of test_fsdp.py) see the same rows per step (answers of 2 or 3 tokens, so a
    mean of per-rank means would differ) and log the same loss at every step (1e-4: reduction order)."""
    common = {"data": {"shuffleBuffer": 1}, "training": {"maxSteps": 5, "loggingSteps": 1}}

    def cfg(name: str, **training: Any) -> dict[str, Any]:
        c = sft_config(tiny, tmp_path / name, **common["training"], **training)
        c["data"].update(common["data"])
        return c

    runs = {
        "one": run_trainer(cfg("one", batchSize=8), tmp_path / "one"),
        "accum": run_trainer(cfg("accum", batchSize=4, gradientAccumulationSteps=2), tmp_path / "accum"),
        "ddp": run_trainer(cfg("ddp", batchSize=4), tmp_path / "ddp", nproc=2, torchrun=True),
        "fsdp": run_fsdp(cfg("fsdp", batchSize=4, distributed={"strategy": "fsdp"}), tmp_path / "fsdp",
                         LAUNCHER, from_env=False),
    }
    for name, run in runs.items():
        assert run.returncode == 0, (name, run.stderr[-3000:])
    assert "distributed: FSDP2 over 2 processes" in runs["fsdp"].stderr
    losses = {n: [r["loss"] for r in run.train_logs()] for n, run in runs.items()}
    assert len(losses["one"]) == 5 and losses["one"][-1] < losses["one"][0]
    for name in ("accum", "ddp", "fsdp"):
        assert losses[name] == pytest.approx(losses["one"], abs=1e-4), name
    assert runs["fsdp"].summary()["eval"]["eval_loss"] == pytest.approx(runs["one"].summary()["eval"]["eval_loss"],
                                                                        abs=1e-4)


def test_sigkill_then_resume_continues_exactly(tiny, tmp_path: Path) -> None:
    """A pod (the launcher and its rank), a checkpoint every 4 steps: SIGKILL after step 9,
    restart: the run resumes from step 8 and every step after it logs the loss of the
    uninterrupted run (1e-5), every row of the steps trained once in the final history.
    (2-rank resume of the shared machinery: test_resume.py; SFT over 2 ranks: above.)"""
    def cfg(name: str) -> dict[str, Any]:
        c = sft_config(tiny, tmp_path / name, batchSize=8, maxSteps=16, loggingSteps=1)
        c["checkpoint"] = {"uri": str(tmp_path / name / "ckpt"), "everySteps": 4, "keepLast": 2}
        c["data"].pop("eval")
        return c

    base = Launch(cfg("base"), tmp_path / "base", {}, world=1)
    assert base.wait() == 0, base.stderr()
    first = Launch(cfg("killed"), tmp_path / "first", {}, world=1)
    first.wait_for_step(9)
    first.kill()
    second = Launch(yaml.safe_load((tmp_path / "first" / "config.yaml").read_text()), tmp_path / "second", {},
                    world=1)
    assert second.wait() == 0, second.stderr()
    assert "resumed from" in second.full_log()
    resumed = second.losses()
    start = min(resumed) - 1
    assert start >= 8 and start % 4 == 0
    assert resumed == pytest.approx({s: v for s, v in base.losses().items() if s > start}, abs=1e-5)
    history = {s: r for s, r in first.rows_by_step().items() if s <= start} | second.rows_by_step()
    assert history == base.rows_by_step()


def test_lora_sft_trains_and_exports_the_adapter(tiny, tmp_path: Path) -> None:
    run = run_trainer(sft_config(tiny, tmp_path, maxSteps=8, learningRate=1e-2,
                                 loggingSteps=4) | {"model": {"uri": str(tiny.model_dir),
                                                              "lora": {"rank": 8, "alpha": 16}}}, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [r["loss"] for r in run.train_logs()]
    assert losses[-1] < losses[0]
    assert (tmp_path / "output" / "adapter_model.safetensors").exists()
    assert run.summary()["memory"]["reference_full_bytes"] == 0  # no reference model loaded
