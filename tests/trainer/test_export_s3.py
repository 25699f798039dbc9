"""Issue 10: the output's completion marker against a real SeaweedFS store.

`kubedpo_summary.json` vouches for the files beside it. An export killed after the new weights
are uploaded but before the new summary is written must leave no summary at all: never new
weights with the summary (step, metrics) of an earlier attempt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubedpo_trainer import storage
from kubedpo_trainer.config import parse_config
from kubedpo_trainer.export import SUMMARY, export_final
from kubedpo_trainer.models import load_models, load_tokenizer


class Killed(BaseException):
    """Stands in for SIGKILL arriving between the weights upload and the summary write."""


def test_export_killed_after_upload_leaves_no_old_summary(s3, tiny, tmp_path: Path) -> None:
    cfg = parse_config({"model": {"uri": str(tiny.model_dir)}, "data": {"train": tiny.train_uri},
                        "output": {"uri": s3.uri("out/")}})
    client = s3.client()
    # An earlier attempt's complete output: old weights and its summary.
    client.put_object(Bucket=s3.bucket, Key="out/model.safetensors", Body=b"old weights")
    client.put_object(Bucket=s3.bucket, Key=f"out/{SUMMARY}", Body=json.dumps({"step": 1}).encode())
    m = load_models(cfg)
    real_upload = storage.upload_dir

    def upload_then_die(local: Path, uri: str) -> None:
        real_upload(local, uri)
        raise Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage, "upload_dir", upload_then_die)
        with pytest.raises(Killed):
            export_final(m.policy, load_tokenizer(cfg), cfg, {"step": 7})
    new = client.get_object(Bucket=s3.bucket, Key="out/model.safetensors")["Body"].read()
    assert new != b"old weights"  # the new weights are there ...
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix="out/").get("Contents", [])}
    assert f"out/{SUMMARY}" not in keys  # ... and no summary vouches for them

    export_final(m.policy, load_tokenizer(cfg), cfg, {"step": 7})  # the next attempt completes it
    body = client.get_object(Bucket=s3.bucket, Key=f"out/{SUMMARY}")["Body"].read()
    assert json.loads(body) == {"step": 7}
