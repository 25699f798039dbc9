"""Configuration errors name the field and exit 2 (the operator never retries them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubedpo_trainer.config import load_config, parse_config
from kubedpo_trainer.errors import EXIT_CONFIG, ConfigError

MINIMAL = {"model": {"uri": "m"}, "data": {"train": "d"}, "output": {"uri": "o"}}


def _with(**sections) -> dict:
    cfg = {k: dict(v) for k, v in MINIMAL.items()}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.training.loss == "sigmoid" and cfg.training.beta == 0.1
    assert cfg.data.on_bad_record == "fail"


def test_camel_case_wire_format_round_trips() -> None:
    cfg = parse_config(_with(training={"learningRate": 1e-5, "gradientAccumulationSteps": 4}))
    assert cfg.training.learning_rate == 1e-5
    wire = cfg.to_wire()
    assert wire["training"]["gradientAccumulationSteps"] == 4
    assert parse_config(wire) == cfg


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"training": {"beta": 0}}, "training.beta"),
        ({"training": {"loss": "dpo++"}}, "training.loss"),
        ({"training": {"learningRat": 1e-5}}, "training.learningRat"),
        ({"data": {"onBadRecord": "ignore"}}, "data.onBadRecord"),
        ({"model": {"lora": {"rank": 0}}}, "model.lora.rank"),
        ({"checkpoint": {"everySteps": 10}}, "checkpoint.uri"),
        ({"training": {"loss": "simpo"}, "model": {"referenceUri": "r"}}, "training.loss"),
    ],
)
def test_invalid_field_is_named(sections: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_with(**sections))
    assert field in str(err.value)


def test_missing_required_section_is_named() -> None:
    with pytest.raises(ConfigError, match=r"output: Field required"):
        parse_config({"model": {"uri": "m"}, "data": {"train": "d"}})


def test_yaml_syntax_error_names_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("model: {uri: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(p)


def test_cli_exits_2_naming_the_field(tmp_path: Path) -> None:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(_with(training={"beta": -1})))
    proc = subprocess.run(
        [sys.executable, "-m", "kubedpo_trainer.cli", "--config", str(p)], capture_output=True, text=True
    )
    assert proc.returncode == EXIT_CONFIG
    assert "training.beta" in proc.stderr


def test_cli_check_accepts_valid_config(tmp_path: Path) -> None:
    p = tmp_path / "job.json"
    p.write_text(json.dumps(MINIMAL))
    proc = subprocess.run(
        [sys.executable, "-m", "kubedpo_trainer.cli", "--config", str(p), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
