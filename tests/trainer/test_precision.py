"""training.precision: fp32 master weights under bf16 autocast by default on GPU, pure bf16 only
when asked (and it warns), and policy and reference computed under the same autocast.

bf16 autocast runs on CPU, so everything here runs for real on the tiny model; what CPU cannot
show is GPU speed (bench/). The subprocess runs are real `kubedpo-trainer` processes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kubedpo_trainer.config import parse_config
from kubedpo_trainer.errors import ConfigError
from kubedpo_trainer.models import load_models
from kubedpo_trainer.precision import PURE_BF16_WARNING, plan_precision
from tests.support.runs import Run, run_trainer, tiny_config


def _cfg(tiny, tmp_path: Path, lora: bool = False, **training):
    model: dict = {"uri": str(tiny.model_dir)}
    if lora:
        model["lora"] = {"rank": 4, "alpha": 8}
    return parse_config({"model": model, "data": {"train": tiny.train_uri}, "training": training,
                         "output": {"uri": str(tmp_path / "out")}})


# --- the plan ---------------------------------------------------------------------------------

def test_auto_is_bf16_mixed_on_bf16_gpus_and_fp32_elsewhere(monkeypatch) -> None:
    assert plan_precision("auto", "auto", "cpu").name == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    plan = plan_precision("auto", "auto", "cuda")
    assert (plan.name, plan.trainable_dtype, plan.autocast_dtype) == ("bf16-mixed", torch.float32, torch.bfloat16)
    assert plan.accelerate_mixed_precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # V100, T4
    assert plan_precision("auto", "auto", "cuda").name == "fp32"


def test_model_dtype_sets_only_the_frozen_weights() -> None:
    plan = plan_precision("bf16-mixed", "bfloat16", "cpu")
    assert plan.trainable_dtype == torch.float32  # never what model.dtype says: it trains
    assert plan.reference_dtype == plan.base_dtype == torch.bfloat16
    auto = plan_precision("bf16-mixed", "auto", "cpu")
    # The reference is stored like the policy's master weights: both compute the same function at step 0.
    assert (auto.reference_dtype, auto.base_dtype) == (torch.float32, torch.bfloat16)


def test_the_old_mixed_precision_field_names_its_replacement(tiny, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"training.*mixedPrecision: replaced by training.precision"):
        _cfg(tiny, tmp_path, mixedPrecision="bf16")


def test_pure_bf16_warns_what_it_costs(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kubedpo_trainer.precision"):
        plan = plan_precision("bf16", "auto", "cpu")
    assert plan.trainable_dtype == torch.bfloat16 and plan.autocast_dtype is None
    assert PURE_BF16_WARNING in caplog.text and "lost" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kubedpo_trainer.precision"):
        plan_precision("bf16-mixed", "auto", "cpu")
    assert caplog.text == ""


# --- what the loaders do with it ---------------------------------------------------------------

def test_full_fine_tune_under_bf16_mixed_trains_fp32_weights(tiny, tmp_path) -> None:
    m = load_models(_cfg(tiny, tmp_path, precision="bf16-mixed"))
    assert {p.dtype for p in m.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in m.reference.parameters()} == {torch.float32}


def test_lora_adapter_fp32_on_a_bf16_base(tiny, tmp_path) -> None:
    """peft's get_peft_model(autocast_adapter_dtype=True) upcasts bf16/fp16 adapters to fp32; we
    pass it explicitly, and False under pure bf16 so the adapter stays bf16 there."""
    m = load_models(_cfg(tiny, tmp_path, lora=True, precision="bf16-mixed"))
    dtypes = {("lora_" in n, p.requires_grad, p.dtype) for n, p in m.policy.named_parameters()}
    assert dtypes == {(True, True, torch.float32), (False, False, torch.bfloat16)}
    pure = load_models(_cfg(tiny, tmp_path, lora=True, precision="bf16"))
    assert {p.dtype for p in pure.policy.parameters()} == {torch.bfloat16}


def test_lora_bf16_mixed_step_moves_the_fp32_adapter(tiny, tmp_path) -> None:
    """Under autocast the fp32 lora_B gets an fp32 gradient, and a 5e-7 AdamW step changes it."""
    m = load_models(_cfg(tiny, tmp_path, lora=True, precision="bf16-mixed"))
    params = {n: p for n, p in m.policy.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=5e-7)
    ids = torch.randint(3, 50, (2, 12))
    for _ in range(2):  # lora_B starts at 0: the first step moves B, the second moves A too
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m.policy(input_ids=ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None and p.dtype == torch.float32 for p in params.values())
    assert all(bool((p != 0).any()) for n, p in params.items() if "lora_B" in n)


# --- whole runs ---------------------------------------------------------------------------------

def _changed_fraction(tiny, run: Run) -> float:
    """Fraction of the elements of every weight matrix that differ from the initial model's."""
    before = load_file(str(tiny.model_dir / "model.safetensors"))
    after = load_file(str(run.out / "output" / "model.safetensors"))
    changed = total = 0
    for name, w0 in before.items():
        # Embedding rows of tokens absent from the data get no gradient: they should not move.
        if "embed_tokens" in name:
            continue
        start = w0.to(after[name].dtype)  # pure bf16 trained from the bf16-rounded weights
        changed += int((after[name] != start).sum())
        total += w0.numel()
    return changed / total


