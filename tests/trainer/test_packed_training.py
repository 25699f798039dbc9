"""Real trainer processes with `training.packing`: the same run as padded batches, step for step.

The packed step takes exactly the stream's rows for the step (so exact resume and exactly-once
are the stream's, tested in test_resume.py) and splits them by a token budget small enough to
force several micro-batches per step, on 1 rank and on 2 ranks that must agree on the count.
Tolerance 1e-4 on the logged loss, as for 1 rank vs 2 ranks: float summation order differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.runs import run_trainer, tiny_config

pytestmark = pytest.mark.slow

COMMON_DATA = {"shuffleBuffer": 1}
COMMON_TRAINING = {"maxSteps": 5, "lrScheduler": "constant", "gradientAccumulationSteps": 2}


def _losses(run) -> list[float]:
    assert run.returncode == 0, run.stderr[-3000:]
    return [r["loss"] for r in run.train_logs()]


@pytest.mark.multiproc
def test_packed_and_shared_runs_equal_the_padded_run(tiny, tmp_path: Path) -> None:
    padded = run_trainer(tiny_config(tiny, tmp_path / "padded", data=COMMON_DATA,
                                     training={**COMMON_TRAINING, "batchSize": 4}), tmp_path / "padded")
    packed = run_trainer(tiny_config(tiny, tmp_path / "packed", data=COMMON_DATA,
                                     training={**COMMON_TRAINING, "batchSize": 4,
                                               "packing": {"maxTokens": 96, "sharePrompt": True}}),
                         tmp_path / "packed")
    two = run_trainer(tiny_config(tiny, tmp_path / "two", data=COMMON_DATA,
                                  training={**COMMON_TRAINING, "batchSize": 2,
                                            "packing": {"maxTokens": 64, "sharePrompt": False}}),
                      tmp_path / "two", nproc=2, torchrun=True)
    a, b, c = _losses(padded), _losses(packed), _losses(two)
    assert len(a) == len(b) == len(c) == 5
    assert max(a[1:]) - min(a[1:]) > 1e-2  # it trained: the comparison is not between constants
    assert b == pytest.approx(a, abs=1e-4)
    assert c == pytest.approx(a, abs=1e-4)
    for key in ("rewards_margins", "logps_chosen", "logits_rejected"):
        assert [r[key] for r in packed.train_logs()] == pytest.approx([r[key] for r in padded.train_logs()],
                                                                      abs=1e-4, rel=1e-4)
    assert packed.summary()["eval"]["eval_loss"] == pytest.approx(padded.summary()["eval"]["eval_loss"], abs=1e-4)
