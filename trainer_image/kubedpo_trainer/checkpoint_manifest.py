"""What a COMPLETE marker promises: every file of a checkpoint with its size and SHA-256.

Why a manifest: COMPLETE alone says "every rank finished uploading", not "these bytes are still
the ones written". A truncated or deleted file, garbage in a state file or bytes flipped inside
tensor data (safetensors and torch.save do not checksum their payload) would otherwise crash
every restart or, worse, resume silently from corrupt weights. Each rank hashes its own files on
its upload thread (off the loop's path) and puts the digests in its `rank-<r>.done` marker; rank 0
merges them into COMPLETE, written last. On resume a checkpoint is checked in two steps: sizes
against the store's listing (cheap: no download), then SHA-256 of the downloaded bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import storage
from .errors import InputError

VERSION = 1
_CHUNK = 1 << 20

# relative path -> {"size": bytes, "sha256": hex}
Files = dict[str, dict[str, Any]]


class Damaged(Exception):
    """A checkpoint fails verification; the message says which file and how."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_dir(local: Path) -> Files:
    """Size and SHA-256 of every file under `local`, keyed by its path relative to it."""
    return {
        f.relative_to(local).as_posix(): {"size": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(local.rglob("*")) if f.is_file()
    }


def merge(parts: list[Files]) -> Files:
    """One manifest from every rank's files. Two ranks naming one file with other bytes is a bug
    in the layout (each file has one writer), never silently resolved."""
    out: Files = {}
    for part in parts:
        for name, entry in part.items():
            if name in out and out[name] != entry:
                raise ValueError(f"{name}: written by two ranks with different contents")
            out[name] = entry
    return out


def complete_record(step: int, files: Files) -> bytes:
    return json.dumps({"step": step, "manifest_version": VERSION, "files": files}, sort_keys=True).encode()


def parse_complete(data: bytes, where: str) -> Files | None:
    """The files a COMPLETE marker lists; None for a marker written before manifests existed."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Damaged(f"{where}: not JSON ({err})") from None
    if not isinstance(record, dict):
        raise Damaged(f"{where}: not a JSON object")
    if "files" not in record:
        return None
    files = record["files"]
    if not isinstance(files, dict) or not files or not all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in files.values()
    ):
        raise Damaged(f"{where}: malformed file list")
    return files


def check_listing(step_uri: str, files: Files, only: set[str] | None = None) -> None:
    """Every listed file exists in the store with its recorded size (no bytes read)."""
    try:
        objects = storage.list_objects(step_uri)
    except InputError:
        objects = []
    prefix = step_uri.rstrip("/") + "/"
    sizes = {o.uri.removeprefix(prefix): o.size for o in objects}
    for name, entry in files.items():
        if only is not None and name not in only:
            continue
        if name not in sizes:
            raise Damaged(f"{name}: missing")
        if sizes[name] != entry["size"]:
            raise Damaged(f"{name}: {sizes[name]} bytes, COMPLETE recorded {entry['size']}")


def check_local(local: Path, files: Files, only: set[str] | None = None) -> None:
    """Every listed file under `local` has its recorded size and SHA-256."""
    for name, entry in files.items():
        if only is not None and name not in only:
            continue
        path = local / name
        if not path.is_file():
            raise Damaged(f"{name}: missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise Damaged(f"{name}: {size} bytes, COMPLETE recorded {entry['size']}")
        if sha256_file(path) != entry["sha256"]:
            raise Damaged(f"{name}: SHA-256 differs from the one recorded in COMPLETE (bytes changed)")
