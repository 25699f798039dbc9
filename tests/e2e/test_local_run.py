"""`kubedpo run` runs a DPOJob's workers locally with the pods' command and env, to Succeeded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kubedpo_operator import local
from kubedpo_trainer.tiny import build_all

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.multiproc  # the example has 2 workers
def test_kubedpo_run_tiny_example_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_all(tmp_path / ".demo" / "artifacts", n_train=1024, n_eval=64)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    code = local.run(str(REPO / "examples" / "tiny-local.yaml"), out=out)
    log = out.getvalue()
    assert code == 0, log[-3000:]
    assert "[worker 0]" in log and "[worker 1]" in log and "Succeeded" in log
    assert '"event": "train"' in log  # not a terminal: the pods' JSON lines, not the live display
    png = (tmp_path / ".demo/runs/tiny-local/final/training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    summary = json.loads((tmp_path / ".demo/runs/tiny-local/final/kubedpo_summary.json").read_text())
    assert summary["step"] == 60
    assert summary["eval"]["eval_rewards_accuracies"] > summary["eval_at_start"]["eval_rewards_accuracies"]


def test_kubedpo_run_bad_manifest_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (REPO / "examples" / "tiny-local.yaml").read_text().replace("beta: 0.1", "beta: -1")
    bad.write_text(text)
    err = io.StringIO()
    code = local.run(str(bad), out=err)
    assert code == 2

