"""The shard index: rows per shard and where each row starts, built once per data set version.

Why an index: without one, every rank of every attempt read every JSONL shard whole just to
count its rows, and then read every shard's bytes to keep 1/world of the rows. With it a
rank knows, before reading any data, how many rows there are and the byte range of each of
its own rows, so it fetches only those (ranged GETs) and starts in the time of a few
requests, whatever the data set's size.

What is stored, under the index prefix (`data.indexUri`, default `<checkpoint.uri>/data-index/`):
- `<h>/<etag>-<size>.json` per shard (h = hash of the shard URI): rows, blank-line runs
  (so a row id is still the `file:line` an editor shows), Parquet row-group sizes. Written
  last, so its presence means the entry is complete.
- `<h>/<etag>-<size>.offsets` for plain JSONL: the start byte of every row and the shard's
  end, little-endian uint64 (8 bytes a row; about 2-5% of typical preference rows). A rank
  fetches just the slice of one block of rows it needs with one small ranged GET, so no
  rank ever loads a billion-row index, and nothing else of it stays in memory.
- `manifest-<fingerprint>.json`: every shard's entry for one exact shard list (URIs, sizes,
  ETags), so a later attempt starts with one GET instead of one per shard.

Why offsets of every row and not every K rows: the global order shuffles rows within a
window, so a rank's rows are isolated; with an offset every K rows it would read up to K-1
rows of other ranks for each of its own (at K = 64 that is the whole data set again).

Compressed JSONL (.gz, .bz2) has no byte offsets: a deflate stream cannot be entered in the
middle without a 32 KiB dictionary per restart point and bit-level positioning, which
Python's zlib does not expose (no inflatePrime). Such shards are indexed by row count only
and read from their start by the ranks that need rows of them (index.py counts, stream.py
reads). At scale, use plain JSONL or Parquet; the README says so.

Keys: a shard's entry is keyed by its ETag and size (S3) or mtime and size (local files), so
a shard replaced in place gets a new key and is indexed again; a stale entry is never read
for new bytes. Ranged reads carry `If-Match: <ETag>`, so a shard replaced after listing is
refused, not spliced.

Parallel build: each rank indexes its share of the missing shards (balanced by size), a
barrier, then every rank reads the entries its peers wrote; rank 0 writes the manifest.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import logging
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from .. import storage
from ..errors import InputError
from .shards import Shard

log = logging.getLogger(__name__)

INDEX_VERSION = 1
CHUNK = 8 * 1024 * 1024  # bytes read per step while indexing


@dataclass(frozen=True)
class ShardIndex:
    """One shard's entry: enough to place any of its rows, without its offsets."""

    shard: Shard
    rows: int
    blanks: list[list[int]] = field(default_factory=list)  # [[row, blank lines before it so far], ...]
    row_groups: list[int] = field(default_factory=list)  # Parquet rows per group

    def line(self, row: int) -> int:
        """0-based physical line of JSONL row `row` (blank lines are not rows but count as lines)."""
        extra = 0
        lo, hi = 0, len(self.blanks)
        while lo < hi:  # the last run starting at or before `row`
            mid = (lo + hi) // 2
            if self.blanks[mid][0] <= row:
                extra, lo = self.blanks[mid][1], mid + 1
            else:
                hi = mid
        return row + extra

    def to_json(self) -> dict[str, Any]:
        return {"version": INDEX_VERSION, "shard": self.shard.key(), "kind": self.shard.kind, "rows": self.rows,
                "blanks": self.blanks, "row_groups": self.row_groups}

    @classmethod
    def from_json(cls, shard: Shard, d: dict[str, Any]) -> ShardIndex | None:
        if d.get("version") != INDEX_VERSION or d.get("shard") != shard.key():
            return None  # another version of the shard or of the format: never mixed
        return cls(shard, int(d["rows"]), d.get("blanks", []), d.get("row_groups", []))


