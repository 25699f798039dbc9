"""FSDP2 from the DPOJob (`training.distributed.strategy: fsdp`) and from accelerate's own config
(ACCELERATE_USE_FSDP + FSDP_* env, what `accelerate launch --config_file fsdp.yaml` sets): 2 ranks,
gloo, CPU, the real trainer on the tiny Llama.

accelerate 1.15 grants FSDP only on GPU-type backends: on CPU it silently keeps MULTI_CPU (DDP)
and ignores the FSDP config (torch's FSDP1 refuses CPU outright: "FSDP needs a non-CPU
accelerator device"; FSDP2's `fully_shard` does run on CPU with gloo). So that FSDP is testable
without a GPU, the launcher makes accelerate's state say FSDP where it would have said MULTI_CPU,
exactly as its GPU branch does (`distributed_type = FSDP`, `fsdp_plugin = plugin`):
tests/support/fsdp_launcher.py. Everything
after that is accelerate's and torch's real FSDP2: `fully_shard` per decoder layer, DTensor
params and optimizer state, reduce-scatter/all-gather over gloo, `get_state_dict` gathering to
rank 0. The last test checks the unpatched behaviour: a warning, and a DDP run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.support.runs import Run, free_port, run_trainer, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

STEPS, EVERY = 6, 3
TOL = 1e-4  # loss per step, and every exported weight: reduction order differs (all-reduce vs reduce-scatter)

FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",  # one fully_shard per LlamaDecoderLayer
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
}

LAUNCHER = Path(__file__).parents[1] / "support" / "fsdp_launcher.py"  # the forced-FSDP shim


def _config(tiny: Any, out: Path, ckpt: Path | None = None, strategy: str = "ddp") -> dict[str, Any]:
    """2 ranks x 4 pairs, rows in file order, a checkpoint every 3 steps."""
    cfg = tiny_config(tiny, out, data={"shuffleBuffer": 1}, training={
        "maxSteps": STEPS, "batchSize": 4, "distributed": {"strategy": strategy}})
    if ckpt is not None:
        cfg["checkpoint"] = {"uri": str(ckpt), "everySteps": EVERY, "keepLast": 5}
    return cfg


def run_fsdp(cfg: dict[str, Any], out: Path, launcher: Path, env: dict[str, str] | None = None,
             from_env: bool = True) -> Run:
    """`from_env`: FSDP asked for through accelerate's env (power users); else the spec must ask."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(launcher), "--config", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(FSDP_ENV if from_env else {}),
                               **(env or {})})
    return Run(proc.returncode, proc.stderr, out)


