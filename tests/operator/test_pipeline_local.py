"""`kubedpo pipeline run`'s bookkeeping: stage markers, resume order, refusing changed stages, the table.

The end-to-end runs (real tasks, real judge) are in tests/e2e/test_pipeline_local_e2e.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedpo_operator import pipeline_local as pl
from kubedpo_operator.cli import main
from kubedpo_operator.pipeline_api import RoundResult
from kubedpo_operator.pipeline_plan import parse_pipeline


def manifest(tmp_path: Path, **over: Any) -> Path:
    spec: dict[str, Any] = {
        "model": {"uri": str(tmp_path / "no-such-model")},
        "prompts": {"train": str(tmp_path / "prompts"), "heldOut": str(tmp_path / "heldout")},
        "rounds": 2,
        "judge": {"kind": "llm", "llm": {"url": "http://127.0.0.1:9/v1", "model": "m"}},
        "output": str(tmp_path / "out"),
        "metrics": {"port": 0},
        "runPolicy": {"maxRestarts": 0},
    }
    spec.update(over)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubedpo.io/v1alpha1", "kind": "DPOPipeline",
                                    "metadata": {"name": "p"}, "spec": spec}))
    return path


def test_finished_stages_are_read_in_order_and_a_gap_stops_there(tmp_path: Path) -> None:
    _, _, spec, stages = pl.load_pipeline_manifest(str(manifest(tmp_path)))
    assert pl.finished_results(spec, stages) == {}
    pl.write_marker(spec, stages[0], {"prompts": 10})
    pl.write_marker(spec, stages[2], {"step": 3})  # r1-train without r1-judge: not trusted past the gap
    assert pl.finished_results(spec, stages) == {"r1-generate": {"prompts": 10}}
    marker = json.loads(Path(pl.marker_uri(spec, stages[0])).read_text())
    assert marker["job"] == "p-r1-generate" and marker["result"] == {"prompts": 10}
    assert pl.marker_uri(spec, stages[0]) == str(tmp_path / "out") + "/stages/r1-generate.json"


def test_a_torn_marker_means_the_stage_runs_again(tmp_path: Path) -> None:
    _, _, spec, stages = pl.load_pipeline_manifest(str(manifest(tmp_path)))
    Path(pl.marker_uri(spec, stages[0])).parent.mkdir(parents=True)
    Path(pl.marker_uri(spec, stages[0])).write_text('{"stage": "r1-gen')
    assert pl.finished_results(spec, stages) == {}


def test_a_finished_stage_whose_spec_changed_is_refused_naming_it(tmp_path: Path) -> None:
    _, _, spec, stages = pl.load_pipeline_manifest(str(manifest(tmp_path)))
    pl.write_marker(spec, stages[0], {"prompts": 10})
    # Cluster fields and the metrics port do not change what a stage computes.
    _, _, spec2, stages2 = pl.load_pipeline_manifest(str(manifest(tmp_path, workers=3, metrics={"port": 9555})))
    assert pl.finished_results(spec2, stages2) == {"r1-generate": {"prompts": 10}}
    _, _, spec3, stages3 = pl.load_pipeline_manifest(
        str(manifest(tmp_path, generate={"temperature": 0.5})))
    with pytest.raises(pl.StageChanged, match="r1-generate"):
        pl.finished_results(spec3, stages3)
    out = io.StringIO()
    assert pl.run(str(manifest(tmp_path, generate={"temperature": 0.5})), out=out) == 2
    assert "stage r1-generate finished with a different spec" in out.getvalue()


def test_bad_manifest_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pl.run(str(manifest(tmp_path, generate={"samplesPerPrompt": 1}))) == 2
    assert "spec.generate.samplesPerPrompt" in capsys.readouterr().err
    path = tmp_path / "dpojob.yaml"
    path.write_text("kind: DPOJob\n")
    assert pl.run(str(path)) == 2


def test_rounds_table_aligns_and_shows_missing_values_as_dashes() -> None:
    rows = [RoundResult(round=1, prompts=64, pairs=50, ties=3, unparseable=0, inconsistent=1,
                        reward_accuracy=0.91, win_rate_vs_initial=0.625, win_rate_vs_previous=0.625),
            RoundResult(round=2, prompts=64, pairs=41)]
    lines = pl.rounds_table(rows)
    assert lines[0].split() == ["round", "prompts", "pairs", "ties", "unparseable", "inconsistent", "reward-acc",
                                "win-vs-initial", "win-vs-previous"]
    assert lines[1].split() == ["1", "64", "50", "3", "0", "1", "0.910", "0.625", "0.625"]
    assert lines[2].split()[-3:] == ["-", "-", "-"]
    assert len({len(line) for line in lines}) == 1


def test_cli_pipeline_plan_prints_the_stage_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = manifest(tmp_path, sft={"data": {"train": str(tmp_path / "sft")}})
    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", "plan", str(path)])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [s.job_name for s in parse_pipeline(
        "p", yaml.safe_load(path.read_text())["spec"])[1]]
    with pytest.raises(SystemExit):
        main(["pipeline", "plan", "--spec", str(path)])
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert docs[0]["kind"] == "DPOJob" and docs[0]["spec"]["task"] == "sft" and len(docs) == 9


@pytest.mark.slow
def test_a_failing_stage_stops_the_pipeline_and_says_how_to_resume(tmp_path: Path) -> None:
    """Real trainer process: the policy folder does not exist, so round 1's generate fails (no restarts)."""
    out = io.StringIO()
    code = pl.run(str(manifest(tmp_path)), out=out, log_format="json")
    log = out.getvalue()
    assert code != 0, log[-2000:]
    assert "stage 1/8: r1-generate" in log and "stage r1-generate Failed" in log
    assert "run the same command again to resume from r1-generate" in log
    assert not (tmp_path / "out" / "stages").exists()