def _slug(etag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", etag) or "none"


class IndexStore:
    """Reads and writes index entries under one prefix; caches block offsets (bounded LRU)."""

    def __init__(self, uri: str, max_blocks: int = 64) -> None:
        self.uri = uri.rstrip("/")
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.index_seconds = 0.0  # time this process spent building entries
        self.indexed_bytes = 0

    def _base(self, shard: Shard) -> str:
        h = hashlib.sha256(shard.uri.encode()).hexdigest()[:20]
        return storage.join(self.uri, h, f"{_slug(shard.etag)}-{shard.size}")

    def _manifest_uri(self, shards: list[Shard]) -> str:
        fp = hashlib.sha256(json.dumps([s.key() for s in shards]).encode()).hexdigest()[:24]
        return storage.join(self.uri, f"manifest-{fp}.json")

    # --- entries ------------------------------------------------------------------------

    def load(self, shard: Shard) -> ShardIndex | None:
        uri = self._base(shard) + ".json"
        if not storage.exists(uri):
            return None
        return ShardIndex.from_json(shard, json.loads(storage.read_bytes(uri)))

    def build(self, shard: Shard) -> ShardIndex:
        """Read the shard once and write its entry (offsets first, the JSON last)."""
        t0 = time.perf_counter()
        if shard.kind == "parquet":
            entry = _parquet_entry(shard)
        else:
            rows, blanks, offsets = _scan_lines(shard)
            entry = ShardIndex(shard, rows, blanks)
            if shard.kind == "jsonl":
                storage.write_bytes(self._base(shard) + ".offsets", offsets.astype("<u8").tobytes())
        storage.write_bytes(self._base(shard) + ".json", json.dumps(entry.to_json()).encode())
        self.index_seconds += time.perf_counter() - t0
        self.indexed_bytes += shard.size
        log.info("indexed %s: %d rows in %.2fs", shard.uri, entry.rows, time.perf_counter() - t0)
        return entry

    def ensure(self, shards: list[Shard], rank: int = 0, world: int = 1,
               barrier: Callable[[], None] = lambda: None, threads: int = 4) -> list[ShardIndex]:
        """Entries of every shard: from the manifest, else built in parallel across ranks.

        Every rank must call it (it contains a barrier). A shard a peer should have indexed but
        did not (no barrier between independent processes) is indexed here.
        """
        manifest = self._manifest_uri(shards)
        if storage.exists(manifest):
            data = json.loads(storage.read_bytes(manifest))
            cached = [ShardIndex.from_json(s, d) for s, d in zip(shards, data["entries"], strict=True)]
            if all(e is not None for e in cached):
                return [e for e in cached if e is not None]
        mine = [s for i, s in enumerate(shards) if i in _share(shards, rank, world)]
        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(lambda s: self.load(s) or self.build(s), mine))
        barrier()
        with ThreadPoolExecutor(max(1, threads)) as pool:
            found = list(pool.map(self.load, shards))
        entries = [e if e is not None else self.build(s) for s, e in zip(shards, found, strict=True)]
        if rank == 0:
            storage.write_bytes(manifest, json.dumps({"entries": [e.to_json() for e in entries]}).encode())
        barrier()
        return entries

    # --- offsets ------------------------------------------------------------------------

    def offsets(self, shard: Shard, first: int, count: int) -> np.ndarray:
        """Start bytes of rows first..first+count-1 plus the end of the last: (count + 1,) uint64."""
        key = (shard.uri, first)
        got = self._blocks.get(key)
        if got is not None and len(got) >= count + 1:
            self._blocks.move_to_end(key)
            return got[:count + 1]
        raw = storage.read_range(self._base(shard) + ".offsets", 8 * first, 8 * (first + count + 1))
        arr = np.frombuffer(raw, dtype="<u8")
        if len(arr) != count + 1:
            raise InputError(f"{self._base(shard)}.offsets: index entry is truncated; delete it to rebuild")
        self._blocks[key] = arr
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
        return arr


