"""One interface over local paths and s3:// URIs for data shards, models, checkpoints and output.

The rest of the trainer only calls these functions, so S3 (issue 4) slots in behind them.
This first version serves local paths; `s3://` support is added in the same functions.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import InputError


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def list_objects(uri: str, suffixes: tuple[str, ...] | None = None) -> list[ObjectInfo]:
    """Objects under a prefix/folder (or the single object `uri`), sorted by URI.

    Raises InputError naming the URI when nothing matches, so an empty data prefix is an
    error, not a run that trains on zero rows.
    """
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
    return [ObjectInfo(str(f), f.stat().st_size) for f in files]


def open_range(uri: str, start: int = 0) -> BinaryIO:
    """A binary stream from byte `start` to the end of the object."""
    f = _local(uri).open("rb")
    f.seek(start)
    return f


def read_bytes(uri: str) -> bytes:
    with open_range(uri) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    p = _local(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(p)


def exists(uri: str) -> bool:
    return _local(uri).exists()


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder to `uri` (a folder or prefix)."""
    shutil.copytree(local_dir, _local(uri), dirs_exist_ok=True)


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Make the folder at `uri` available locally; local URIs are used in place."""
    return _local(uri)


def delete_prefix(uri: str) -> None:
    shutil.rmtree(_local(uri), ignore_errors=True)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