def _losses(run: Run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.train_logs()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(str(folder)).state_dict().items()}


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """A DDP run, an FSDP run of the same job (asked for in the spec), and an FSDP run resumed from
    the latter's step 3 (with activation checkpointing on)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    launcher = LAUNCHER
    out: dict[str, Run] = {}
    out["ddp"] = run_trainer(_config(tiny, tmp / "ddp"), tmp / "ddp", nproc=2, torchrun=True)
    out["fsdp"] = run_fsdp(_config(tiny, tmp / "fsdp", tmp / "fsdp" / "ckpt", "fsdp"), tmp / "fsdp", launcher,
                           from_env=False)
    for name in ("ddp", "fsdp"):
        assert out[name].returncode == 0, out[name].stderr[-4000:]
    # An interrupted run: only the step-3 checkpoint exists; the restart must continue from it.
    resumed_ckpt = tmp / "resumed" / "ckpt"
    shutil.copytree(tmp / "fsdp" / "ckpt" / "step-000003", resumed_ckpt / "step-000003")
    # Also without clipping (norms here are < 1, so nothing changes): the unclipped grad-norm path.
    # And with activation checkpointing (FSDP2's, per layer): recomputation changes no number.
    cfg = _config(tiny, tmp / "resumed", resumed_ckpt, "fsdp")
    cfg["training"]["maxGradNorm"] = None
    cfg["training"]["gradientCheckpointing"] = True
    out["resumed"] = run_fsdp(cfg, tmp / "resumed", launcher, from_env=False)
    assert out["resumed"].returncode == 0, out["resumed"].stderr[-4000:]
    return out


def test_fsdp_run_is_sharded_and_trains_like_ddp(runs: dict[str, Run]) -> None:
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert "distributed: FSDP2 over 2 processes" in fsdp.stderr
    assert "distributed: MULTI_CPU over 2 processes" in ddp.stderr
    l_ddp, l_fsdp = _losses(ddp), _losses(fsdp)
    assert sorted(l_ddp) == sorted(l_fsdp) == list(range(1, STEPS + 1))
    assert len(set(l_ddp.values())) == STEPS  # the weights moved: not a comparison of constants
    for s in l_ddp:
        assert l_fsdp[s] == pytest.approx(l_ddp[s], abs=TOL), s
    g_ddp = [r["grad_norm"] for r in ddp.train_logs()]
    g_fsdp = [r["grad_norm"] for r in fsdp.train_logs()]
    assert g_fsdp == pytest.approx(g_ddp, abs=TOL)  # the norm is reduced over shards, not one rank's
    assert fsdp.summary()["eval"]["eval_loss"] == pytest.approx(ddp.summary()["eval"]["eval_loss"], abs=TOL)

    # Each rank checkpointed its own shards of weights and optimizer state (DCP); nothing gathered.
    step = fsdp.out / "ckpt" / "step-000003"
    assert sorted(p.name for p in (step / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (step / "optimizer.pt").exists() and not (step / "model.safetensors").exists()
    sizes = [(step / "sharded" / f"__{r}_0.distcp").stat().st_size for r in range(2)]
    assert abs(sizes[0] - sizes[1]) < 0.05 * sum(sizes)  # halves, not one rank holding everything


def test_fsdp_reference_is_sharded_too(runs: dict[str, Run]) -> None:
    """Policy and reference: each rank holds about 1/world of the parameters (DDP: all of them)."""
    mem, ddp = runs["fsdp"].summary()["memory"], runs["ddp"].summary()["memory"]
    full = mem["reference_full_bytes"]
    assert full == mem["policy_full_bytes"] == ddp["reference_full_bytes"] > 0
    for r in range(2):
        assert mem["reference_local_bytes"][r] == pytest.approx(full / 2, rel=0.02), r
        assert mem["policy_local_bytes"][r] == pytest.approx(full / 2, rel=0.02), r
        assert ddp["reference_local_bytes"][r] == full


def test_fsdp_export_is_a_full_model_equal_to_ddp(tiny, runs: dict[str, Run]) -> None:
    import json

    out = runs["fsdp"].out / "output"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    fsdp, ddp, init = _weights(out), _weights(runs["ddp"].out / "output"), _weights(tiny.model_dir)
    assert fsdp.keys() == ddp.keys() == init.keys()
    for k in fsdp:
        assert fsdp[k].shape == init[k].shape, k
        assert (fsdp[k] - ddp[k]).abs().max().item() <= TOL, k
    assert max((fsdp[k] - init[k]).abs().max().item() for k in fsdp) > 10 * TOL  # it trained (Adam: ~lr a step)


def test_fsdp_resume_continues_exactly(runs: dict[str, Run]) -> None:
    resumed, base = runs["resumed"], runs["fsdp"]
    assert "resumed from" in resumed.stderr and "(step 3)" in resumed.stderr
    assert "activation checkpointing: 2 layers" in resumed.stderr  # both decoder layers recompute
    l_res, l_base = _losses(resumed), _losses(base)
    assert sorted(l_res) == list(range(EVERY + 1, STEPS + 1))
    for s in l_res:
        assert l_res[s] == pytest.approx(l_base[s], abs=1e-5), s
    g_res = {r["step"]: r["grad_norm"] for r in resumed.train_logs()}
    g_base = {r["step"]: r["grad_norm"] for r in base.train_logs()}
    assert max(g_base.values()) < 1.0  # maxGradNorm 1.0 clipped nothing in the base run
    for s in g_res:
        assert g_res[s] == pytest.approx(g_base[s], abs=TOL), s
    final_a, final_b = _weights(resumed.out / "output"), _weights(base.out / "output")
    assert all((final_a[k] - final_b[k]).abs().max().item() <= 1e-5 for k in final_a)


def test_fsdp_spec_without_gpu_warns_and_runs_ddp(tiny, tmp_path: Path) -> None:
    """Unpatched accelerate on CPU: the spec's FSDP is not granted; every rank loads the weights
    itself (no broadcast to wait for) and the run says why it is DDP."""
    cfg = tiny_config(tiny, tmp_path, data={"shuffleBuffer": 1},
                      training={"maxSteps": 2, "batchSize": 4, "distributed": {"strategy": "fsdp"}})
    cfg["data"].pop("eval")
    run = run_trainer(cfg, tmp_path, nproc=2, torchrun=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "training.distributed.strategy is fsdp but accelerate runs MULTI_CPU" in run.stderr


def test_fsdp_env_without_gpu_warns_and_runs_ddp(tiny, tmp_path: Path) -> None:
    """Unpatched accelerate on CPU: the FSDP request is not granted; the trainer says so."""
    cfg = tiny_config(tiny, tmp_path, data={"shuffleBuffer": 1}, training={"maxSteps": 2, "batchSize": 4})
    cfg["data"].pop("eval")
    run = run_trainer(cfg, tmp_path, nproc=2, torchrun=True, env=FSDP_ENV)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "FSDP was requested (ACCELERATE_USE_FSDP) but accelerate runs MULTI_CPU" in run.stderr


def test_fsdp_eval_with_unequal_rank_shares_matches_ddp(tiny, tmp_path: Path) -> None:
    """9 eval rows over 2 ranks of batch 4: 2 batches on one rank, 1 on the other. Under FSDP every
    forward is a collective, so the short rank repeats a batch, uncounted (this hung before)."""
    launcher = LAUNCHER
    runs = {}
    for name in ("ddp", "fsdp"):
        cfg = tiny_config(tiny, tmp_path / name, data={"shuffleBuffer": 1, "evalMaxRows": 9},
                          training={"maxSteps": 2, "batchSize": 4, "evalOnStart": True})
        runs[name] = (run_trainer(cfg, tmp_path / name, nproc=2, torchrun=True) if name == "ddp"
                      else run_fsdp(cfg, tmp_path / name, launcher))
        assert runs[name].returncode == 0, runs[name].stderr[-4000:]
    ddp, fsdp = (runs[n].summary() for n in ("ddp", "fsdp"))
    for phase in ("eval_at_start", "eval"):
        assert fsdp[phase]["eval_loss"] == pytest.approx(ddp[phase]["eval_loss"], abs=TOL)
        assert fsdp[phase]["eval_rewards_margins"] == pytest.approx(ddp[phase]["eval_rewards_margins"], abs=TOL)


def test_lora_under_fsdp_trains_like_ddp_and_checkpoints_the_adapter_only(tiny, tmp_path: Path) -> None:
    """The 70B example's setting: a LoRA adapter on an FSDP2-sharded frozen base (the reference is
    that base with the adapter off, here precomputed through the sharded forward). Per-step
    numbers equal DDP's; the DCP checkpoint holds the adapter and its AdamW state only (frozen
    base weights are left out)."""
    runs = {}
    for name in ("ddp", "fsdp"):
        cfg = tiny_config(tiny, tmp_path / name, data={"shuffleBuffer": 1},
                          model={"lora": {"rank": 4}},
                          training={"maxSteps": 3, "batchSize": 4, "distributed": {"strategy": name},
                                    "referenceLogps": "precompute"},
                          checkpoint={"uri": str(tmp_path / name / "ckpt"), "everySteps": 3})
        cfg["data"].pop("eval")
        runs[name] = (run_trainer(cfg, tmp_path / name, nproc=2, torchrun=True) if name == "ddp"
                      else run_fsdp(cfg, tmp_path / name, LAUNCHER, from_env=False))
        assert runs[name].returncode == 0, runs[name].stderr[-4000:]
    assert "distributed: FSDP2 over 2 processes" in runs["fsdp"].stderr
    ddp, fsdp = runs["ddp"].train_logs(), runs["fsdp"].train_logs()
    assert len(ddp) == len(fsdp) == 3
    for a, b in zip(ddp, fsdp, strict=True):
        for k in ("loss", "logps_chosen", "logps_rejected", "rewards_margins", "grad_norm"):
            assert b[k] == pytest.approx(a[k], abs=TOL), (a["step"], k)
    assert fsdp[-1]["rewards_margins"] != 0  # the adapter moved away from the reference
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(tmp_path / "fsdp" / "ckpt" / "step-000003" / "sharded")).read_metadata()
    keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert keys and all("lora_" in k for k in keys), keys[:5]


def test_fsdp_precompute_with_unequal_rank_shares_matches_ddp(tiny, tmp_path: Path) -> None:
    """referenceLogps: precompute under FSDP: the reference is sharded, so each of its forwards is a
    collective. 9 eval rows over 2 ranks give the ranks unequal forward counts; the short rank must
    run throw-away forwards in step (this hung: the reference cache ran each rank's own count)."""
    runs = {}
    for name in ("ddp", "fsdp"):
        cfg = tiny_config(tiny, tmp_path / name, data={"shuffleBuffer": 1, "evalMaxRows": 9},
                          training={"maxSteps": 2, "batchSize": 4, "referenceLogps": "precompute",
                                    "distributed": {"strategy": name}})
        runs[name] = (run_trainer(cfg, tmp_path / name, nproc=2, torchrun=True) if name == "ddp"
                      else run_fsdp(cfg, tmp_path / name, LAUNCHER, from_env=False))
        assert runs[name].returncode == 0, runs[name].stderr[-4000:]
    assert "distributed_type=FSDP" in runs["fsdp"].stderr or "FSDP" in runs["fsdp"].stderr
    ddp, fsdp = (runs[n].summary() for n in ("ddp", "fsdp"))
    assert fsdp["eval"]["eval_loss"] == pytest.approx(ddp["eval"]["eval_loss"], abs=TOL)
    assert _losses(runs["fsdp"]) == pytest.approx(_losses(runs["ddp"]), abs=TOL)
