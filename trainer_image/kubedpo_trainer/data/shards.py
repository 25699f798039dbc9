"""Which objects under a data prefix are shards, of which kind, and at which version.

Nothing under a data prefix is skipped silently. Shard names are matched case-insensitively:

| suffix | kind | how it is read |
|---|---|---|
| `.jsonl`, `.ndjson`, `.json` | jsonl | ranged GETs of single rows (`.json` must be JSON Lines: checked when indexed) |
| the same + `.gz` | gzip | streamed from the start (see index.py for why) |
| the same + `.bz2` | bz2 | streamed from the start |
| `.parquet` | parquet | by row group |

Markers and notes that tools write next to data (`_SUCCESS`, `_committed_*`, `.crc` files,
names starting with `_` or `.`, README/LICENSE/`*.md`/`*.txt`) are ignored and logged once.
Anything else (`.csv`, `.zst`, `.arrow`, ...) is an InputError naming the object: a user who
put rows there expects them trained, and dropping them would lie about the data set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from .. import storage
from ..errors import InputError

log = logging.getLogger(__name__)

Kind = Literal["jsonl", "gzip", "bz2", "parquet"]
_LINES = (".jsonl", ".ndjson", ".json")
_COMPRESSED: dict[str, Kind] = {".gz": "gzip", ".bz2": "bz2"}
_NOTES = ("readme", "license", "notice", "changelog")
_NOTE_SUFFIXES = (".md", ".txt", ".rst", ".crc", ".yaml", ".yml")


@dataclass(frozen=True)
class Shard:
    """One data object at one version: (uri, size, etag) is what the index is keyed by."""

    uri: str
    size: int
    etag: str
    kind: Kind

    def key(self) -> list[object]:
        return [self.uri, self.size, self.etag]


def kind_of(uri: str) -> Kind | None:
    """The shard kind of an object name; None for a marker or note; InputError for anything else."""
    name = uri.rsplit("/", 1)[-1]
    low = name.lower()
    if low.startswith(("_", ".")) or low.startswith(_NOTES) or low.endswith(_NOTE_SUFFIXES):
        return None
    if low.endswith(".parquet"):
        return "parquet"
    for ext, kind in _COMPRESSED.items():
        if low.endswith(ext) and low.removesuffix(ext).endswith(_LINES):
            return kind
    if low.endswith(_LINES):
        return "jsonl"
    raise InputError(
        f"{uri}: not a supported data shard (supported, any case: .jsonl/.ndjson/.json JSON Lines, "
        "optionally .gz or .bz2, and .parquet); move it out of the data prefix or convert it"
    )


def list_shards(uri: str) -> list[Shard]:
    """Every shard under `uri` (a prefix, folder or single object), sorted; markers logged once."""
    shards, ignored = [], []
    for o in storage.list_objects(uri):
        kind = kind_of(o.uri)
        if kind is None:
            ignored.append(o.uri)
        else:
            shards.append(Shard(o.uri, o.size, o.etag, kind))
    if ignored:
        log.info("%s: ignoring %d non-data object(s): %s", uri, len(ignored), ", ".join(ignored[:5]))
    if not shards:
        raise InputError(f"{uri}: no data shards under this prefix (only {', '.join(ignored[:5])})")
    return shards
