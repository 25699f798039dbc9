"""The judge's prompts: kubedpo's default templates (MT-bench style) and users' own, checked up front.

A template is a `str.format` string. Pairwise templates take {prompt}, {response_a} and
{response_b} and must make the judge end with [[A]], [[B]] or [[tie]]; pointwise templates take
{prompt} and {response} and must make the judge write "Rating: [[n]]" (n from 1 to 10). A
template is validated when the task starts, so a typo in a placeholder is a configuration error
naming `judge.llm.template`, not a thousand paid requests with a literal "{respons_a}" in them.

The instructions live in the template (the user message), not in a system prompt, so a user's
`systemPrompt` (a persona, a language) adds to them rather than silently replacing them.
"""

from __future__ import annotations

import json
import string
from typing import Any, Literal

from ..errors import ConfigError

Mode = Literal["pairwise", "pointwise"]

PAIRWISE_FIELDS = ("prompt", "response_a", "response_b")
POINTWISE_FIELDS = ("prompt", "response")
FIELDS: dict[str, tuple[str, ...]] = {"pairwise": PAIRWISE_FIELDS, "pointwise": POINTWISE_FIELDS}

# Section markers of the default templates. The test judge (kubedpo_trainer.tiny_judge) finds the
# question and the answers by these, so they are named once, here.
QUESTION_START = "[User Question]"
ANSWER_A_START, ANSWER_A_END = "[The Start of Assistant A's Answer]", "[The End of Assistant A's Answer]"
ANSWER_B_START, ANSWER_B_END = "[The Start of Assistant B's Answer]", "[The End of Assistant B's Answer]"
ANSWER_START, ANSWER_END = "[The Start of the Assistant's Answer]", "[The End of the Assistant's Answer]"

DEFAULT_PAIRWISE = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. Choose the assistant that follows the user's "
    "instructions and answers the question better: consider helpfulness, relevance, accuracy, depth and "
    "level of detail. Avoid any position bias: the order in which the responses are presented must not "
    "influence your decision, nor their length, nor the assistants' names. Be as objective as possible. "
    "Begin with a short explanation, then output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[tie]]" for a tie.\n\n'
    f"{QUESTION_START}\n{{prompt}}\n\n"
    f"{ANSWER_A_START}\n{{response_a}}\n{ANSWER_A_END}\n\n"
    f"{ANSWER_B_START}\n{{response_b}}\n{ANSWER_B_END}\n"
)
DEFAULT_POINTWISE = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Consider helpfulness, relevance, accuracy, depth and "
    "level of detail. Begin with a short explanation, then rate the response on a scale of 1 to 10 by "
    'strictly following this format: "Rating: [[5]]".\n\n'
    f"{QUESTION_START}\n{{prompt}}\n\n"
    f"{ANSWER_START}\n{{response}}\n{ANSWER_END}\n"
)
DEFAULTS: dict[str, str] = {"pairwise": DEFAULT_PAIRWISE, "pointwise": DEFAULT_POINTWISE}


def check_template(template: str, mode: Mode, field: str = "judge.llm.template") -> str:
    """The template if it is a valid `mode` template; ConfigError naming `field` otherwise."""
    allowed = FIELDS[mode]
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:  # a lone "{" or "}"
        raise ConfigError(f"{field}: not a valid template ({err}); write a literal brace as {{{{ or }}}}") from None
    used: set[str] = set()
    for _text, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed:
            raise ConfigError(f"{field}: unknown placeholder {{{name}}}; {mode} templates take "
                              f"{', '.join('{' + a + '}' for a in allowed)}")
        if spec or conversion:
            raise ConfigError(f"{field}: placeholder {{{name}}} must be plain (no !conversion or :format)")
        used.add(name)
    missing = [a for a in allowed if a not in used]
    if missing:
        raise ConfigError(f"{field}: missing placeholder(s) {', '.join('{' + m + '}' for m in missing)} "
                          f"(a {mode} template needs all of {', '.join('{' + a + '}' for a in allowed)})")
    return template


def resolve_template(template: str | None, mode: Mode) -> str:
    """The user's template (checked) or kubedpo's default for `mode`."""
    return DEFAULTS[mode] if template is None else check_template(template, mode)


def prompt_text(prompt: Any) -> str:
    """A generation row's prompt as the judge reads it: a string as is; a conversation as its
    turns (a single user turn: just its content, as in a plain prompt)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        if len(prompt) == 1 and prompt[0].get("role") == "user":
            return str(prompt[0].get("content", ""))
        return "\n\n".join(f"[{m.get('role', 'user')}]\n{m.get('content', '')}" for m in prompt)
    return json.dumps(prompt, sort_keys=True)


def render_pairwise(template: str, prompt: str, response_a: str, response_b: str) -> str:
    return template.format(prompt=prompt, response_a=response_a, response_b=response_b)


def render_pointwise(template: str, prompt: str, response: str) -> str:
    return template.format(prompt=prompt, response=response)


def messages(user: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The chat-completions messages of one judge request."""
    out = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*out, {"role": "user", "content": user}]
