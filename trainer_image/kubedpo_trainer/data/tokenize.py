"""Rows to token ids with an exact prompt/response boundary, truncation counted, never silent.

Prompt and responses are tokenized separately, so the loss mask is exact (tokenizing the
concatenation can merge tokens across the boundary). Conversational rows are rendered with the
tokenizer's chat template: the prompt with the generation prompt appended, each response as
the rendering of prompt+response minus the prompt's rendering, as TRL does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from .formats import BadRecord, PreferenceRow


@dataclass
class DataStats:
    """Running totals, exported as kubedpo_* counters (a lock: the prefetch thread writes them)."""

    rows: int = 0
    bad_records: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {k: getattr(self, k) for k in ("rows", "bad_records", "truncated_prompts", "truncated_responses")}

    def add(self, **amounts: int) -> None:
        with self._lock:
            for k, v in amounts.items():
                setattr(self, k, getattr(self, k) + v)


@dataclass(frozen=True)
class TokenizedRow:
    row_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float
    weight: float


def render(row: PreferenceRow, tokenizer: Any) -> tuple[str, str, str]:
    """Text of prompt, chosen and rejected (conversational rows through the chat template)."""
    if not row.conversational:
        return str(row.prompt), str(row.chosen), str(row.rejected)
    prompt_msgs = row.prompt if isinstance(row.prompt, list) else [{"role": "user", "content": row.prompt}]
    if getattr(tokenizer, "chat_template", None) is None:
        raise BadRecord("conversational row, but the tokenizer has no chat_template")
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    responses = []
    for resp in (row.chosen, row.rejected):
        full = tokenizer.apply_chat_template(prompt_msgs + list(resp), tokenize=False)
        if not full.startswith(prompt):
            raise BadRecord("chat template renders the prompt differently inside the conversation")
        responses.append(full[len(prompt) :])
    return prompt, responses[0], responses[1]


def tokenize_row(row: PreferenceRow, row_id: str, tokenizer: Any, cfg: DataConfig, stats: DataStats) -> TokenizedRow:
    prompt, chosen, rejected = render(row, tokenizer)
    # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS).
    prompt_ids = tokenizer(prompt, add_special_tokens=not row.conversational)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    resp_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + eos for r in (chosen, rejected)]
    budget_prompt = min(cfg.max_prompt_length or cfg.max_length, cfg.max_length - 1)
    if len(prompt_ids) > budget_prompt:
        stats.add(truncated_prompts=1)
        prompt_ids = prompt_ids[-budget_prompt:] if cfg.truncation_side == "left" else prompt_ids[:budget_prompt]
    room = cfg.max_length - len(prompt_ids)
    cut = [ids[:room] for ids in resp_ids]
    stats.add(truncated_responses=sum(len(a) != len(b) for a, b in zip(cut, resp_ids, strict=True)), rows=1)
    return TokenizedRow(row_id, prompt_ids, cut[0], cut[1], row.margin, row.weight)
