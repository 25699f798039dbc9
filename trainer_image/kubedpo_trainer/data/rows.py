"""Fetch given rows of given shards: ranged reads for JSONL, blocks for compressed, row groups for Parquet.

The stream asks for a micro-batch's rows as (shard position, row) pairs. Plain JSONL rows
are located with the index's offsets and read with bounded ranged GETs (adjacent rows in
one request, up to `threads` requests in flight), so a rank downloads its own rows and
nothing else. Compressed JSONL is decoded from the shard's start up to the block holding
the row (blocks kept in a bounded LRU); Parquet is read one row group at a time (bounded
LRU of decoded groups). Every read carries the indexed ETag: a shard replaced since it was
indexed is an InputError naming it, never rows of two versions.
"""

from __future__ import annotations

import bz2
import gzip
import json
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import storage
from ..errors import InputError
from .formats import BadRecord
from .index import IndexStore, ShardIndex

MAX_COALESCED = 4 * 1024 * 1024  # bytes of one ranged GET at most


def parse_line(line: bytes) -> Any:
    """A JSON value, or a BadRecord saying why the line is not one (the stream names file:line)."""
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return BadRecord(f"not valid JSON: {err}")


class RowFetcher:
    """Reads rows by (shard position, row index); holds only bounded caches."""

    def __init__(self, entries: list[ShardIndex], index: IndexStore, block_rows: int, threads: int = 8,
                 max_groups: int = 8) -> None:
        self.entries, self.index, self.block_rows = entries, index, block_rows
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kubedpo-rows")
        self._blocks: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()  # decoded compressed blocks
        self._groups: OrderedDict[tuple[int, int], list[dict[str, Any]]] = OrderedDict()  # Parquet row groups
        self._max_blocks, self._max_groups = index.max_blocks, max_groups

    def row_id(self, s: int, row: int) -> str:
        e = self.entries[s]
        return f"{e.shard.uri}:{row if e.shard.kind == 'parquet' else e.line(row) + 1}"

    def fetch(self, located: list[tuple[int, int]]) -> list[tuple[str, Any]]:
        """(row id, raw JSON or BadRecord) for each (shard, row), in the given order."""
        raws: dict[tuple[int, int], Any] = {}
        plain = [loc for loc in located if self.entries[loc[0]].shard.kind == "jsonl"]
        if plain:
            raws.update(self._ranged(plain))
        for s, row in located:
            kind = self.entries[s].shard.kind
            if kind == "parquet":
                raws[(s, row)] = self._parquet_row(s, row)
            elif kind != "jsonl":
                raws[(s, row)] = parse_line(self._compressed_line(s, row))
        return [(self.row_id(s, row), raws[(s, row)]) for s, row in located]

    # --- plain JSONL: ranged GETs -------------------------------------------------------

    def _ranged(self, located: list[tuple[int, int]]) -> dict[tuple[int, int], Any]:
        spans: list[tuple[int, int, int, int]] = []  # shard, start, end, row
        for s, row in set(located):
            first = row - row % self.block_rows
            count = min(self.block_rows, self.entries[s].rows - first)
            offs = self.index.offsets(self.entries[s].shard, first, count)
            spans.append((s, int(offs[row - first]), int(offs[row - first + 1]), row))
        spans.sort()
        requests: list[list[tuple[int, int, int, int]]] = []
        for span in spans:
            last = requests[-1][-1] if requests else None
            if (last is not None and last[0] == span[0] and last[2] == span[1]
                    and span[2] - requests[-1][0][1] <= MAX_COALESCED):
                requests[-1].append(span)
            else:
                requests.append([span])
        out: dict[tuple[int, int], Any] = {}
        for group, data in zip(requests, self._pool.map(self._get, requests), strict=True):
            base = group[0][1]
            for s, start, end, row in group:
                out[(s, row)] = parse_line(data[start - base:end - base])
        return out

    def _get(self, group: list[tuple[int, int, int, int]]) -> bytes:
        shard = self.entries[group[0][0]].shard
        data = storage.read_range(shard.uri, group[0][1], group[-1][2], etag=shard.etag)
        if len(data) != group[-1][2] - group[0][1]:
            raise InputError(f"{shard.uri}: shorter than its index says (changed since it was indexed?)")
        return data

    # --- compressed JSONL: decoded by block from the start ------------------------------

    def _compressed_line(self, s: int, row: int) -> bytes:
        b = row // self.block_rows
        key = (s, b)
        block = self._blocks.get(key)
        if block is None:
            block = self._decode_block(s, b)
            self._blocks[key] = block
            while len(self._blocks) > self._max_blocks:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return block[row - b * self.block_rows]

    def _decode_block(self, s: int, b: int) -> list[bytes]:
        first, shard = b * self.block_rows, self.entries[s].shard
        out: list[bytes] = []
        try:
            for i, line in enumerate(_rows_of(shard.uri, shard.kind, shard.etag)):
                if i >= first:
                    out.append(line)
                    if len(out) == self.block_rows:
                        break
        except (gzip.BadGzipFile, zlib.error, EOFError, OSError) as err:
            if isinstance(err, ConnectionError | TimeoutError):
                raise
            raise InputError(f"{shard.uri}: unreadable shard: {type(err).__name__}: {err}") from None
        expected = min(self.block_rows, self.entries[s].rows - first)
        if len(out) != expected:
            raise InputError(f"{shard.uri}: has fewer rows than its index says (changed since it was indexed?)")
        return out

    # --- Parquet: row groups ------------------------------------------------------------

    def _parquet_row(self, s: int, row: int) -> dict[str, Any]:
        groups = self.entries[s].row_groups
        g, base = 0, 0
        while base + groups[g] <= row:
            base += groups[g]
            g += 1
        key = (s, g)
        rows = self._groups.get(key)
        if rows is None:
            import pyarrow.parquet as pq

            shard = self.entries[s].shard
            with storage.open_range(shard.uri, 0, etag=shard.etag) as f:
                rows = pq.ParquetFile(f).read_row_group(g).to_pylist()
            self._groups[key] = rows
            while len(self._groups) > self._max_groups:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(key)
        return rows[row - base]


def _rows_of(uri: str, kind: str, etag: str) -> Iterator[bytes]:
    """Non-blank lines of a compressed JSONL shard, streamed."""
    with storage.open_range(uri, 0, etag=etag) as raw:
        f: Any = gzip.open(raw, "rb") if kind == "gzip" else bz2.open(raw, "rb")
        with f:
            for line in f:
                if line.strip():
                    yield line
