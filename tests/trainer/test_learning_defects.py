"""Learning defects an outside review found (issue 8, 4a, 4b, 4e, 4g), each shown on a real
`kubedpo-trainer` run of the tiny model (CPU; gloo for 2 ranks). 4c is in test_precision.py, 4d
in test_tokenize.py, 4f in test_metrics.py, 4e's arithmetic in test_progress.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.support.runs import Run, run_trainer, tiny_config

pytestmark = pytest.mark.slow


def _rows(n: int, bad: set[int]) -> str:
    lines = [json.dumps({"prompt": f"Words: cat dog {i}.", "chosen": " animal", "rejected": " color"})
             for i in range(n)]
    for i in bad:
        lines[i] = '{"prompt": "p", "chosen": 5, "rejected": "x"}'  # ill-typed: skipped
    return "\n".join(lines) + "\n"


def _run(tiny, out: Path, data: dict[str, Any], nproc: int | None = None, **training: Any) -> Run:
    cfg = tiny_config(tiny, out, data={"shuffleBuffer": 1, **data},
                      training={"batchSize": 2, "maxSteps": None, "weightDecay": 0.0, **training})
    cfg["data"].pop("eval")
    cfg["training"] = {k: v for k, v in cfg["training"].items() if v is not None}
    run = run_trainer(cfg, out, nproc=nproc, torchrun=bool(nproc))
    assert run.returncode == 0, run.stderr[-3000:]
    return run


# --- 4a: padding-only steps ------------------------------------------------------------------------

def test_padding_only_steps_neither_step_the_optimizer_nor_log(tiny, tmp_path: Path) -> None:
    """8 rows, 4 of them bad, batch 2, one epoch: 4 steps planned, the last 2 made only of weight-0
    padding. They must leave the weights exactly as 2 steps on the 4 good rows alone do (AdamW's
    momentum moved them before), and not be logged as training (loss 0, accuracy 1.0 before)."""
    bad_dir, good_dir = tmp_path / "bad-data", tmp_path / "good-data"
    bad_dir.mkdir()
    good_dir.mkdir()
    # The global order keeps each row's position (shuffleBuffer 1: file order), so the bad rows sit
    # together at the end: steps 3 and 4 hold only their weight-0 padding on every rank.
    (bad_dir / "part-0.jsonl").write_text(_rows(8, bad={4, 5, 6, 7}))
    (good_dir / "part-0.jsonl").write_text("".join(_rows(8, set()).splitlines(keepends=True)[:4]))
    with_bad = _run(tiny, tmp_path / "with-bad", {"train": str(bad_dir), "onBadRecord": "skip"})
    good = _run(tiny, tmp_path / "good", {"train": str(good_dir)})
    assert [r["step"] for r in with_bad.train_logs()] == [1, 2]
    s = with_bad.summary()
    assert (s["step"], s["total_steps"], s["skipped_steps"], s["data"]["bad_records"]) == (4, 4, 2, 4)
    assert good.summary()["step"] == 2
    w_bad = load_file(str(with_bad.out / "output" / "model.safetensors"))
    w_good = load_file(str(good.out / "output" / "model.safetensors"))
    assert all(w_bad[k].equal(w_good[k]) for k in w_good)


def test_padding_only_steps_are_decided_by_all_ranks(tiny, tmp_path: Path) -> None:
    """2 ranks, rows dealt round-robin. Rank 0 loses 4 rows, rank 1 loses 2: at step 3 only rank 0
    holds padding alone (every rank steps: DDP needs all, and the logged values are rank 1's real
    pairs only), at step 4 both do (every rank skips). No hang, one skipped step."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "part-0.jsonl").write_text(_rows(16, bad={8, 10, 12, 14, 13, 15}))
    run = _run(tiny, tmp_path / "run", {"train": str(data), "onBadRecord": "skip"}, nproc=2)
    logs = run.train_logs()
    assert [r["step"] for r in logs] == [1, 2, 3]
    assert run.summary()["skipped_steps"] == 1
    assert logs[2]["loss"] > 0.1  # rank 1's real pairs (0 would be padding's)


# --- 4b: dropout -----------------------------------------------------------------------------------

def test_step_one_loss_is_log_2_with_a_dropout_model(tiny, tmp_path: Path) -> None:
    """At step 1 policy == reference, so the DPO loss is exactly log 2, unless dropout perturbs the
    policy's forward (0.6958 before, with attention_dropout 0.1)."""
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(tiny.model_dir, attention_dropout=0.1).save_pretrained(folder)
    for f in tiny.model_dir.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, folder / f.name)
    cfg = tiny_config(tiny, tmp_path, model={"uri": str(folder)}, training={"maxSteps": 1})
    cfg["data"].pop("eval")
    run = run_trainer(cfg, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.train_logs()[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


# --- 4e and 4g: a resumed run that goes past one epoch ----------------------------------------------

@pytest.fixture(scope="module")
def resumed(tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Run]:
    """32 rows, batch 8: 4 steps per epoch. Run 1 stops at step 3 with a checkpoint; run 2 asks
    for maxSteps 10 with epochs 1 and resumes at step 3."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    data.mkdir()
    (data / "part-0.jsonl").write_text(_rows(32, set()))
    ckpt = {"checkpoint": {"uri": str(root / "ckpt"), "everySteps": 3}}
    runs = []
    for name, steps in (("first", 3), ("second", 10)):
        cfg = tiny_config(tiny, root / name, data={"train": str(data)},
                          training={"batchSize": 8, "maxSteps": steps, "epochs": 1}, **ckpt)
        cfg["data"].pop("eval")
        run = run_trainer(cfg, root / name)
        assert run.returncode == 0, run.stderr[-3000:]
        runs.append(run)
    return runs[0], runs[1]


def test_max_steps_overrides_epochs(resumed: tuple[Run, Run]) -> None:
    """As TRL/transformers: maxSteps 10 with epochs 1 trains 10 steps (2.5 epochs), not 4."""
    _, second = resumed
    s = second.summary()
    assert (s["step"], s["total_steps"]) == (10, 10)
    assert second.train_logs()[-1]["epoch"] == pytest.approx(2.5)


def test_rate_and_eta_after_a_resume_count_from_the_resume_point(resumed: tuple[Run, Run]) -> None:
    """The resumed process did steps 4.. in its own time. A rate counted from step 0 claims 4 steps
    in the time of one (ETA 4x too short at step 4). Elapsed time covers at least the steps' own
    wall time, so the true rate is at most 1 / the step's duration."""
    _, second = resumed
    logs = second.train_logs()
    assert logs[0]["step"] == 4
    first_step_seconds = second.summary()["timing"]["step_seconds"][0]
    assert logs[0]["steps_per_second"] <= 1.0 / first_step_seconds
    assert logs[0]["eta_seconds"] >= (10 - 4) * first_step_seconds
