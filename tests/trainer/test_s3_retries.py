"""kubedpo_s3_retries_total counts every retry: botocore's, our reader's resumes, and those s3transfer
makes itself (a broken body of a multipart download is re-requested by s3transfer as a fresh
GetObject, attempt 1 to botocore), during checkpoint transfers and during the final export.

Faults come from the tests' proxy in front of a real SeaweedFS; each test asserts the count equals
the faults injected, exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kubedpo_trainer import storage
from kubedpo_trainer.config import S3Config, parse_config
from kubedpo_trainer.export import SUMMARY, export_final
from kubedpo_trainer.metrics import TrainerMetrics
from kubedpo_trainer.models import load_models, load_tokenizer

MiB = 1024 * 1024


def _via_proxy(s3, fault_proxy, totals: list[int]) -> None:
    """storage through the proxy, 5 MiB parts (S3's minimum), every retry total reported to `totals`."""
    s3.endpoint = fault_proxy.endpoint
    storage.configure(S3Config(endpoint_url=fault_proxy.endpoint, max_attempts=s3.max_attempts),
                      on_retry=totals.append, read_timeout=2.0, connect_timeout=2.0, resume_wait_initial=0.01,
                      multipart_chunksize=5 * MiB)


def test_retries_inside_s3transfer_uploads_and_downloads_are_counted(s3, fault_proxy, tmp_path: Path) -> None:
    totals: list[int] = []
    _via_proxy(s3, fault_proxy, totals)
    up = tmp_path / "up"
    up.mkdir()
    payload = os.urandom(11 * MiB)  # 3 parts
    (up / "big.bin").write_bytes(payload)
    (up / "small.json").write_bytes(b"{}")

    fault_proxy.status(503, count=2, methods=("PUT",), path_contains="partNumber")  # parts of the upload
    fault_proxy.drop_request(count=1, methods=("PUT",), path_contains="small.json")  # a whole-object PUT
    storage.upload_dir(up, s3.uri("ckpt/step-1/"))
    assert fault_proxy.pending() == 0
    assert storage.retry_count() == 3

    fault_proxy.status(503, count=1, methods=("GET",), path_contains="big.bin")
    fault_proxy.drop_after(100_000, count=2, methods=("GET",), path_contains="big.bin")  # bodies cut mid-way
    storage.download_dir(s3.uri("ckpt/step-1/"), tmp_path / "down")
    assert fault_proxy.pending() == 0
    assert (tmp_path / "down" / "big.bin").read_bytes() == payload
    assert storage.retry_count() == 6, dict(fault_proxy.injected)
    assert totals == list(range(1, 7))  # what kubedpo_s3_retries_total is advanced with, in order


def test_retries_during_export_reach_the_summary(s3, fault_proxy, tiny, tmp_path: Path) -> None:
    totals: list[int] = []
    _via_proxy(s3, fault_proxy, totals)
    cfg = parse_config({"model": {"uri": str(tiny.model_dir)}, "data": {"train": tiny.train_uri},
                        "output": {"uri": s3.uri("out/")}})
    m = load_models(cfg)
    fault_proxy.status(503, count=2, methods=("PUT",), path_contains="model.safetensors")
    fault_proxy.status(503, count=1, methods=("PUT",), path_contains=SUMMARY)
    export_final(m.policy, load_tokenizer(cfg), cfg, {"step": 3, "storage": {"s3_retries": 5}})
    assert fault_proxy.pending() == 0
    assert storage.retry_count() == 3 and totals == [1, 2, 3]
    summary = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=f"out/{SUMMARY}")["Body"].read())
    # 5 before the export, 2 while uploading the model; the summary's own PUT retry happens after it is
    # serialised, so it can only be in the metric.
    assert summary["storage"]["s3_retries"] == 7


def test_the_trainers_counter_follows_every_retry_and_keeps_the_start_up_checks(s3, fault_proxy) -> None:
    """What Trainer.setup wires: configure(keep_count=True, on_retry=metrics sync) after the CLI's checks."""
    storage.configure(S3Config(endpoint_url=fault_proxy.endpoint, max_attempts=s3.max_attempts),
                      read_timeout=2.0, connect_timeout=2.0, resume_wait_initial=0.01)
    fault_proxy.status(503, count=2, methods=("PUT",))
    storage.write_bytes(s3.uri("preflight/x"), b"x" * 1000)  # stands for the start-up checks' requests
    metrics = TrainerMetrics(job="j", namespace="ns", rank=0)
    storage.configure(S3Config(endpoint_url=fault_proxy.endpoint, max_attempts=s3.max_attempts), keep_count=True,
                      on_retry=lambda total: metrics.sync_counter("s3_retries", total),
                      read_timeout=2.0, connect_timeout=2.0, resume_wait_initial=0.01)
    labels = {"dpojob": "j", "namespace": "ns", "rank": "0"}
    assert metrics.registry.get_sample_value("kubedpo_s3_retries_total", labels) == 2
    fault_proxy.drop_after(10, count=1, methods=("GET",))
    assert storage.read_bytes(s3.uri("preflight/x")) == b"x" * 1000  # a body cut and resumed
    assert metrics.registry.get_sample_value("kubedpo_s3_retries_total", labels) == 3 == storage.retry_count()
