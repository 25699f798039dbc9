"""The s3:// half of `storage`: one shared boto3 client, retries, and the object operations.

Credentials come from boto3's default chain (AWS_ACCESS_KEY_ID/SECRET, AWS_PROFILE, IRSA web
identity, instance roles), never from the trainer config; the endpoint from `s3.endpointUrl`
or boto3's own AWS_ENDPOINT_URL(_S3). Requests use botocore's "standard" retry mode with
`s3.maxAttempts` (5xx, throttling and connection errors are retried with backoff there);
bodies that break mid-stream are resumed by `S3RangeReader`. Every retry, botocore's or a
resume, increments one counter exported as `kubedpo_s3_retries_total`.

boto3 clients are thread-safe, sessions are not: one client is built lazily under a lock
and shared by the loader, the background checkpoint uploader and s3transfer's threads.
"""

from __future__ import annotations

import builtins
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.utils import parse_timestamp

from .config import S3Config
from .errors import InputError
from .s3_errors import translate_errors
from .s3_reader import S3RangeReader, Traffic

MiB = 1024 * 1024


class _TransferRetries(logging.Filter):
    """Counts the retries s3transfer makes on its own, which botocore never sees as retries.

    A download whose body breaks mid-way is re-requested by s3transfer with a fresh GetObject
    (attempt 1 to botocore, so `_count_attempt` misses it). s3transfer offers no hook for this;
    its one trace is a debug line, "Retrying exception caught ...", on the `s3transfer.download`
    logger. This filter sits on that logger (set to DEBUG so the line is made), counts the line
    into the newest client, and drops debug lines unless the root logger wants them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.target: S3Client | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.DEBUG and str(record.msg).startswith("Retrying exception caught"):
            target = self.target
            if target is not None:
                target.count_retry()
        return record.levelno > logging.DEBUG or logging.getLogger().isEnabledFor(logging.DEBUG)


_TRANSFER_RETRIES = _TransferRetries()
_TRANSFER_LOG = logging.getLogger("s3transfer.download")
_TRANSFER_LOG.addFilter(_TRANSFER_RETRIES)
_TRANSFER_LOG.setLevel(logging.DEBUG)


def fast_timestamp(value: Any) -> datetime:
    """A listing carries one ISO 8601 `LastModified` per object, and botocore parses each with
    dateutil (about 0.3 ms): listing 2,000 shards cost 0.7 s of CPU before step 1, 100,000 shards
    would cost half a minute. The C parser takes microseconds; any other form (HTTP dates in
    headers, epoch numbers) still goes through botocore's own parser, so results are the same.
    """
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    return parse_timestamp(value)


def split(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` → ("bucket", "some/key"); the bucket must be named."""
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(f"{uri}: no bucket in S3 URI (expected s3://bucket/prefix)")
    return bucket, key


@dataclass
class S3Settings:
    """What `configure` takes: the config section plus timeouts (seconds) and transfer sizes."""

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    resume_wait_initial: float = 0.2  # first backoff before resuming a broken body
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 8


