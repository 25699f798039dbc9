"""The LLM judge: generation rows -> judge requests (cached) -> verdicts -> scores per response.

pairwise: every pair (i, j) of a prompt's K responses, asked as "i is A" and, with bothOrders,
again as "j is A"; the agreeing verdicts make a Copeland tournament (pairs.tournament).
pointwise: one request per response, "Rating: [[n]]". Identical requests (the same prompt and
texts) are asked once per batch; answers come from the cache when any earlier run paid for them.
Compare (win rates) is always pairwise and in both orders, whatever `mode` says: a rate that
moved because the judge likes the first answer would be a lie.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..stage_config import JudgeConfig, LLMJudgeConfig
from . import templates as t
from .cache import JudgementCache, request_key
from .client import API_KEY_ENV, Backoff, ChatClient
from .pairs import Scored, combine_orders, pointwise, tournament
from .parsing import Answer, parse_pairwise, parse_pointwise
from .tally import Tally

Messages = list[dict[str, str]]


class LLMJudge:
    kind = "llm"

    def __init__(self, cfg: JudgeConfig, backoff: Backoff | None = None) -> None:
        assert cfg.llm is not None
        self.llm: LLMJudgeConfig = cfg.llm
        self.template = t.resolve_template(self.llm.template, self.llm.mode)
        self.pairwise_template = self.template if self.llm.mode == "pairwise" else t.DEFAULT_PAIRWISE
        self.client = ChatClient(self.llm, os.environ.get(API_KEY_ENV) or None, backoff)
        self.cache: JudgementCache | None = None

    def fingerprint_parts(self) -> dict[str, Any]:
        """What makes a cached answer reusable (the API key is not: it changes nothing asked)."""
        c = self.llm
        return {"kind": "llm", "url": c.url.rstrip("/"), "model": c.model, "template": self.template,
                "systemPrompt": c.system_prompt, "mode": c.mode, "temperature": c.temperature,
                "maxTokens": c.max_tokens}

    # --- asking, through the cache ----------------------------------------------------------

    def ask(self, requests: Sequence[Messages], tally: Tally) -> list[Answer | None]:
        """Answers in order: cached ones free, the rest asked once each (duplicates share)."""
        cache = self.cache
        fp = cache.fp if cache is not None else ""
        keys = [request_key(fp, m) for m in requests]
        found: dict[str, Answer | None] = {}
        todo: dict[str, Messages] = {}
        for key, messages in zip(keys, requests, strict=True):
            if key in found or key in todo:
                continue
            hit = cache.get(key) if cache is not None else None
            if isinstance(hit, dict) and isinstance(hit.get("text"), str):
                found[key] = Answer(hit["text"], bool(hit.get("refusal")), int(hit.get("tokens") or 0))
                tally.on_cache_hit()
            else:
                todo[key] = messages
        todo_keys = list(todo)

        def keep(i: int, answer: Answer) -> None:
            if cache is not None:
                cache.put(todo_keys[i], {"text": answer.text, "refusal": answer.refusal, "tokens": answer.tokens})

        answers = self.client.complete_all([todo[k] for k in todo_keys], tally, on_answer=keep)
        found.update(zip(todo_keys, answers, strict=True))
        return [found[k] for k in keys]

    # --- scoring generation rows ----------------------------------------------------------------

    def score(self, rows: Sequence[tuple[Any, list[str]]], tally: Tally) -> list[Scored]:
        """(prompt, responses) per row -> Scored per row."""
        if self.llm.mode == "pointwise":
            return self._score_pointwise(rows, tally)
        return self._score_pairwise(rows, tally)

    def _pairwise_request(self, prompt: Any, a: str, b: str, template: str) -> Messages:
        return t.messages(t.render_pairwise(template, t.prompt_text(prompt), a, b), self.llm.system_prompt)

    def _score_pairwise(self, rows: Sequence[tuple[Any, list[str]]], tally: Tally) -> list[Scored]:
        plan: list[tuple[int, int, int]] = []  # (row, i, j) with i < j and different texts
        requests: list[Messages] = []
        for r, (prompt, responses) in enumerate(rows):
            for i in range(len(responses)):
                for j in range(i + 1, len(responses)):
                    if responses[i] == responses[j]:
                        continue
                    plan.append((r, i, j))
                    requests.append(self._pairwise_request(prompt, responses[i], responses[j], self.template))
                    if self.llm.both_orders:
                        requests.append(self._pairwise_request(prompt, responses[j], responses[i], self.template))
        answers = iter(self.ask(requests, tally))
        outcomes: list[dict[tuple[int, int], str]] = [{} for _ in rows]
        notes: list[dict[tuple[int, int], str]] = [{} for _ in rows]
        for r, (_, responses) in enumerate(rows):
            for i in range(len(responses)):
                for j in range(i + 1, len(responses)):
                    if responses[i] == responses[j]:
                        outcomes[r][(i, j)] = "tie"
        for r, i, j in plan:
            first = next(answers)
            second = next(answers) if self.llm.both_orders else None
            v1 = parse_pairwise(first) if first else "unparseable"
            v2 = (parse_pairwise(second) if second else "unparseable") if self.llm.both_orders else None
            outcomes[r][(i, j)] = combine_orders(v1, v2)
            texts = [f"[response {i} as A] {first.text if first else '(rejected by the endpoint)'}"]
            if self.llm.both_orders:
                texts.append(f"[response {j} as A] {second.text if second else '(rejected by the endpoint)'}")
            notes[r][(i, j)] = "\n\n".join(texts)
        out = []
        for r, (_, responses) in enumerate(rows):
            scored = tournament(len(responses), outcomes[r])
            scored.notes = notes[r]
            out.append(scored)
        return out

    def _score_pointwise(self, rows: Sequence[tuple[Any, list[str]]], tally: Tally) -> list[Scored]:
        requests = [t.messages(t.render_pointwise(self.template, t.prompt_text(p), resp), self.llm.system_prompt)
                    for p, responses in rows for resp in responses]
        answers = iter(self.ask(requests, tally))
        out = []
        for _, responses in rows:
            mine = [next(answers) for _ in responses]
            scored = pointwise([parse_pointwise(a) if a else ("unparseable", None) for a in mine])
            scored.notes = {(i, i): (a.text if a else "(rejected by the endpoint)") for i, a in enumerate(mine)}
            out.append(scored)
        return out

    # --- win rates ------------------------------------------------------------------------

    def compare(self, items: Sequence[tuple[Any, str, str]], tally: Tally) -> list[str]:
        """(prompt, candidate, baseline) -> combined verdict with the candidate as i."""
        requests: list[Messages] = []
        for prompt, cand, base in items:
            if cand != base:
                requests.append(self._pairwise_request(prompt, cand, base, self.pairwise_template))
                requests.append(self._pairwise_request(prompt, base, cand, self.pairwise_template))
        answers = iter(self.ask(requests, tally))
        out = []
        for _, cand, base in items:
            if cand == base:
                out.append("tie")
                continue
            a1, a2 = next(answers), next(answers)
            out.append(combine_orders(parse_pairwise(a1) if a1 else "unparseable",
                                      parse_pairwise(a2) if a2 else "unparseable"))
        return out
