"""`kubedpo validate` is a faithful pre-check: the API server's type strictness, the operator's
name and child checks, one line per bad DPOJob naming the field, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubedpo_operator.cli import main
from tests.operator.conftest import minimal_spec

CASES = [
    ("type-int", {"workers": "2"}, "spec.workers: '2' is not of type 'integer'"),
    ("inf-string", {"training": {"learningRate": "inf"}}, "spec.training.learningRate: 'inf' is not of type 'number'"),
    ("inf-float", {"training": {"learningRate": float("inf")}}, "spec.training.learningRate: Input should be a finite"),
    ("limits-string", {"resources": {"limits": "4Gi"}}, "spec.resources.limits: '4Gi' is not of type 'object'"),
    ("lots", {"resources": {"limits": {"memory": "lots"}}}, "spec.resources.limits.memory: 'lots' does not match"),
    ("negative", {"resources": {"limits": {"memory": "-1Gi"}}}, "must be greater than or equal to 0"),
    ("gpu-request", {"gpusPerWorker": 4, "resources": {"requests": {"nvidia.com/gpu": 8}}},
     "spec.resources.requests[nvidia.com/gpu]: must be omitted or equal gpusPerWorker"),
    ("env-equals", {"env": [{"name": "A=B", "value": "x"}]}, "spec.env[0].name: 'A=B' must be a valid environment"),
    ("env-both", {"env": [{"name": "A", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
     "spec.env[0].valueFrom: may not be specified when `value` is not empty"),
    ("envfrom-empty", {"envFrom": [{}]}, "spec.envFrom[0]: must have exactly one of configMapRef or secretRef"),
    ("queue-space", {"runPolicy": {"queueName": "team a"}}, "spec.runPolicy.queueName: 'team a' does not match"),
    ("deadline", {"runPolicy": {"activeDeadlineSeconds": 2**63 - 1}}, "spec.runPolicy.activeDeadlineSeconds"),
    ("grace", {"checkpoint": {"preemptionGraceSeconds": 1e308}}, "spec.checkpoint.preemptionGraceSeconds"),
    ("cap", {"pod": {"addCapabilities": ["SYS_ADMIN"]}}, "spec.pod.addCapabilities[0]: 'SYS_ADMIN' is not allowed"),
    ("hostpath", {"pod": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}},
     "spec.pod.volumes[0].hostPath.path: '' is not under a host path"),
]


def _doc(name: str, extra: dict) -> dict:
    spec = minimal_spec(**{k: v for k, v in extra.items() if k not in ("checkpoint",)})
    if "checkpoint" in extra:
        spec["checkpoint"].update(extra["checkpoint"])
    return {"apiVersion": "kubedpo.io/v1alpha1", "kind": "DPOJob", "metadata": {"name": name}, "spec": spec}


def test_each_bad_manifest_gets_one_line_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "jobs.yaml"
    docs = [_doc(name, extra) for name, extra, _ in CASES] + [_doc("fine", {}), ["not", "a", "job"],
                                                              {"kind": "DPOJob", "metadata": [1], "spec": 3}]
    path.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(path)])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert "DPOJob/fine: valid" in out
    lines = err.splitlines()
    assert "Traceback" not in err and len(lines) == len(CASES) + 1
    for (name, _, expected), line in zip(CASES, lines, strict=False):
        assert line.startswith(f"{path}: DPOJob/{name}: ") and expected in line, (expected, line)
    assert "metadata.name: None must be a DNS-1035 label" in lines[-1]


def test_an_unreadable_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "broken.yaml"
    path.write_text("spec: [unclosed\n")
    with pytest.raises(SystemExit):
        main(["validate", str(path), str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("cannot read") == 2


def test_shared_models_refuse_non_finite_numbers():
    """The trainer's config and the status models share the base: no Infinity/NaN anywhere."""
    from pydantic import ValidationError

    from kubedpo_operator.api import Progress
    from kubedpo_trainer.config import parse_config
    from kubedpo_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="training.beta: Input should be a finite number"):
        parse_config({**minimal_spec(), "training": {"beta": float("inf")}})
    with pytest.raises(ConfigError, match="finite"):
        parse_config({**minimal_spec(), "training": {"learningRate": "nan"}})
    with pytest.raises(ValidationError, match="finite"):
        Progress(loss=float("inf"))
