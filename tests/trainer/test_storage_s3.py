"""storage.py against a real SeaweedFS, with faults injected by a proxy on loopback.

Nothing here patches boto3: every byte crosses a real HTTP connection to a real
S3-compatible store, and faults are real dropped connections and real 5xx answers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError

from kubedpo_trainer import storage
from kubedpo_trainer.config import S3Config
from kubedpo_trainer.errors import InputError, StorageError
from kubedpo_trainer.s3_errors import classify
from tests.support.faultproxy import FaultProxy
from tests.support.s3 import S3Fixture
from tests.support.seaweed import SECRET_KEY, free_ports


def _rows(n: int) -> list[dict[str, object]]:
    return [{"prompt": f"q{i} " * 5, "chosen": f"good {i}", "rejected": f"bad {i}", "id": i} for i in range(n)]


def _jsonl(rows: list[dict[str, object]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def test_round_trip_list_read_write(s3: S3Fixture) -> None:
    for key in ["data/b.jsonl", "data/a.jsonl", "data/sub/c.jsonl.gz", "data/notes.txt", "data2/x.jsonl"]:
        storage.write_bytes(s3.uri(key), key.encode() * 3)
    listed = storage.list_objects(s3.uri("data"), suffixes=(".jsonl", ".jsonl.gz"))
    # Sorted, filtered, recursive, and "data" does not match the sibling prefix "data2/".
    assert [o.uri for o in listed] == [s3.uri("data/a.jsonl"), s3.uri("data/b.jsonl"), s3.uri("data/sub/c.jsonl.gz")]
    assert [o.size for o in listed] == [len(b"data/a.jsonl") * 3, len(b"data/b.jsonl") * 3, len(b"data/sub/c.jsonl.gz") * 3]
    single = storage.list_objects(s3.uri("data/b.jsonl"))
    assert [o.uri for o in single] == [s3.uri("data/b.jsonl")]
    assert storage.read_bytes(s3.uri("data/notes.txt")) == b"data/notes.txt" * 3
    assert storage.exists(s3.uri("data")) and storage.exists(s3.uri("data/a.jsonl"))
    assert not storage.exists(s3.uri("data/zzz")) and not storage.exists(s3.uri("dat"))
    with storage.open_range(s3.uri("data/b.jsonl"), 5) as f:
        assert f.read() == (b"data/b.jsonl" * 3)[5:]
    with storage.open_range(s3.uri("data/b.jsonl"), 36) as f:  # exactly at the end: empty, not an error
        assert f.read() == b""
    storage.delete_prefix(s3.uri("data"))
    assert [o.uri for o in storage.list_objects(s3.uri(""))] == [s3.uri("data2/x.jsonl")]


def test_listing_many_shards_does_not_parse_dates_with_dateutil(s3: S3Fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore parsed every listed object's LastModified with dateutil (~0.3 ms each): 2,000 shards
    cost 0.7 s of CPU before step 1, 100,000 would cost half a minute. Listing must not go there."""
    from dateutil import parser as dateutil_parser

    for i in range(30):
        storage.write_bytes(s3.uri(f"many/part-{i:03d}.jsonl"), b"{}\n")
    calls: list[object] = []
    real = dateutil_parser.parse
    monkeypatch.setattr(dateutil_parser, "parse", lambda *a, **k: calls.append(a) or real(*a, **k))
    storage.configure(S3Config(endpoint_url=s3.endpoint))  # a fresh client, built under the patch
    listed = storage.list_objects(s3.uri("many"))
    assert len(listed) == 30 and all(o.size == 3 for o in listed)
    assert calls == [], f"{len(calls)} LastModified values went through dateutil"


@pytest.mark.parametrize("value", ["2026-12-01T09:56:46.000Z", "2026-12-01T09:56:46Z", "2026-12-01T09:56:46.123456+02:00",
                                   "Tue, 01 Dec 2026 09:56:46 GMT", "1764582000", "2026-12-01 09:56:46"])
def test_fast_timestamp_equals_botocores_parser(value: str) -> None:
    from botocore.utils import parse_timestamp

    from kubedpo_trainer.s3 import fast_timestamp

    assert fast_timestamp(value) == parse_timestamp(value)
    assert (fast_timestamp(value).tzinfo is None) == (parse_timestamp(value).tzinfo is None)


