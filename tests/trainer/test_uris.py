"""Malformed URIs are refused by the one schema: the trainer's config, `kubedpo validate` and the CRD's CEL.

Before, `s3:/bucket/x` and `s3//x` were valid relative paths: the trainer wrote its checkpoints and
model into a local folder named `s3:` and exited 0. Every URI field goes through `uris.py`.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubedpo_operator.api import SpecError, parse_spec
from kubedpo_operator.crd import to_jsonschema
from kubedpo_operator.pipeline_api import DPOPipelineSpec
from kubedpo_trainer.config import parse_config
from kubedpo_trainer.errors import ConfigError
from kubedpo_trainer.uris import uri_problem
from tests.operator.test_crd_cel import SCHEMA, example, violations

SPEC_SCHEMA = jsonschema.Draft202012Validator(to_jsonschema(SCHEMA["properties"]["spec"]))

BASE = {"model": {"uri": "models/tiny"}, "data": {"train": "data/train"}, "output": {"uri": "out"}}

BAD = [
    ("s3:/bucket/x", "local folder named 's3:'"),
    ("s3//bucket/x", "missing the ':'"),
    ("s3://", "no bucket"),
    ("s3:///key", "no bucket"),
    ("s3://ab/x", "not a valid S3 bucket name"),
    ("s3://My_Bucket/x", "not a valid S3 bucket name"),
    ("s3://a..b/x", "not a valid S3 bucket name"),
    ("s3://192.168.1.1/x", "not a valid S3 bucket name"),
    ("S3://bucket/x", "lower-case s3"),
    ("s3a://bucket/x", "Hadoop's names for S3"),
    ("gs://bucket/x", "S3-compatible endpoint"),
    ("https://host/x", "unsupported scheme 'https:'"),
    ("run:1/x", "unsupported scheme 'run:'"),
    ("file://", "file:///absolute/path"),
    (" s3://bucket/x", "spaces around it"),
    ("", "at least 1 character"),
]
GOOD = ["s3://bucket/x/", "s3://my.bucket-1", "s3://abc", "/abs/path", "rel/path", "./run:1/x", "file:///abs",
        "models/nope", "s3/data"]

# Every URI field of the trainer's config, as (section, key): each must refuse every BAD value.
FIELDS = [("model", "uri"), ("model", "referenceUri"), ("model", "tokenizerUri"), ("data", "train"),
          ("data", "eval"), ("data", "indexUri"), ("checkpoint", "uri"), ("output", "uri"),
          ("training", "referenceCacheUri")]


def _with(doc: dict[str, Any], section: str, key: str, value: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc.setdefault(section, {})[key] = value
    return doc


@pytest.mark.parametrize(("value", "message"), BAD)
@pytest.mark.parametrize(("section", "key"), FIELDS)
def test_every_uri_field_refuses_malformed_uris_naming_field_and_uri(section: str, key: str, value: str,
                                                                    message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_with(BASE, section, key, value))
    text = str(err.value)
    assert f"{section}.{key}: " in text and message in text, text
    if value:
        assert repr(value) in text, text


@pytest.mark.parametrize("value", GOOD)
@pytest.mark.parametrize(("section", "key"), FIELDS)
def test_well_formed_uris_and_local_paths_pass(section: str, key: str, value: str) -> None:
    assert parse_config(_with(BASE, section, key, value))


def test_hub_ids_only_in_model_fields() -> None:
    for key in ("uri", "referenceUri", "tokenizerUri"):
        assert parse_config(_with(BASE, "model", key, "hf://org/name"))
    assert uri_problem("hf://gpt2", hub=True) is None
    assert "expected hf://org/name" in (uri_problem("hf://org/name/extra", hub=True) or "")
    for section, key in (("data", "train"), ("output", "uri"), ("checkpoint", "uri")):
        with pytest.raises(ConfigError, match=rf"{section}\.{key}: 'hf://org/name': hf:// names a hub model"):
            parse_config(_with(BASE, section, key, "hf://org/name"))


def test_stage_and_pipeline_uri_fields_use_the_same_rule() -> None:
    judge = {"kind": "rewardModel", "rewardModel": {"uri": "hf://org/rm"}, "generations": "s3://bkt/gen/",
             "compare": {"vsInitial": ["s3://bkt/r1/", "s3://bkt/r0/"]}, "cacheUri": "s3://bkt/cache/"}
    ok = {**BASE, "task": "judge", "judge": judge}
    assert parse_config(ok)
    for path, bad in ((("rewardModel", "uri"), "s3:/bkt/rm"), (("generations",), "s3//bkt/gen"),
                      (("cacheUri",), "s3a://bkt/c"), (("compare", "vsInitial"), ["s3://bkt/r1/", "s3:/x"])):
        doc = copy.deepcopy(ok)
        node = doc["judge"]
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = bad
        with pytest.raises(ConfigError, match=r"judge\." + r"\.".join(path)):
            parse_config(doc)
    pipeline = {"model": {"uri": "s3://bkt/m/"}, "prompts": {"train": "s3://bkt/p/"}, "output": "s3://bkt/out/",
                "judge": {"kind": "rewardModel", "rewardModel": {"uri": "s3://bkt/rm/"}}}
    assert DPOPipelineSpec.model_validate(pipeline)
    for key, bad in (("output", "s3:/bkt/out"), ("prompts", {"train": "s3//bkt/p"}),
                     ("prompts", {"train": "s3://bkt/p/", "heldOut": "s3://"})):
        with pytest.raises(ValueError, match="s3"):
            DPOPipelineSpec.model_validate({**pipeline, key: bad})


@pytest.mark.parametrize(("value", "message"), BAD)
def test_the_crd_refuses_what_the_operator_refuses(value: str, message: str) -> None:
    """CEL at `kubectl apply` and pydantic in the operator agree on every case, for a model and a data field."""
    for section, key in (("model", "uri"), ("data", "eval"), ("output", "uri")):
        doc = example()
        doc["spec"].setdefault(section, {})[key] = value
        cel = [v for v in violations(doc) if v.startswith(f"spec.{section}.{key}:")]
        schema = [e for e in SPEC_SCHEMA.iter_errors(doc["spec"]) if list(e.path) == [section, key]]
        assert cel or schema, f"the CRD admits {section}.{key}={value!r}"
        with pytest.raises(SpecError) as err:
            parse_spec(doc["spec"])
        assert err.value.field == f"spec.{section}.{key}"


@pytest.mark.parametrize("value", GOOD + ["hf://org/name"])
def test_the_crd_admits_what_the_operator_admits(value: str) -> None:
    section, key = ("model", "uri") if value.startswith("hf://") else ("data", "eval")
    doc = example()
    doc["spec"][section][key] = value
    assert violations(doc) == []
    assert parse_spec(doc["spec"])


def test_trainer_and_kubedpo_validate_exit_2_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(_with(BASE, "output", "uri", "s3:/bucket/final")))
    proc = subprocess.run([sys.executable, "-m", "kubedpo_trainer.cli", "--config", str(cfg), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "output.uri: 's3:/bucket/final' is not an S3 URI" in proc.stderr
    assert not Path("s3:").exists()
    manifest = example()
    manifest["spec"]["checkpoint"]["uri"] = "s3//runs/ckpt"
    (tmp_path / "job.dpoj.yaml").write_text(yaml.safe_dump(manifest))
    proc = subprocess.run([sys.executable, "-m", "kubedpo_operator.cli", "validate", str(tmp_path / "job.dpoj.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "checkpoint.uri" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
