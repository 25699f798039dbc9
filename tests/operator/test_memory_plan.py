"""The memory plan: parameter counts, the examples' verdicts, the CLI, and the operator's condition.

Pure arithmetic and a real kopf operator on kmock; the estimate against measured memory is
tests/trainer/test_memory_estimate.py (it needs torch).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from kubedpo_operator.api import parse_spec
from kubedpo_operator.cli import main
from kubedpo_operator.memory_plan import (
    HEADROOM,
    GiB,
    ModelShape,
    estimate,
    largest_batch,
    make_plan,
    setup_of,
)
from tests.operator.conftest import eventually, minimal_spec

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "examples" / "model-configs"


def _shape(name: str) -> ModelShape:
    return ModelShape.from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def _example(name: str) -> dict:
    return next(d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d)


def test_parameter_counts_match_the_published_models() -> None:
    """Llama 3 8B and 70B as their model cards count them (embeddings and head untied)."""
    assert _shape("llama-3-8b").params == 8_030_261_248
    assert _shape("llama-3-70b").params == 70_553_706_496


def test_multinode_example_fits_as_fsdp_and_would_not_as_ddp() -> None:
    spec = parse_spec(_example("multinode-full.yaml")["spec"])
    data = json.loads((CONFIGS / "llama-3-8b.json").read_text())
    plan = make_plan(spec, data)
    assert plan.gpu_memory_gib == 80 and plan.fits and plan.largest_batch >= spec.training.batch_size
    ddp = spec.model_copy(update={"training": spec.training.model_copy(update={
        "distributed": spec.training.distributed.model_copy(update={"strategy": "ddp"})})})
    as_ddp = make_plan(ddp, data)
    assert not as_ddp.fits and as_ddp.largest_batch == 0
    assert as_ddp.components["optimizer"] == 8 * 8_030_261_248  # fp32 AdamW moments, unsharded
    assert plan.components["optimizer"] == 8 * 8_030_261_248 // 16
    assert as_ddp.advice[0].startswith("training.distributed.strategy: fsdp: fits")
    assert "exceeds 80 GiB" in as_ddp.warning()


def test_70b_lora_example_fits_on_one_node() -> None:
    spec = parse_spec(_example("lora-70b-fsdp.yaml")["spec"])
    plan = make_plan(spec, json.loads((CONFIGS / "llama-3-70b.json").read_text()))
    assert plan.fits and plan.components["reference"] == 0  # the base with the adapter off
    assert plan.trainable < plan.params / 100


def test_largest_batch_is_the_boundary() -> None:
    shape = _shape("llama-3-8b")
    s = setup_of(parse_spec(_example("multinode-full.yaml")["spec"]))
    budget = 40 * GiB * HEADROOM
    b = largest_batch(shape, s, budget)
    assert b >= 1
    assert estimate(shape, replace(s, batch_size=b))["peak"] <= budget < estimate(shape, replace(s, batch_size=b + 1))["peak"]


def test_sharding_and_offload_shrink_what_they_should() -> None:
    shape = _shape("llama-3-8b")
    s = setup_of(parse_spec(_example("multinode-full.yaml")["spec"]))
    fsdp = estimate(shape, s)
    offload = estimate(shape, replace(s, cpu_offload=True))
    precompute = estimate(shape, replace(s, reference="precompute"))
    assert offload["optimizer"] == offload["gradients"] == 0 and offload["weights"] < fsdp["weights"]
    assert precompute["reference"] == 0 < fsdp["reference"]
    assert offload["activations"] == fsdp["activations"]


def test_plan_cli_prints_components_and_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ok:
        main(["plan", str(ROOT / "examples" / "multinode-full.yaml"), "--model-config",
              str(CONFIGS / "llama-3-8b.json")])
    out = capsys.readouterr().out
    assert ok.value.code == 0
    for word in ("weights", "gradients", "optimizer", "reference", "activations", "peak", "fits"):
        assert word in out
    doc = _example("multinode-full.yaml")
    doc["spec"]["training"]["distributed"] = {"strategy": "ddp"}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SystemExit) as bad:
        main(["plan", str(path), "--model-config", str(CONFIGS / "llama-3-8b.json"), "--gpu-memory", "80"])
    out = capsys.readouterr().out
    assert bad.value.code == 1 and "DOES NOT FIT" in out and "strategy: fsdp: fits" in out


def test_validate_warns_but_passes_when_it_may_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((CONFIGS / "llama-3-8b.json").read_text())
    doc = _example("multinode-full.yaml")
    doc["spec"]["model"]["uri"] = str(model)
    doc["spec"]["training"]["distributed"] = {"strategy": "ddp"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SystemExit) as rc:
        main(["validate", str(path)])
    captured = capsys.readouterr()
    assert rc.value.code == 0 and "valid" in captured.out
    assert "warning: memory: estimated peak" in captured.err and "exceeds 80 GiB" in captured.err


async def test_operator_sets_a_warning_condition_not_a_failure(cluster, operator, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((CONFIGS / "llama-3-70b.json").read_text())
    await operator.start()
    spec = minimal_spec(workers=1, gpusPerWorker=1, nodeSelector={"nvidia.com/gpu.product": "NVIDIA-L4"})
    spec["model"]["uri"] = str(model)
    await cluster.create_dpojob("big", spec)
    await eventually(lambda: cluster.get("Job", "big-0"))  # the job runs anyway
    status = await eventually(lambda: cluster.status("big"))
    cond = {c["type"]: c for c in status["conditions"]}["MemoryPlan"]
    assert cond["status"] == "False" and cond["reason"] == "MayNotFit" and "exceeds 24 GiB" in cond["message"]
    assert status["phase"] == "Pending"
    events = await eventually(lambda: _events(cluster, "big", 2))
    assert any(e["reason"] == "MemoryPlan" and e["type"] == "Warning" for e in events)


async def _events(cluster, name: str, n: int) -> list | None:
    events = await cluster.events(name)
    return events if len(events) >= n else None
