"""Preference data: shard readers and TRL row formats, tokenization, collation, the resumable stream.

shards.py (which objects are shards) -> index.py (rows and row offsets, built once) ->
order.py (the global order) -> rows.py (ranged reads of a rank's rows) -> formats.py (TRL row
formats, validated) -> tokenize.py (ids, truncation counted) -> collate.py (the (2B, T)
batch); stream.py puts them together per rank.
"""

from .collate import collate
from .formats import BadRecord, PreferenceRow, parse_row
from .stream import Group, PreferenceStream
from .tokenize import DataStats, TokenizedRow, tokenize_row

__all__ = [
    "BadRecord", "DataStats", "Group", "PreferenceRow", "PreferenceStream", "TokenizedRow",
    "collate", "parse_row", "tokenize_row",
]
