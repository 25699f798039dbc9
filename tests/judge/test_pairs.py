"""Scores and verdicts -> pairs: equal scores, ties, refusals and order-dependent verdicts never make one."""

from __future__ import annotations

from collections import Counter

import pytest

from kubedpo_trainer.judge.pairs import (
    Pair,
    combine_orders,
    make_pairs,
    pointwise,
    tournament,
    win_outcome,
    win_rate,
)

R = ["r0", "r1", "r2", "r3"]


@pytest.mark.parametrize(("first", "second", "combined"), [
    ("A", "B", "i"),            # i first and preferred, then i second and preferred
    ("B", "A", "j"),
    ("tie", "tie", "tie"),
    ("A", "A", "inconsistent"),  # the judge prefers whatever comes first
    ("A", "tie", "inconsistent"),
    ("A", "unparseable", "unparseable"),
    ("refusal", "unparseable", "refusal"),
    ("A", None, "i"),            # one order only
    ("tie", None, "tie"),
])
def test_both_orders(first: str, second: str | None, combined: str) -> None:
    assert combine_orders(first, second) == combined  # type: ignore[arg-type]


def test_tournament_copeland_scores_and_verdict_counts() -> None:
    # 0 beats 1 and 2, 1 beats 2, 3 only has order-dependent or unparseable comparisons
    scored = tournament(4, {(0, 1): "i", (0, 2): "i", (1, 2): "i", (0, 3): "inconsistent",
                            (1, 3): "unparseable", (2, 3): "refusal"})
    assert scored.scores == [2.0, 0.0, -2.0, None]
    assert scored.verdicts == Counter(pair=3, inconsistent=1, unparseable=1, refusal=1)
    assert make_pairs(scored.scores, R, "bestVsWorst", 0.0) == [Pair(0, 2, 4.0)]


def test_all_ties_make_no_pair() -> None:
    scored = tournament(3, {(0, 1): "tie", (0, 2): "tie", (1, 2): "tie"})
    assert scored.scores == [0.0, 0.0, 0.0]
    assert scored.verdicts == Counter(tie=3)
    assert make_pairs(scored.scores, R[:3], "bestVsWorst", 0.0) == []
    assert make_pairs(scored.scores, R[:3], "allAboveMargin", 0.0) == []


def test_pointwise_counts_unscored_by_reason_and_scored_pairs() -> None:
    scored = pointwise([("score", 10.0), ("score", 3.0), ("unparseable", None), ("score", 3.0),
                        ("refusal", None)])
    assert scored.scores == [10.0, 3.0, None, 3.0, None]
    assert scored.verdicts == Counter(pair=2, tie=1, unparseable=1, refusal=1)


def test_best_vs_worst_and_all_above_margin() -> None:
    scores = [10.0, 3.0, 1.0, 10.0]
    assert make_pairs(scores, R, "bestVsWorst", 0.0) == [Pair(0, 2, 9.0)]
    assert make_pairs(scores, R, "bestVsWorst", 9.0) == []  # must exceed minMargin
    assert make_pairs(scores, R, "allAboveMargin", 0.0) == [
        Pair(0, 1, 7.0), Pair(0, 2, 9.0), Pair(1, 2, 2.0), Pair(3, 1, 7.0), Pair(3, 2, 9.0)]
    assert make_pairs(scores, R, "allAboveMargin", 5.0) == [
        Pair(0, 1, 7.0), Pair(0, 2, 9.0), Pair(3, 1, 7.0), Pair(3, 2, 9.0)]


def test_identical_texts_never_pair_and_too_few_scores_make_none() -> None:
    assert make_pairs([9.0, 2.0], ["same", "same"], "bestVsWorst", 0.0) == []
    assert make_pairs([9.0, None], ["a", "b"], "bestVsWorst", 0.0) == []
    assert make_pairs([None, None], ["a", "b"], "allAboveMargin", 0.0) == []


def test_win_rate_ties_count_half_and_unjudged_are_left_out() -> None:
    outcomes = Counter(win_outcome(v) for v in ["i", "i", "j", "tie", "inconsistent", "unparseable", "refusal"])
    assert outcomes == Counter(win=2, loss=1, tie=2, unjudged=2)
    assert win_rate(outcomes) == pytest.approx((2 + 0.5 * 2) / 5)
    assert win_rate(Counter(unjudged=3)) is None