@pytest.mark.slow
def test_bf16_mixed_moves_the_weights_at_a_dpo_learning_rate_and_pure_bf16_does_not(tiny, tmp_path) -> None:
    """10 AdamW steps at lr 5e-7: with fp32 master weights (bf16-mixed) >= 99 % of the weights
    change; in pure bf16 most updates are below bf16's resolution and round away."""
    fractions = {}
    for precision in ("bf16-mixed", "bf16"):
        cfg = tiny_config(tiny, tmp_path / precision, training={"precision": precision, "learningRate": 5e-7,
                                                                "maxSteps": 10, "loggingSteps": 5})
        cfg["data"].pop("eval")
        run = run_trainer(cfg, tmp_path / precision)
        assert run.returncode == 0, run.stderr[-3000:]
        assert (PURE_BF16_WARNING in run.stderr) == (precision == "bf16")
        fractions[precision] = _changed_fraction(tiny, run)
    assert fractions["bf16-mixed"] >= 0.99, fractions
    assert fractions["bf16"] < 0.2, fractions


@pytest.mark.slow
def test_bf16_mixed_losses_track_fp32_over_50_steps(tiny, tmp_path) -> None:
    """Same rows, same seed, lr 1e-3: bf16 matmuls round each logit to ~3 significant digits, so the
    two runs' weights drift apart and the per-step gap grows with the steps. Tolerances are absolute
    (the loss is a difference of summed log-probs). Measured on the rank-independent data order:
    at most 0.0026 over the first 30 steps, 0.031 at worst and 0.0045 on average over 50 steps,
    against a step-to-step spread of fp32's own loss of about 0.03. Pure bf16 params fail the
    first bound at once (updates round away)."""
    losses = {}
    for precision in ("fp32", "bf16-mixed"):
        cfg = tiny_config(tiny, tmp_path / precision, data={"shuffleBuffer": 1},
                          training={"precision": precision, "maxSteps": 50, "loggingSteps": 1})
        cfg["data"].pop("eval")
        run = run_trainer(cfg, tmp_path / precision)
        assert run.returncode == 0, run.stderr[-3000:]
        losses[precision] = [r["loss"] for r in run.train_logs()]
    fp32, mixed = losses["fp32"], losses["bf16-mixed"]
    assert len(fp32) == len(mixed) == 50
    assert max(abs(x - math.log(2)) for x in fp32) > 0.03  # the weights moved: not a constant compared
    diffs = [abs(a - b) for a, b in zip(fp32, mixed, strict=True)]
    assert max(diffs[:30]) < 0.005, diffs
    assert max(diffs) < 0.05 and sum(diffs) / len(diffs) < 0.01, diffs


@pytest.mark.slow
def test_live_reference_runs_under_the_policys_autocast(tiny, tmp_path) -> None:
    """Under bf16-mixed the live reference used to run outside autocast while the policy ran
    inside it (evaluation and precompute wrapped both). Policy and reference are the same weights
    at step 1, so under one autocast the log-ratios are exactly 0 and the loss is log 2; and a live
    run equals a precomputed one step by step."""
    runs = {}
    for mode in ("live", "precompute"):
        cfg = tiny_config(tiny, tmp_path / mode, training={"precision": "bf16-mixed", "maxSteps": 3,
                                                           "referenceLogps": mode})
        cfg["data"].pop("eval")
        runs[mode] = run_trainer(cfg, tmp_path / mode)
        assert runs[mode].returncode == 0, runs[mode].stderr[-3000:]
    live = [r["loss"] for r in runs["live"].train_logs()]
    pre = [r["loss"] for r in runs["precompute"].train_logs()]
    assert live[0] == pytest.approx(math.log(2), abs=1e-6)
    assert runs["live"].train_logs()[0]["rewards_margins"] == 0.0
    assert live == pytest.approx(pre, abs=1e-6) and live[-1] < live[0]
