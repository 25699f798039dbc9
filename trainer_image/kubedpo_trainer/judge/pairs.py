"""Verdicts -> scores -> preference pairs (pure: no I/O, no judge).

Counting is per judged item and every item ends in exactly one verdict:
- pairwise: per unordered pair of responses (both orders together when asked twice):
  `pair` (a preference both orders agree on), `tie`, `inconsistent` (the orders disagree:
  position bias), `unparseable` or `refusal` (either answer; refusal wins);
- pointwise: per response, `unparseable` or `refusal` when it got no score; then per pair of
  scored responses `pair` (different scores) or `tie` (equal scores).
Identical responses are a tie without asking (no judge can prefer a text over itself).
A pairwise tournament's scores are Copeland scores: wins minus losses over the decided
comparisons; a response without any decided comparison has no score. Pairs are then made
from scores only, so equal scores never make a pair, and `margin` is the score difference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations

from .parsing import PairVerdict, PointKind

VERDICTS = ("pair", "tie", "unparseable", "refusal", "inconsistent")


@dataclass(frozen=True)
class Pair:
    chosen: int
    rejected: int
    margin: float


@dataclass
class Scored:
    """One prompt's responses after judging."""

    scores: list[float | None]
    verdicts: Counter[str] = field(default_factory=Counter)
    # Judge answers behind each comparison, keyed by the unordered response pair (i < j) in
    # pairwise mode or by the response index (i, i) in pointwise mode: the pair's rationale.
    notes: dict[tuple[int, int], str] = field(default_factory=dict)


def combine_orders(first: PairVerdict, second: PairVerdict | None) -> str:
    """The verdict on (i, j) from "i as A, j as B" (`first`) and, when asked, "j as A, i as B"
    (`second`): "i", "j", "tie", "inconsistent", "unparseable" or "refusal"."""
    answers = [first] if second is None else [first, second]
    if "refusal" in answers:
        return "refusal"
    if "unparseable" in answers:
        return "unparseable"
    as_i = {"A": "i", "B": "j", "tie": "tie"}[first]
    if second is None:
        return as_i
    swapped = {"A": "j", "B": "i", "tie": "tie"}[second]
    return as_i if as_i == swapped else "inconsistent"


def tournament(k: int, outcomes: dict[tuple[int, int], str]) -> Scored:
    """Copeland scores from the combined verdicts of every pair (i < j) of `k` responses."""
    wins, losses, decided = [0] * k, [0] * k, [False] * k
    verdicts: Counter[str] = Counter()
    for (i, j), outcome in outcomes.items():
        if outcome in ("i", "j"):
            winner, loser = (i, j) if outcome == "i" else (j, i)
            wins[winner] += 1
            losses[loser] += 1
            verdicts["pair"] += 1
        elif outcome == "tie":
            verdicts["tie"] += 1
        else:
            verdicts[outcome] += 1
            continue
        decided[i] = decided[j] = True
    scores: list[float | None] = [float(wins[i] - losses[i]) if decided[i] else None for i in range(k)]
    return Scored(scores, verdicts)


def pointwise(results: list[tuple[PointKind, float | None]]) -> Scored:
    """Scores of each response; unscored ones are counted by why, scored ones pair up as
    preferences (different scores) or ties (equal)."""
    verdicts: Counter[str] = Counter()
    scores: list[float | None] = []
    for kind, score in results:
        if kind != "score":
            verdicts[kind] += 1
        scores.append(score if kind == "score" else None)
    for a, b in combinations([s for s in scores if s is not None], 2):
        verdicts["pair" if a != b else "tie"] += 1
    return Scored(scores, verdicts)


def make_pairs(scores: list[float | None], responses: list[str], strategy: str,
               min_margin: float) -> list[Pair]:
    """bestVsWorst: the highest against the lowest score (first index wins ties of rank);
    allAboveMargin: every pair whose scores differ by more than `min_margin`. Either way a pair
    needs scores differing by more than `min_margin` (so never equal) and different texts."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]

    def ok(i: int, j: int) -> bool:
        si, sj = scores[i], scores[j]
        return si is not None and sj is not None and si - sj > min_margin and responses[i] != responses[j]

    if strategy == "bestVsWorst":
        if len(scored) < 2:
            return []
        best = min(scored, key=lambda t: (-t[0], t[1]))[1]
        worst = min(scored, key=lambda t: (t[0], t[1]))[1]
        return [Pair(best, worst, float(scores[best] - scores[worst]))] if ok(best, worst) else []  # type: ignore[operator]
    if strategy == "allAboveMargin":
        out = []
        for (_, i), (_, j) in combinations(scored, 2):
            hi, lo = (i, j) if scores[i] >= scores[j] else (j, i)  # type: ignore[operator]
            if ok(hi, lo):
                out.append(Pair(hi, lo, float(scores[hi] - scores[lo])))  # type: ignore[operator]
        return out
    raise ValueError(f"judge.pairs.strategy: unknown strategy {strategy!r}")


def win_outcome(outcome: str) -> str:
    """A compare verdict (candidate = i) as "win", "loss", "tie" (inconsistent orders count as a
    tie, as in MT-bench) or "unjudged" (unparseable, refusal)."""
    return {"i": "win", "j": "loss", "tie": "tie", "inconsistent": "tie"}.get(outcome, "unjudged")


def win_rate(outcomes: Counter[str]) -> float | None:
    """(wins + ties / 2) / judged comparisons; None when nothing could be judged."""
    judged = outcomes["win"] + outcomes["loss"] + outcomes["tie"]
    return (outcomes["win"] + 0.5 * outcomes["tie"]) / judged if judged else None
