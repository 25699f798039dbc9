"""Shard readers (JSONL, JSONL.gz, Parquet) and TRL's preference row formats.

Readers yield (row index, byte offset after the row or -1, raw value) from a starting row,
reading through `storage.open_range` so S3 and local files share one code path. Plain JSONL
starts at a byte offset (one ranged GET, no re-reading); a gzip stream cannot be entered in
the middle, so it is decompressed from its start and rows before `start_row` are skipped
(streaming, never held); Parquet skips whole row groups from the footer's metadata and reads
one row group at a time, never the whole file.

Row index: the physical 0-based line index for JSONL (blank lines count, so `file:line` is
what an editor shows as line index + 1), the 0-based row index for Parquet.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from .. import storage
from ..errors import InputError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".parquet")

Messages = list[dict[str, str]]
Format = Literal["auto", "standard", "conversational", "implicit"]


@dataclass(frozen=True)
class PreferenceRow:
    """One validated pair; prompt/chosen/rejected are all strings or all message lists."""

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


def row_label(uri: str, index: int) -> str:
    """The stable id of a row, `<shard uri>:<line>`: 1-based line for JSONL, row index for Parquet.

    It names the row in errors and in `row_ids` (exactly-once accounting), so it must be
    what a user finds with an editor (`sed -n 12p`) or `pq.read_table(...).slice(12, 1)`.
    """
    return f"{uri}:{index if uri.endswith('.parquet') else index + 1}"


# --- readers --------------------------------------------------------------------------------


def read_rows(uri: str, start_row: int = 0, start_byte: int | None = None) -> Iterator[tuple[int, int, Any]]:
    """Yield (row index, byte offset after the row or -1, raw) from `start_row` on.

    `start_byte` (plain JSONL only) must be the byte where row `start_row` starts, as a
    previous read reported it; it turns the skip into a seek. raw is a dict (or any JSON
    value), or a BadRecord for a line that is not JSON, so the caller can name the line.
    A shard that cannot be decoded at all (corrupt gzip or Parquet) is an InputError naming
    it: retrying will not fix it.
    """
    with _decoding_errors(uri):
        yield from _read_rows(uri, start_row, start_byte)


@contextlib.contextmanager
def _decoding_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except (gzip.BadGzipFile, zlib.error, EOFError, ValueError) as err:
        # Decoding errors only: network errors stay StorageError (retriable) from the reader.
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
    """Rows of a line stream whose first line has index `first_row`; blank lines are skipped."""
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
            if base + n > start_row:  # groups wholly before start_row are never fetched
                for i, rec in enumerate(pf.read_row_group(g).to_pylist()):
                    if base + i >= start_row:
                        yield base + i, -1, rec
            base += n


def count_rows(uri: str) -> int:
    """Rows in a shard: Parquet from its footer; JSONL by one streaming pass over non-blank lines."""
    with _decoding_errors(uri):
        if uri.endswith(".parquet"):
            import pyarrow.parquet as pq

            with storage.open_range(uri) as f:
                return int(pq.ParquetFile(f).metadata.num_rows)
        with storage.open_range(uri) as raw:
            lines: Iterable[bytes] = gzip.open(raw, "rb") if uri.endswith(".gz") else raw
            return sum(1 for line in lines if line.strip())


# --- row formats ----------------------------------------------------------------------------


def parse_row(raw: Any, fmt: Format = "auto") -> PreferenceRow:
    """Validate one raw row into a PreferenceRow in TRL's formats; BadRecord says what is wrong.

    auto decides per row: no `prompt` field means implicit prompt; message lists mean
    conversational. An explicit format is enforced, so a data set that drifted is caught.
    `chosen == rejected` is allowed (it is a valid, if useless, pair).
    """
    if isinstance(raw, BadRecord):
        raise raw
    if not isinstance(raw, dict):
        raise BadRecord(f"expected a JSON object, got {type(raw).__name__}")
    for name in ("chosen", "rejected"):
        if raw.get(name) is None:
            raise BadRecord(f"missing field '{name}'")
    chosen = _text_or_messages(raw["chosen"], "chosen")
    rejected = _text_or_messages(raw["rejected"], "rejected")
    has_prompt = raw.get("prompt") is not None
    if fmt == "implicit" and has_prompt:
        raise BadRecord("format 'implicit' derives the prompt; this row has a 'prompt' field")
    if fmt in ("standard", "conversational") and not has_prompt:
        raise BadRecord(f"missing field 'prompt' (format '{fmt}')")
    if has_prompt:
        prompt = _text_or_messages(raw["prompt"], "prompt")
        if len({type(prompt), type(chosen), type(rejected)}) != 1:
            raise BadRecord("prompt, chosen and rejected must all be strings or all message lists")
    else:
        prompt, chosen, rejected = split_common_prefix(chosen, rejected)
    if fmt == "standard" and not isinstance(chosen, str):
        raise BadRecord("format 'standard' needs string fields")
    if fmt == "conversational" and not isinstance(chosen, list):
        raise BadRecord("format 'conversational' needs message lists")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value:
            raise BadRecord(f"empty '{name}' response" + ("" if has_prompt else " after the shared prefix"))
    margin = _number(raw.get("margin"), "margin", 0.0)
    weight = _number(raw.get("weight"), "weight", 1.0)
    if weight < 0:
        raise BadRecord(f"field 'weight' must be >= 0, got {weight}")
    return PreferenceRow(prompt, chosen, rejected, margin, weight)


def split_common_prefix(chosen: str | Messages, rejected: str | Messages) -> tuple[Any, Any, Any]:
    """Implicit prompt: (prompt, chosen rest, rejected rest), split as TRL's `extract_prompt`.

    Strings split at the longest common character prefix, giving a space just before the
    split to the responses (" animal", not "animal"); message lists split after the common
    leading messages.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        return chosen[:i], chosen[i:], rejected[i:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        if 0 < i and chosen[i - 1] == " " and (i < len(chosen) or i < len(rejected)):
            i -= 1
        return chosen[:i], chosen[i:], rejected[i:]
    raise BadRecord("fields 'chosen' and 'rejected' must both be strings or both message lists")


def _text_or_messages(value: Any, name: str) -> str | Messages:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise BadRecord(f"field '{name}[{i}]' must be a message {{role: str, content: str}}")
        return value
    raise BadRecord(f"field '{name}' must be a string or a non-empty list of {{role, content}} messages, "
                    f"got {type(value).__name__}")


def _number(value: Any, name: str, default: float) -> float:
    if value is None:  # absent, JSON null, or a Parquet null in a column other rows fill
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRecord(f"field '{name}' must be a finite number, got {value!r}")
    return float(value)
