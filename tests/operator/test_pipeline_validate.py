"""`kubedpo validate` on DPOPipelines: the pipeline's schema and rules, then every stage as the
DPOJob it becomes (the same admission and child checks the operator applies), naming the stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubedpo_operator.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "iterative-pipeline.yaml"


def _validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--no-plan", str(path)])
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def test_the_example_pipeline_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _validate(EXAMPLE, capsys)
    assert code == 0, err
    assert "DPOPipeline/zephyr-iterative: valid" in out


@pytest.mark.parametrize(("change", "expected"), [
    ({"rounds": "3"}, "spec.rounds: '3' is not of type 'integer'"),
    ({"generate": {"samplesPerPrompt": 1}}, "generate.samplesPerPrompt: at least 2"),
    ({"image": "evil/registry:1"}, None),  # allowed unless the operator's settings restrict images
    ({"pod": {"addCapabilities": ["SYS_ADMIN"]}}, "spec.pod.addCapabilities[0]: 'SYS_ADMIN' is not allowed "),
])
def test_bad_pipelines_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict,
                                      expected: str | None) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"].update(change)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out, err = _validate(path, capsys)
    if expected is None:
        assert code == 0, err
        return
    assert code == 2 and expected in err, err
    assert "Traceback" not in err


def test_a_name_too_long_for_its_stage_jobs_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = "a" * 40
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, _, err = _validate(path, capsys)
    assert code == 2 and "metadata.name: at most" in err, err
