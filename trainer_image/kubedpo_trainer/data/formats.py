"""TRL's preference row formats: raw JSON values (or Parquet rows) to validated pairs.

Reading shards is shards.py (names), index.py (rows and offsets) and rows.py (fetching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

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
    # An empty answer after an explicit prompt is a real (bad) answer, e.g. a sampled policy that
    # stopped at once: it trains as the EOS token alone, as in TRL. After an implicit prompt an
    # empty rest means the two answers could not be told apart from the shared prefix.
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value and not (has_prompt and isinstance(value, str)):
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