@dataclass
class S3Client:
    """A lazily built shared client plus the retry counter; one per `storage.configure`."""

    settings: S3Settings = field(default_factory=S3Settings)
    on_retry: Callable[[int], None] | None = None
    _client: Any = None
    _session: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _retry_lock: threading.Lock = field(default_factory=threading.Lock)
    _retries: int = 0
    traffic: Traffic = field(default_factory=lambda: Traffic())

    # --- client and retry accounting -----------------------------------------------------

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                s = self.settings
                core = botocore.session.get_session()
                core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=fast_timestamp)
                self._session = boto3.session.Session(botocore_session=core)
                cfg = Config(
                    # total_max_attempts counts the first try; botocore's max_attempts would not.
                    retries={"mode": "standard", "total_max_attempts": s.max_attempts},
                    connect_timeout=s.connect_timeout,
                    read_timeout=s.read_timeout,
                    max_pool_connections=max(10, 2 * s.max_concurrency),
                    # Path style works on every S3-compatible store (MinIO, Ceph, SeaweedFS).
                    s3={"addressing_style": "path"} if s.endpoint_url else None,
                )
                self._client = self._session.client(
                    "s3", endpoint_url=s.endpoint_url, region_name=s.region, config=cfg
                )
                self._client.meta.events.register("before-send.s3", self._count_attempt)
                _TRANSFER_RETRIES.target = self  # one client per process: the newest configured
            return self._client

    def _count_attempt(self, request: Any = None, **_: Any) -> None:
        """botocore stamps `amz-sdk-request: attempt=N; max=M` on every try: N > 1 is a retry."""
        header = request.headers.get("amz-sdk-request") if request is not None else None
        if isinstance(header, bytes):
            header = header.decode()
        if header and not header.startswith("attempt=1;"):
            self.count_retry()

    def count_retry(self) -> None:
        """One retry, from any thread (loader, uploader, s3transfer's workers); `on_retry` is called
        under the lock, so the totals it sees arrive in order and a counter synced to them never skips
        or double-counts."""
        with self._retry_lock:
            self._retries += 1
            if self.on_retry is not None:
                self.on_retry(self._retries)

    @property
    def retries(self) -> int:
        return self._retries

    def secrets(self) -> list[str]:
        """The secret parts of the resolved credentials, to mask them in error messages."""
        creds = self._session.get_credentials() if self._session is not None else None
        if creds is None:
            return []
        frozen = creds.get_frozen_credentials()
        return [x for x in (frozen.secret_key, frozen.token) if x]

    def errors(self, uri: str) -> AbstractContextManager[None]:
        return translate_errors(uri, _LazySecrets(self))

    # --- reading -------------------------------------------------------------------------

    def list(self, uri: str) -> list[tuple[str, int, str]]:
        """(uri, size, ETag) of the object `uri` itself, or of every object in the folder `uri`."""
        bucket, key = split(uri)
        c = self.client
        with self.errors(uri):
            if key and not key.endswith("/"):
                first = c.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("Contents", [])
                if first and first[0]["Key"] == key:  # the object itself sorts first under its prefix
                    return [(uri, int(first[0]["Size"]), first[0].get("ETag", ""))]
                key += "/"
            return [(f"s3://{bucket}/{k}", size, etag) for k, size, etag in self._keys(bucket, key)]

    def versions(self, uri: str) -> builtins.list[tuple[str, int, str]]:  # `list` is a method here
        """(uri, size, ETag) of the object `uri` itself, or of every object in the folder `uri`."""
        bucket, key = split(uri)
        folder = not key or key.endswith("/")
        out: list[tuple[str, int, str]] = []
        with self.errors(uri):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                for o in page.get("Contents", []):
                    k = o["Key"]
                    mine = k == key or (folder and not k.endswith("/")) or k.startswith(key + "/")
                    if mine:
                        out.append((f"s3://{bucket}/{k}", int(o["Size"]), str(o.get("ETag", ""))))
        exact = [v for v in out if v[0] == uri]
        return exact or sorted(out)

    def _keys(self, bucket: str, prefix: str) -> Iterator[tuple[str, int, str]]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                if not o["Key"].endswith("/"):  # folder placeholder objects
                    yield o["Key"], int(o["Size"]), o.get("ETag", "")

    def reader(self, uri: str, start: int = 0, end: int | None = None, etag: str | None = None) -> S3RangeReader:
        """A resumable reader of bytes [start, end); `etag` makes even the first GET conditional."""
        bucket, key = split(uri)
        return S3RangeReader(
            self.client, bucket, key, start, end=end, etag=etag, attempts=self.settings.max_attempts,
            on_retry=self.count_retry, wait_initial=self.settings.resume_wait_initial,
            translate=self.errors, traffic=self.traffic,
        )

    def exists(self, uri: str) -> bool:
        """An object, or a folder with at least one object under it."""
        bucket, key = split(uri)
        c = self.client
        with self.errors(uri):
            if key and not key.endswith("/"):
                try:
                    c.head_object(Bucket=bucket, Key=key)
                    return True
                except c.exceptions.ClientError as e:
                    if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                        raise
            prefix = key.rstrip("/") + "/" if key else ""
            return bool(c.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0))

    def bucket_exists(self, uri: str) -> bool:
        """HeadBucket: False for a bucket that does not exist; access denied and the like raise."""
        bucket, _ = split(uri)
        c = self.client
        with self.errors(uri):
            try:
                c.head_bucket(Bucket=bucket)
                return True
            except c.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                return False

    # --- writing -------------------------------------------------------------------------

    def put(self, uri: str, data: bytes) -> None:
        bucket, key = split(uri)
        with self.errors(uri):
            self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def _transfer(self) -> Any:
        s = self.settings
        return create_transfer_manager(self.client, TransferConfig(
            multipart_threshold=s.multipart_chunksize, multipart_chunksize=s.multipart_chunksize,
            max_concurrency=s.max_concurrency, use_threads=True,
        ))

    def upload_dir(self, local_dir: Path, uri: str) -> None:
        """Every file under `local_dir` to `uri/<relative path>`, files and parts in parallel."""
        bucket, key = split(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        with self.errors(uri), self._transfer() as tm:
            futures = [tm.upload(str(p), bucket, prefix + p.relative_to(local_dir).as_posix()) for p in files]
            for f in futures:
                f.result()

    def download_dir(self, uri: str, local_dir: Path) -> None:
        """Every object under the folder `uri` to `local_dir/<relative key>`, in parallel."""
        bucket, key = split(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        with self.errors(uri):
            keys = list(self._keys(bucket, prefix))
        if not keys:
            raise InputError(f"{uri}: no objects under this prefix")
        with self.errors(uri), self._transfer() as tm:
            futures = []
            for k, _size, _etag in keys:
                dest = Path(local_dir) / k[len(prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                futures.append(tm.download(bucket, k, str(dest)))
            for f in futures:
                f.result()

    def download_file(self, uri: str, path: Path) -> None:
        """One object to `path` (large ones in parallel ranged parts)."""
        bucket, key = split(uri)
        with self.errors(uri), self._transfer() as tm:
            tm.download(bucket, key, str(path)).result()

    def delete(self, uri: str) -> None:
        """Delete the one object `uri`; a missing one is not an error (S3 says 204 either way)."""
        bucket, key = split(uri)
        with self.errors(uri):
            self.client.delete_object(Bucket=bucket, Key=key)

    def delete_prefix(self, uri: str) -> None:
        """Delete every object in the folder `uri` (1000 keys per request)."""
        bucket, key = split(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        with self.errors(uri):
            keys = [k for k, _, _ in self._keys(bucket, prefix)]
            for i in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[i:i + 1000]]
                resp = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                if resp.get("Errors"):
                    e = resp["Errors"][0]
                    raise InputError(f"s3://{bucket}/{e.get('Key')}: delete failed: {e.get('Code')}")


class _LazySecrets:
    """Iterable resolved only when an error message is actually built."""

    def __init__(self, owner: S3Client) -> None:
        self._owner = owner

    def __iter__(self) -> Iterator[str]:
        try:
            return iter(self._owner.secrets())
        except Exception:  # resolving credentials failed: nothing more to mask than the env
            return iter(())


def settings_from(cfg: S3Config | None, **overrides: Any) -> S3Settings:
    base = S3Settings()
    if cfg is not None:
        base = S3Settings(endpoint_url=cfg.endpoint_url, region=cfg.region, max_attempts=cfg.max_attempts)
    for k, v in overrides.items():
        setattr(base, k, v)
    return base