def _share(shards: list[Shard], rank: int, world: int) -> set[int]:
    """Shard positions rank `rank` indexes: greedy by size, so big shards spread over ranks."""
    load = [0] * world
    owner: dict[int, int] = {}
    for i in sorted(range(len(shards)), key=lambda i: (-shards[i].size, i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + shards[i].size + 1
    return {i for i, r in owner.items() if r == rank}


def _decoded(shard: Shard, raw: BinaryIO) -> BinaryIO:
    if shard.kind == "gzip":
        return gzip.open(raw, "rb")  # type: ignore[return-value]
    if shard.kind == "bz2":
        return bz2.open(raw, "rb")  # type: ignore[return-value]
    return raw


def _chunks(shard: Shard) -> Iterator[bytes]:
    try:
        with storage.open_range(shard.uri, 0, etag=shard.etag) as raw, _decoded(shard, raw) as f:
            while chunk := f.read(CHUNK):
                yield chunk
    except (gzip.BadGzipFile, zlib.error, EOFError, OSError) as err:
        if isinstance(err, ConnectionError | TimeoutError):
            raise
        raise InputError(f"{shard.uri}: unreadable shard: {type(err).__name__}: {err}") from None


def _scan_lines(shard: Shard) -> tuple[int, list[list[int]], np.ndarray]:
    """(rows, blank-line runs, start byte of every row + end) in one streaming pass.

    Newlines are found with numpy (a 2M-row shard in about a second); only short lines and
    lines that start with whitespace are looked at in Python to tell blank lines from rows.
    """
    starts: list[np.ndarray] = []
    blanks: list[list[int]] = []
    rows = blank_total = 0
    base = 0  # byte offset of `carry`'s first byte
    carry = b""
    check_first = shard.kind == "jsonl" and shard.uri.lower().endswith(".json")
    for chunk in [*_chunks(shard), None]:
        final = chunk is None
        data = carry if chunk is None else carry + chunk
        buf = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(buf == 10) + 1
        if final and len(data) and (not len(ends) or ends[-1] < len(data)):
            ends = np.append(ends, len(data))  # a last line without a newline
        if len(ends):
            line_starts = np.concatenate(([0], ends[:-1]))
            keep = np.ones(len(ends), dtype=bool)
            maybe = np.flatnonzero((ends - line_starts <= 2) | np.isin(buf[line_starts], (9, 13, 32)))
            for j in maybe:
                if not data[line_starts[j]:ends[j]].strip():
                    keep[j] = False
            kept_before = np.cumsum(keep) - keep  # rows kept before each line of this chunk
            for j in np.flatnonzero(~keep):
                blank_total += 1
                row_at = rows + int(kept_before[j])
                if blanks and blanks[-1][0] == row_at:
                    blanks[-1][1] = blank_total
                else:
                    blanks.append([row_at, blank_total])
            kept = line_starts[keep]
            if check_first and len(kept):
                _check_json_lines(shard, data[kept[0]:ends[keep][0]])
                check_first = False
            starts.append(kept.astype(np.uint64) + np.uint64(base))
            rows += len(kept)
            consumed = int(ends[-1])
        else:
            consumed = 0
        carry = data[consumed:]
        base += consumed
        if final:
            break
    end = np.array([base + len(carry)], dtype=np.uint64)
    return rows, blanks, np.concatenate([*starts, end])


def _check_json_lines(shard: Shard, first_line: bytes) -> None:
    """A `.json` shard must be JSON Lines; a JSON document (array, pretty-printed) is refused."""
    try:
        ok = isinstance(json.loads(first_line), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise InputError(f"{shard.uri}: a .json shard must be JSON Lines (one JSON object per line); line 1 "
                         "is not an object on its own line. Convert it to .jsonl")


def _parquet_entry(shard: Shard) -> ShardIndex:
    import pyarrow.parquet as pq

    try:
        with storage.open_range(shard.uri, 0, etag=shard.etag) as f:
            meta = pq.ParquetFile(f).metadata
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    except (OSError, ValueError) as err:
        if isinstance(err, ConnectionError | TimeoutError):
            raise
        raise InputError(f"{shard.uri}: unreadable shard: {type(err).__name__}: {err}") from None
    return ShardIndex(shard, sum(groups), [], groups)