def test_upload_download_dir_round_trip(s3: S3Fixture, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    files = {"model.safetensors": os.urandom(300_000), "config.json": b"{}", "nested/tok.json": b"[1, 2]"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    storage.upload_dir(src, s3.uri("models/m1/"))
    got = storage.download_dir(s3.uri("models/m1"), tmp_path / "cache" / "m1")
    for name, data in files.items():
        assert (got / name).read_bytes() == data
    assert (got / storage.COMPLETE_MARKER).exists()


def test_download_dir_once_per_node_under_concurrency(s3: S3Fixture, fault_proxy: FaultProxy,
                                                      tmp_path: Path) -> None:
    for i in range(3):
        storage.write_bytes(s3.uri(f"m/w{i}.bin"), os.urandom(50_000))
    s3.via(fault_proxy)
    target = tmp_path / "cache" / "m"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(storage.download_dir(s3.uri("m"), target)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 4
    object_gets = {p: n for (m, p), n in fault_proxy.seen.items() if m == "GET" and "/m/w" in p}
    assert sorted(object_gets) == [f"/{s3.bucket}/m/w{i}.bin" for i in range(3)]
    assert set(object_gets.values()) == {1}, "each object must be fetched by exactly one downloader"


def test_broken_bodies_resume_at_the_exact_byte(s3: S3Fixture, fault_proxy: FaultProxy) -> None:
    data = os.urandom(2_500_000)
    storage.write_bytes(s3.uri("big.bin"), data)
    seen: list[int] = []
    s3.via(fault_proxy)
    storage.configure(S3Config(endpoint_url=fault_proxy.endpoint, max_attempts=4), on_retry=seen.append,
                      read_timeout=2.0, resume_wait_initial=0.01)
    fault_proxy.drop_after(70_001, count=3)  # three bodies cut at odd offsets, then clean
    with storage.open_range(s3.uri("big.bin"), 1000) as f:
        got = f.read()
    assert got == data[1000:]
    assert fault_proxy.injected["drop_after"] == 3
    assert storage.retry_count() == 3 and seen == [1, 2, 3]
    assert fault_proxy.requests["GET"] == 4  # the first GET plus one ranged GET per break


def test_body_breaking_every_time_gives_storage_error(s3: S3Fixture, fault_proxy: FaultProxy) -> None:
    storage.write_bytes(s3.uri("big.bin"), os.urandom(500_000))
    s3.via(fault_proxy)
    fault_proxy.drop_after(0, count=100)  # headers, then nothing: no progress at all
    with pytest.raises(StorageError, match=rf"s3://{s3.bucket}/big.bin: body kept breaking"):
        storage.read_bytes(s3.uri("big.bin"))
    assert fault_proxy.injected["drop_after"] == s3.max_attempts


def test_5xx_answers_are_retried(s3: S3Fixture, fault_proxy: FaultProxy) -> None:
    s3.via(fault_proxy)
    fault_proxy.status(500, count=1, methods=("PUT",))
    storage.write_bytes(s3.uri("a.txt"), b"hello")
    fault_proxy.status(503, count=1, methods=("GET",))
    assert storage.read_bytes(s3.uri("a.txt")) == b"hello"
    assert fault_proxy.injected["status"] == 2
    assert storage.retry_count() == 2


def test_upload_through_faulty_proxy_yields_complete_objects(s3: S3Fixture, fault_proxy: FaultProxy,
                                                             tmp_path: Path) -> None:
    files = {"big.bin": os.urandom(11 * 1024 * 1024), "small.json": b'{"a": 1}', "mid.bin": os.urandom(200_000)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    s3.configure(fault_proxy.endpoint, multipart_chunksize=5 * 1024 * 1024)  # big.bin: 3 parts
    fault_proxy.status(500, count=2, methods=("PUT",))
    fault_proxy.drop_request(count=1, methods=("PUT",))
    fault_proxy.status(503, count=1, methods=("POST",))  # CreateMultipartUpload / Complete
    storage.upload_dir(tmp_path, s3.uri("ckpt/step-1"))
    raw = s3.client()
    for name, data in files.items():
        assert raw.get_object(Bucket=s3.bucket, Key=f"ckpt/step-1/{name}")["Body"].read() == data
    assert fault_proxy.pending() == 0 and storage.retry_count() >= 4


def test_gzip_jsonl_streams_line_by_line_through_breaks(s3: S3Fixture, fault_proxy: FaultProxy) -> None:
    rows = _rows(20_000)
    blob = gzip.compress(_jsonl(rows), compresslevel=1)
    storage.write_bytes(s3.uri("train/shard-0.jsonl.gz"), blob)
    s3.via(fault_proxy)
    fault_proxy.drop_after(len(blob) // 3, count=2)
    with gzip.open(storage.open_range(s3.uri("train/shard-0.jsonl.gz"))) as f:
        got = [json.loads(line) for line in f]
    assert got == rows and storage.retry_count() == 2


def test_plain_jsonl_resumes_from_a_byte_offset(s3: S3Fixture) -> None:
    """The data stream checkpoints a byte offset; reopening there yields exactly the rest."""
    rows = _rows(500)
    blob = _jsonl(rows)
    storage.write_bytes(s3.uri("train/s.jsonl"), blob)
    offset = len(_jsonl(rows[:123]))
    with storage.open_range(s3.uri("train/s.jsonl"), offset) as f:
        assert [json.loads(line) for line in f] == rows[123:]


def test_parquet_reads_over_s3_with_seeks(s3: S3Fixture, fault_proxy: FaultProxy) -> None:
    table = pa.table({"prompt": [f"p{i}" for i in range(30_000)], "chosen": [f"c{i}" for i in range(30_000)],
                      "rejected": [f"r{i}" * 3 for i in range(30_000)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=5_000)
    storage.write_bytes(s3.uri("pq/part-0.parquet"), buf.getvalue())
    s3.via(fault_proxy)
    fault_proxy.drop_after(50_000, count=1)
    pf = pq.ParquetFile(storage.open_range(s3.uri("pq/part-0.parquet")))
    assert pf.metadata.num_row_groups == 6
    assert pf.read_row_group(4).to_pylist() == table.slice(20_000, 5_000).to_pylist()
    assert pf.read().equals(table)


def test_object_replaced_mid_read_is_detected(s3: S3Fixture) -> None:
    uri = s3.uri("v.bin")
    storage.write_bytes(uri, b"A" * 3_000_000)
    f = storage.open_range(uri)
    assert f.read(10) == b"A" * 10
    storage.write_bytes(uri, b"B" * 3_000_000)
    f.seek(2_500_000)  # past the buffer: a new ranged GET, which carries If-Match with the first ETag
    with pytest.raises(InputError, match="replaced while being read"):
        f.read(10)


def test_missing_bucket_and_empty_prefix_are_input_errors(s3: S3Fixture) -> None:
    with pytest.raises(InputError, match=r"s3://no-such-bucket-kdpo/train: NoSuchBucket") as e:
        storage.list_objects("s3://no-such-bucket-kdpo/train")
    assert e.value.exit_code == 2
    with pytest.raises(InputError, match=rf"s3://{s3.bucket}/empty/: no objects"):
        storage.list_objects(s3.uri("empty/"))
    storage.write_bytes(s3.uri("only/readme.md"), b"x")
    with pytest.raises(InputError, match=r"no objects ending in .jsonl, .parquet"):
        storage.list_objects(s3.uri("only"), suffixes=(".jsonl", ".parquet"))
    with pytest.raises(InputError, match=rf"s3://{s3.bucket}/nope.jsonl: NoSuchKey"):
        storage.read_bytes(s3.uri("nope.jsonl"))


@pytest.mark.parametrize(("key_id", "secret", "code"), [
    ("kubedpotestkey", SECRET_KEY[::-1], "SignatureDoesNotMatch"),
    ("AKIAUNKNOWNKEY000000", SECRET_KEY, "InvalidAccessKeyId"),
])
def test_wrong_credentials_are_input_errors_without_the_secret(
        s3: S3Fixture, monkeypatch: pytest.MonkeyPatch, key_id: str, secret: str, code: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3.configure()
    with pytest.raises(InputError) as e:
        storage.list_objects(s3.uri("train/"))
    chain = f"{e.value} {e.value.__cause__}"
    assert s3.uri("train/") in str(e.value) and code in str(e.value)
    assert secret not in chain and SECRET_KEY not in chain and "***" not in chain


def test_unreachable_endpoint_is_a_storage_error(s3: S3Fixture) -> None:
    (port,) = free_ports(1)
    storage.configure(S3Config(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2), connect_timeout=0.5)
    with pytest.raises(StorageError, match=r"s3://.*/train/: S3 unreachable") as e:
        storage.list_objects(s3.uri("train/"))
    assert e.value.exit_code == 1 and storage.retry_count() == 1


def test_secret_in_a_server_message_is_masked() -> None:
    err = ClientError({"Error": {"Code": "WeirdError", "Message": f"echo {SECRET_KEY}"},
                       "ResponseMetadata": {"HTTPStatusCode": 400}}, "GetObject")
    msg = str(classify("s3://b/k", err, secrets=[SECRET_KEY]))
    assert SECRET_KEY not in msg and "***" in msg and msg.startswith("s3://b/k: WeirdError")


def test_subprocess_uses_env_endpoint_and_sees_faults_healed(s3: S3Fixture, fault_proxy: FaultProxy) -> None:
    """The trainer runs as a subprocess: AWS_ENDPOINT_URL alone routes it (here via the proxy)."""
    data = os.urandom(400_000)
    storage.write_bytes(s3.uri("x.bin"), data)
    s3.via(fault_proxy)
    fault_proxy.drop_after(100_000, count=1)
    fault_proxy.status(503, count=1)
    code = ("import hashlib, sys; from kubedpo_trainer import storage; "
            f"d = storage.read_bytes({s3.uri('x.bin')!r}); print(hashlib.sha256(d).hexdigest(), storage.retry_count())")
    env = {**os.environ, **s3.env()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [hashlib.sha256(data).hexdigest(), "2"]
