"""One interface over local paths and s3:// URIs for data shards, models, checkpoints and output.

The rest of the trainer only calls these functions; each dispatches on the URI: local paths
(or file://) here, s3:// to `s3.S3Client` (shared boto3 client, standard retries, resumable
ranged reads). `configure(cfg.s3)` is called once by the trainer; without it S3 uses
boto3's defaults (AWS_ENDPOINT_URL, AWS_REGION, ...) and 8 attempts.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .config import S3Config
from .errors import InputError
from .s3 import S3Client, settings_from

READ_BUFFER = 1024 * 1024  # bytes per ranged-GET read: big enough for full-speed streaming
COMPLETE_MARKER = ".kubedpo-download-complete"


class _Backend:
    """Holds the one S3 client of this process; replaced as a whole by `configure`."""

    s3 = S3Client()


def configure(s3_cfg: S3Config | None = None, on_retry: Callable[[int], None] | None = None,
              keep_count: bool = False, **overrides: Any) -> None:
    """Set the S3 endpoint, region and attempts (and timeouts, via `overrides`) for this process.

    `on_retry(total)` is called after every retried S3 request, resumed body or s3transfer
    retry; the retry total so far is also available from `retry_count()`. Resets the counter,
    unless `keep_count` (the trainer counts on from the CLI's start-up checks); with a kept count
    `on_retry` hears the total at once.
    """
    prior = _Backend.s3.retries if keep_count else 0
    _Backend.s3 = S3Client(settings_from(s3_cfg, **overrides), on_retry=on_retry, _retries=prior)
    if prior and on_retry is not None:
        on_retry(prior)


def retry_count() -> int:
    """S3 retries (botocore's and body resumes) since `configure`: kubedpo_s3_retries_total."""
    return _Backend.s3.retries


def traffic() -> tuple[int, int]:
    """(GET requests, body bytes) the S3 readers of this process received since `configure`."""
    t = _Backend.s3.traffic
    return t.gets, t.bytes


@dataclass(frozen=True)
class ObjectInfo:
    """An object and its version: the S3 ETag, or `mtime-<ns>` for a local file."""

    uri: str
    size: int
    etag: str = ""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def list_objects(uri: str, suffixes: tuple[str, ...] | None = None) -> list[ObjectInfo]:
    """Objects under a prefix/folder (or the single object `uri`), sorted by URI.

    Raises InputError naming the URI when nothing matches, so an empty data prefix is an
    error, not a run that trains on zero rows. A missing bucket or bad credentials are
    InputError too; an unreachable store after retries is StorageError.
    """
    if is_s3(uri):
        found = [ObjectInfo(u, n, e) for u, n, e in _Backend.s3.list(uri)]
        if suffixes:
            found = [o for o in found if o.uri.endswith(suffixes)]
        if not found:
            wanted = f" ending in {', '.join(suffixes)}" if suffixes else ""
            raise InputError(f"{uri}: no objects{wanted} under this prefix")
        return sorted(found, key=lambda o: o.uri)
    p = _local(uri)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        raise InputError(f"{uri}: no such file or directory")
    if suffixes:
        files = [f for f in files if f.name.endswith(suffixes)]
    if not files:
        wanted = f" ending in {', '.join(suffixes)}" if suffixes else ""
        raise InputError(f"{uri}: no files{wanted}")
    return [ObjectInfo(str(f), st.st_size, f"mtime-{st.st_mtime_ns}") for f in files for st in [f.stat()]]


def versions(uri: str) -> list[tuple[str, int, str]]:
    """(uri, size, version) of the objects under `uri`: the ETag on S3, the mtime in ns locally.

    A fingerprint of a model folder or a data set: equal lists mean the same bytes (as far as
    the store can tell without reading them). Missing: an empty list, not an error.
    """
    if is_s3(uri):
        return _Backend.s3.versions(uri)
    p = _local(uri)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    return [(str(f), f.stat().st_size, str(f.stat().st_mtime_ns)) for f in files]


def open_range(uri: str, start: int = 0, etag: str | None = None) -> BinaryIO:
    """A binary stream from byte `start` to the end of the object.

    For s3:// it is a buffered, seekable reader that resumes broken bodies at the exact byte
    (see s3_reader): iterate it line by line, wrap it in gzip.open, or hand it to
    pyarrow.parquet.ParquetFile.
    """
    if is_s3(uri):
        return io.BufferedReader(_Backend.s3.reader(uri, start, etag=etag or None), buffer_size=READ_BUFFER)
    f = _local(uri).open("rb")
    f.seek(start)
    return f


def read_range(uri: str, start: int, end: int, etag: str | None = None) -> bytes:
    """Bytes [start, end) of an object in one bounded ranged GET (resumed if the body breaks).

    `etag` (S3) makes the GET conditional: an object replaced since it was listed is an
    InputError naming it, never a splice of two versions.
    """
    if end <= start:
        return b""
    if is_s3(uri):
        with _Backend.s3.reader(uri, start, end=end, etag=etag or None) as r:
            return r.read()
    with _local(uri).open("rb") as f:
        f.seek(start)
        return f.read(end - start)


def read_bytes(uri: str) -> bytes:
    with open_range(uri) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; local writes are atomic (temp file + rename), as S3 PUTs are."""
    if is_s3(uri):
        _Backend.s3.put(uri, data)
        return
    p = _local(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # writers may race: each its own
    tmp.write_bytes(data)
    tmp.replace(p)


def exists(uri: str) -> bool:
    """An object/file, or a folder/prefix with something in it."""
    if is_s3(uri):
        return _Backend.s3.exists(uri)
    return _local(uri).exists()


def bucket_exists(uri: str) -> bool:
    """Whether the bucket of the s3:// `uri` exists (HeadBucket); access denied is an InputError."""
    return _Backend.s3.bucket_exists(uri)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder to `uri` (a folder or prefix); S3 uploads files and parts in parallel."""
    if is_s3(uri):
        _Backend.s3.upload_dir(Path(local_dir), uri)
        return
    shutil.copytree(local_dir, _local(uri), dirs_exist_ok=True)


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Make the folder at `uri` available locally; local URIs are used in place.

    s3:// folders go to `local_dir` once: the first process to take the lock file beside it
    downloads and writes a completion marker last; others block on the lock, then see the
    marker and reuse the folder. A downloader that dies releases the lock without writing
    the marker, so the next process downloads again instead of using a partial folder.
    """
    if not is_s3(uri):
        return _local(uri)
    target = Path(local_dir)
    marker = target / COMPLETE_MARKER
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            target.mkdir(parents=True, exist_ok=True)
            _Backend.s3.download_dir(uri, target)
            marker.write_text(uri)
    return target


def download_file(uri: str, path: str | Path) -> None:
    """Copy one object/file to the local `path` (its folder must exist)."""
    if is_s3(uri):
        _Backend.s3.download_file(uri, Path(path))
        return
    shutil.copyfile(_local(uri), path)


def delete(uri: str) -> None:
    """Delete one object/file; a missing one is not an error. (`delete_prefix` would list
    `uri + "/"` and so never remove the object `uri` itself.)"""
    if is_s3(uri):
        _Backend.s3.delete(uri)
        return
    _local(uri).unlink(missing_ok=True)


def delete_prefix(uri: str) -> None:
    """Delete a folder/prefix and everything in it; a missing one is not an error."""
    if is_s3(uri):
        _Backend.s3.delete_prefix(uri)
        return
    shutil.rmtree(_local(uri), ignore_errors=True)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
