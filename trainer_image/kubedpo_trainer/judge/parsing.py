"""A judge's answer -> a verdict, a score, or an honest "no verdict" (unparseable or refusal).

The verdict is the LAST marker in the answer: judges often restate the format ("output [[A]]
if ..., [[B]] if ...") before deciding, and MT-bench-style prompts ask for the verdict at the
end. An answer with no marker is a refusal when the endpoint says so (a `refusal` message or a
content-filter finish) or when it reads like one; otherwise it is unparseable. Neither ever
becomes a pair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

PairVerdict = Literal["A", "B", "tie", "unparseable", "refusal"]
PointKind = Literal["score", "unparseable", "refusal"]

SCORE_MIN, SCORE_MAX = 1.0, 10.0

_PAIR_MARKER = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_SCORE_MARKER = re.compile(r"\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*10\s*)?\]\]")
_REFUSAL = re.compile(
    r"^\W*(i\s*(?:'m| am)\s+(?:sorry|unable|not able)|i\s+(?:can(?:no|')t|cannot|won't|will not|"
    r"must decline|do not feel comfortable|don't feel comfortable)|sorry,|as an ai\b|"
    r"i\s+apologi[sz]e)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Answer:
    """What the endpoint returned for one request (cached as such; parsing is redone on read, so
    a better parser applies to old answers too)."""

    text: str
    refusal: bool = False  # the API's own signal: message.refusal set, or finish_reason content_filter
    tokens: int = 0        # prompt + completion tokens, when the endpoint reports usage


def looks_like_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text.strip()))


def parse_pairwise(answer: Answer) -> PairVerdict:
    """[[A]], [[B]] or [[tie]] (MT-bench's [[C]] is a tie too); the last marker wins."""
    found = _PAIR_MARKER.findall(answer.text)
    if found:
        last = found[-1].upper()
        return "tie" if last in ("C", "TIE") else ("A" if last == "A" else "B")
    if answer.refusal or looks_like_refusal(answer.text):
        return "refusal"
    return "unparseable"


def parse_pointwise(answer: Answer) -> tuple[PointKind, float | None]:
    """("score", n) for the last [[n]] with 1 <= n <= 10 (also [[n/10]]); an out-of-range score is
    unparseable, never clipped into the scale."""
    found = _SCORE_MARKER.findall(answer.text)
    if found:
        score = float(found[-1])
        if SCORE_MIN <= score <= SCORE_MAX:
            return "score", score
        return "unparseable", None
    if answer.refusal or looks_like_refusal(answer.text):
        return "refusal", None
    return "unparseable", None
