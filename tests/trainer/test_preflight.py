"""Every URI is checked at start, on SeaweedFS: exit 2 naming the field and the URI, before any
download or training step (before, a missing eval prefix failed at the first evaluation and a
missing output bucket after the whole run). A mistyped local model path never asks the hub.
"""

from __future__ import annotations

import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubedpo_trainer import preflight
from kubedpo_trainer.config import parse_config
from kubedpo_trainer.errors import InputError
from tests.support.runs import run_trainer, tiny_config


def _upload(s3: Any, folder: str, key: str) -> str:
    for f in sorted(Path(folder).glob("*")):
        s3.client().put_object(Bucket=s3.bucket, Key=f"{key}/{f.name}", Body=f.read_bytes())
    return s3.uri(key + "/")


def test_every_unusable_uri_is_named_with_its_field(s3, tiny, tmp_path: Path) -> None:
    train = _upload(s3, tiny.train_uri, "train")
    (tmp_path / "a-file").write_text("x")
    missing_bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    cfg = parse_config({
        "model": {"uri": str(tiny.model_dir), "tokenizerUri": str(tmp_path / "models" / "nope")},
        "data": {"train": train, "eval": s3.uri("eval-typo/"), "indexUri": s3.uri("index/")},
        "checkpoint": {"uri": f"s3://{missing_bucket}/ckpt/", "everySteps": 5},
        "output": {"uri": str(tmp_path / "a-file" / "out")},
    })
    found = preflight.problems(cfg)
    assert len(found) == 4, found
    by_field = {line.split(": ", 1)[0]: line for line in found}
    assert set(by_field) == {"model.tokenizerUri", "data.eval", "checkpoint.uri", "output.uri"}
    assert f"no such folder {tmp_path / 'models' / 'nope'}" in by_field["model.tokenizerUri"]
    assert s3.uri("eval-typo/") in by_field["data.eval"] and "no objects" in by_field["data.eval"]
    assert f"s3://{missing_bucket}/ckpt/: the bucket '{missing_bucket}' does not exist" in by_field["checkpoint.uri"]
    assert f"cannot create the folder {tmp_path / 'a-file' / 'out'}" in by_field["output.uri"]
    with pytest.raises(InputError) as err:
        preflight.check(cfg)
    assert err.value.exit_code == 2 and all(line in str(err.value) for line in found)


def test_a_usable_config_passes_and_odd_shards_are_refused(s3, tiny, tmp_path: Path) -> None:
    train = _upload(s3, tiny.train_uri, "train")
    cfg = {"model": {"uri": str(tiny.model_dir)}, "data": {"train": train, "eval": train},
           "checkpoint": {"uri": s3.uri("ckpt/")}, "output": {"uri": str(tmp_path / "new" / "out")}}
    assert preflight.problems(parse_config(cfg)) == []
    assert (tmp_path / "new" / "out").is_dir()  # created at start, so the export cannot fail on it
    s3.client().put_object(Bucket=s3.bucket, Key="odd/rows.csv", Body=b"a,b\n")
    found = preflight.problems(parse_config({**cfg, "data": {"train": train, "eval": s3.uri("odd/")}}))
    assert len(found) == 1 and found[0].startswith("data.eval: ") and "rows.csv: not a supported data shard" in found[0]


class _Hub(BaseHTTPRequestHandler):
    """Stands in for huggingface.co (HF_ENDPOINT): records every request, answers 404."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args: Any) -> None:
        pass


def test_the_trainer_exits_2_before_loading_anything_and_never_asks_the_hub(s3, tiny, tmp_path: Path) -> None:
    """A missing output bucket and a mistyped local model path, through the real CLI: exit 2 at start."""
    hub = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    missing_bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    cfg = tiny_config(tiny, tmp_path, model={"uri": "models/nope"},
                      output={"uri": f"s3://{missing_bucket}/final/"})
    env = {**s3.env(), "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_HUB_OFFLINE": "0"}
    try:
        t0 = time.monotonic()
        run = run_trainer(cfg, tmp_path, env=env, timeout=120)
        took = time.monotonic() - t0
    finally:
        hub.shutdown()
    assert run.returncode == 2, run.stderr[-3000:]
    assert "checked at start" in run.stderr
    assert f"output.uri: s3://{missing_bucket}/final/: the bucket '{missing_bucket}' does not exist" in run.stderr
    assert f"model.uri: models/nope: no such folder {Path.cwd() / 'models' / 'nope'}" in run.stderr
    assert _Hub.seen == [], f"the hub was asked: {_Hub.seen}"
    assert run.train_logs() == [] and "metrics on" not in run.stderr  # nothing started: no trainer setup
    print(f"exit 2 after {took:.1f}s")
