"""Shard readers (JSONL, JSONL.gz, Parquet) and TRL's preference row formats.

Readers yield (row index, raw dict) from a starting row, reading through `storage.open_range`
so S3 and local files share one path. Plain JSONL can start at a byte offset (a seek); gzip and
Parquet skip rows (Parquet by whole row groups, read one at a time, never the whole file).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .. import storage
from ..errors import InputError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".parquet")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PreferenceRow:
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    margin: float = 0.0
    weight: float = 1.0

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


class BadRecord(ValueError):
    """A row that cannot be used; the stream adds `file:line` and applies onBadRecord."""


def read_rows(uri: str, start_row: int = 0, start_byte: int | None = None) -> Iterator[tuple[int, int, Any]]:
    """Yield (row index, byte offset after the row or -1, raw) from `start_row` on.

    raw is a dict, or a BadRecord for a line that is not JSON (so the caller can name the line).
    Row index is 0-based; the line number users see is index + 1. A shard that cannot be
    decoded at all (corrupt gzip or Parquet) is an InputError naming it: retrying won't fix it.
    """
    with _decoding_errors(uri):
        yield from _read_rows(uri, start_row, start_byte)


@contextlib.contextmanager
def _decoding_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except (gzip.BadGzipFile, zlib.error, EOFError, ValueError) as err:
        # Only decoding errors: network errors stay StorageError (retriable) from the reader.
        raise InputError(f"{uri}: unreadable shard: {type(err).__name__}: {err}") from None


def _read_rows(uri: str, start_row: int, start_byte: int | None) -> Iterator[tuple[int, int, Any]]:
    if uri.endswith(".parquet"):
        yield from _parquet_rows(uri, start_row)
    elif uri.endswith(".gz"):
        with storage.open_range(uri) as raw, gzip.open(raw, "rb") as f:
            yield from _jsonl(f, 0, start_row, track_bytes=False)
    else:
        offset = start_byte if start_byte is not None else 0
        first = start_row if start_byte is not None else 0
        with storage.open_range(uri, offset) as f:
            yield from _jsonl(f, first, start_row, track_bytes=True, offset=offset)


def _jsonl(f: Any, first_row: int, start_row: int, track_bytes: bool, offset: int = 0) -> Iterator[tuple[int, int, Any]]:
    """Row index = physical line index (so `file:line` is what an editor shows); blank lines skipped."""
    row = first_row
    for line in f:
        offset += len(line)
        if row >= start_row and line.strip():
            try:
                value: Any = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                value = BadRecord(f"not valid JSON: {err}")
            yield row, offset if track_bytes else -1, value
        row += 1


def _parquet_rows(uri: str, start_row: int) -> Iterator[tuple[int, int, Any]]:
    import pyarrow.parquet as pq

    with storage.open_range(uri) as f:
        pf = pq.ParquetFile(f)
        base = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if base + n > start_row:
                for i, rec in enumerate(pf.read_row_group(g).to_pylist()):
                    if base + i >= start_row:
                        yield base + i, -1, rec
            base += n


def count_rows(uri: str) -> int:
    """Rows in a shard (Parquet from metadata; JSONL by a streaming pass counting non-blank lines)."""
    with _decoding_errors(uri):
        return _count_rows(uri)


def _count_rows(uri: str) -> int:
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        with storage.open_range(uri) as f:
            return int(pq.ParquetFile(f).metadata.num_rows)
    with storage.open_range(uri) as raw:
        f = gzip.open(raw, "rb") if uri.endswith(".gz") else raw
        return sum(1 for line in f if line.strip())


def _text_or_messages(value: Any, field: str) -> str | Messages:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return value
    raise BadRecord(f"field '{field}' must be a string or a list of {{role, content}} messages")


def _common_prefix(chosen: str | Messages, rejected: str | Messages) -> tuple[Any, Any, Any]:
    """Implicit prompt: split at the longest shared prefix (TRL's extract_prompt)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        return chosen[:i], chosen[i:], rejected[i:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        if 0 < i < len(chosen) and chosen[i - 1] == " ":
            i -= 1  # keep the space with the response, as TRL does
        return chosen[:i], chosen[i:], rejected[i:]
    raise BadRecord("fields 'chosen' and 'rejected' must both be strings or both message lists")


def parse_row(raw: Any, fmt: str = "auto") -> PreferenceRow:
    """Validate one raw row into a PreferenceRow; BadRecord says what is wrong."""
    if isinstance(raw, BadRecord):
        raise raw
    if not isinstance(raw, dict):
        raise BadRecord(f"expected a JSON object, got {type(raw).__name__}")
    for f in ("chosen", "rejected"):
        if f not in raw:
            raise BadRecord(f"missing field '{f}'")
    chosen = _text_or_messages(raw["chosen"], "chosen")
    rejected = _text_or_messages(raw["rejected"], "rejected")
    implicit = fmt == "implicit" or (fmt == "auto" and raw.get("prompt") is None)
    if implicit:
        prompt, chosen, rejected = _common_prefix(chosen, rejected)
    else:
        if "prompt" not in raw:
            raise BadRecord("missing field 'prompt' (format 'standard'/'conversational')")
        prompt = _text_or_messages(raw["prompt"], "prompt")
    kinds = {type(prompt), type(chosen), type(rejected)}
    if len(kinds) != 1 and not (implicit and isinstance(prompt, list | str)):
        raise BadRecord("prompt, chosen and rejected must all be strings or all message lists")
    if fmt == "standard" and not isinstance(chosen, str):
        raise BadRecord("format 'standard' needs string fields")
    if fmt == "conversational" and not isinstance(chosen, list):
        raise BadRecord("format 'conversational' needs message lists")
    if not chosen or not rejected:
        raise BadRecord("empty 'chosen' or 'rejected' response")
    margin = _number(raw.get("margin", 0.0), "margin")
    weight = _number(raw.get("weight", 1.0), "weight")
    if weight < 0:
        raise BadRecord("field 'weight' must be >= 0")
    return PreferenceRow(prompt, chosen, rejected, margin, weight)


def _number(value: Any, field: str) -> float:
    if value is None:
        return 0.0 if field == "margin" else 1.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRecord(f"field '{field}' must be a number")
    return float(value)
