"""Judge answers -> verdicts and scores; templates checked before a single request is paid for."""

from __future__ import annotations

import pytest

from kubedpo_trainer.errors import ConfigError
from kubedpo_trainer.judge import templates as t
from kubedpo_trainer.judge.parsing import Answer, parse_pairwise, parse_pointwise


@pytest.mark.parametrize(("text", "verdict"), [
    ("A is right. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Both fine. [[tie]]", "tie"),
    ("Both fine. [[TIE]]", "tie"),
    ("MT-bench style tie [[C]]", "tie"),
    ("[[ a ]]", "A"),
    # the format restated before the decision: the last marker is the verdict
    ('Output "[[A]]" if A is better, "[[B]]" if B is. My verdict: [[B]]', "B"),
    ("A is better.", "unparseable"),
    ("[A]", "unparseable"),
    ("[[D]]", "unparseable"),
    ("", "unparseable"),
    ("I'm sorry, but I can't help with that.", "refusal"),
    ("I cannot evaluate this content.", "refusal"),
    ("As an AI, I must decline.", "refusal"),
    # a marker wins over an apologetic opening
    ("I'm sorry to say A is wrong. [[B]]", "B"),
])
def test_pairwise_verdicts(text: str, verdict: str) -> None:
    assert parse_pairwise(Answer(text)) == verdict


def test_api_refusal_signal_without_marker_is_a_refusal() -> None:
    assert parse_pairwise(Answer("Content withheld.", refusal=True)) == "refusal"
    assert parse_pointwise(Answer("Content withheld.", refusal=True)) == ("refusal", None)


@pytest.mark.parametrize(("text", "result"), [
    ("Rating: [[10]]", ("score", 10.0)),
    ("Rating: [[1]]", ("score", 1.0)),
    ("Rating: [[7.5]]", ("score", 7.5)),
    ("Rating: [[ 8 ]]", ("score", 8.0)),
    ("Rating: [[8/10]]", ("score", 8.0)),
    ("Format: [[5]] ... Rating: [[3]]", ("score", 3.0)),
    ("Rating: [[0]]", ("unparseable", None)),   # outside 1-10: never clipped into the scale
    ("Rating: [[11]]", ("unparseable", None)),
    ("Rating: 8", ("unparseable", None)),
    ("Rating: [[eight]]", ("unparseable", None)),
    ("I won't rate this.", ("refusal", None)),
])
def test_pointwise_scores(text: str, result: tuple) -> None:
    assert parse_pointwise(Answer(text)) == result


def test_default_templates_are_valid_and_render_every_part() -> None:
    assert t.check_template(t.DEFAULT_PAIRWISE, "pairwise")
    assert t.check_template(t.DEFAULT_POINTWISE, "pointwise")
    text = t.render_pairwise(t.DEFAULT_PAIRWISE, "Q {braces}?", "first", "second")
    assert "Q {braces}?" in text and text.index("first") < text.index("second")
    assert "[[A]]" in text and "[[tie]]" in text


@pytest.mark.parametrize(("template", "mode", "message"), [
    ("{prompt} {response_a}", "pairwise", "missing placeholder(s) {response_b}"),
    ("{prompt} {respons_a} {response_b}", "pairwise", "unknown placeholder {respons_a}"),
    ("{prompt} {response}", "pairwise", "unknown placeholder {response}"),
    ("{prompt} {response_a} {response_b}", "pointwise", "unknown placeholder {response_a}"),
    ("{prompt} {response!r}", "pointwise", "must be plain"),
    ("{prompt} {response:>10}", "pointwise", "must be plain"),
    ("{prompt} {response} {", "pointwise", "not a valid template"),
])
def test_bad_templates_name_the_field(template: str, mode: str, message: str) -> None:
    with pytest.raises(ConfigError, match="judge.llm.template") as err:
        t.check_template(template, mode)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_user_template_with_literal_braces() -> None:
    tpl = "Answer in JSON like {{\"x\": 1}}. {prompt} / {response}"
    assert t.render_pointwise(t.check_template(tpl, "pointwise"), "p", "r") == 'Answer in JSON like {"x": 1}. p / r'


def test_chat_prompts_as_text() -> None:
    assert t.prompt_text([{"role": "user", "content": "hi"}]) == "hi"
    multi = t.prompt_text([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert "[system]\nbe brief" in multi and "[user]\nhi" in multi
    assert t.messages("u", None) == [{"role": "user", "content": "u"}]
    assert t.messages("u", "s")[0] == {"role": "system", "content": "s"}
