"""Preference data: shard readers and TRL row formats, tokenization, collation, the resumable stream.

formats.py (rows from JSONL/JSONL.gz/Parquet, validated) -> tokenize.py (ids, truncation
counted) -> collate.py (the (2B, T) batch) ; stream.py puts them together per rank.
"""

from .collate import collate
from .formats import BadRecord, PreferenceRow, parse_row, read_rows
from .stream import Group, PreferenceStream
from .tokenize import DataStats, TokenizedRow, tokenize_row

__all__ = [
    "BadRecord", "DataStats", "Group", "PreferenceRow", "PreferenceStream", "TokenizedRow",
    "collate", "parse_row", "read_rows", "tokenize_row",
]
