"""Rows to token ids with an exact prompt/response boundary; truncation counted, never silent.

Prompt and responses are tokenized separately, so the loss mask is exact: tokenizing the
concatenation can merge tokens across the boundary and blur which tokens are the response.
Conversational rows are rendered with the tokenizer's chat template: the prompt with the
generation prompt appended, each response as the rendering of prompt+response minus the
prompt's rendering (TRL's rule; where a template renders the prompt differently inside the
conversation, the split is at the longest prefix all three renderings share, as TRL does).

Special tokens, as TRL: a plain-text prompt gets BOS exactly when the tokenizer adds one by
itself (Llama, Mistral), never twice, and never the EOS some tokenizers also append; chat
renderings carry the template's own special tokens, so nothing is added to them. Every
plain-text response ends with EOS (appended unless it already ends with it), which is how the
policy learns to stop; conversational responses end as the chat template ends a turn (no EOS
added, as TRL).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from ..errors import InputError
from .formats import BadRecord, PreferenceRow

STAT_KEYS = ("rows", "bad_records", "truncated_prompts", "truncated_responses")


@dataclass
class DataStats:
    """Running totals exported as kubedpo_bad_records_total, kubedpo_truncated_*_total.

    Locked because the prefetch thread writes them while the training thread reads them.
    """

    rows: int = 0  # rows tokenized (pairs)
    bad_records: int = 0  # rows dropped by onBadRecord=skip
    truncated_prompts: int = 0  # prompts cut to maxPromptLength
    truncated_responses: int = 0  # responses (chosen and rejected counted apart) cut to maxLength
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def from_totals(cls, totals: Mapping[str, int]) -> DataStats:
        """Stats continuing from `totals()` (a checkpoint's or the consumed position's)."""
        return cls(rows=totals["rows"], bad_records=totals["bad_records"],
                   truncated_prompts=totals["truncated_prompts"], truncated_responses=totals["truncated_responses"])

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {k: getattr(self, k) for k in STAT_KEYS}

    def add(self, **amounts: int) -> None:
        with self._lock:
            for k, v in amounts.items():
                setattr(self, k, getattr(self, k) + v)


@dataclass(frozen=True)
class TokenizedRow:
    row_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]  # ends with EOS unless truncated
    rejected_ids: list[int]
    margin: float
    weight: float


def render(row: PreferenceRow, tokenizer: Any, row_id: str = "") -> tuple[str, str, str]:
    """Text of prompt, chosen and rejected (conversational rows through the chat template)."""
    if not row.conversational:
        return str(row.prompt), str(row.chosen), str(row.rejected)
    if getattr(tokenizer, "chat_template", None) is None:
        # A setup error, not a bad row: skipping would silently drop the whole data set.
        raise InputError(f"{row_id}: conversational row, but the tokenizer has no chat_template "
                         "(use a chat model's tokenizer, or set model.tokenizerUri)")
    prompt_msgs = list(row.prompt)
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full = [tokenizer.apply_chat_template(prompt_msgs + list(r), tokenize=False) for r in (row.chosen, row.rejected)]
    cut = _common_prefix_len(prompt, *full)
    return prompt[:cut], full[0][cut:], full[1][cut:]


def _common_prefix_len(*texts: str) -> int:
    n = min(len(t) for t in texts)
    for i in range(n):
        if any(t[i] != texts[0][i] for t in texts):
            return i
    return n


def bos_prefix(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer prepends BOS on its own (Llama, Mistral), else [] (GPT-2, Qwen)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def tokenize_row(row: PreferenceRow, row_id: str, tokenizer: Any, cfg: DataConfig, stats: DataStats,
                 bos: list[int] | None = None) -> TokenizedRow:
    """Token ids of one pair, truncated to the config and counted in `stats`.

    Prompt: cut to maxPromptLength (and to maxLength - 1, so a response token always fits)
    on `truncationSide` (left keeps the end, next to the response). Responses: cut at the
    right so prompt + response <= maxLength. `bos` is `bos_prefix(tokenizer)`, computed
    once by callers that tokenize many rows.
    """
    prompt, chosen, rejected = render(row, tokenizer, row_id)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not row.conversational:
        prefix = bos_prefix(tokenizer) if bos is None else bos
        if prefix and prompt_ids[:1] != prefix:
            prompt_ids = prefix + prompt_ids
    eos = tokenizer.eos_token_id
    responses = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        # As TRL: EOS closes plain-text responses only; a chat template's rendering already ends
        # the turn with its own marker, and a second EOS after it would be trained as the answer.
        if not row.conversational and eos is not None and ids[-1:] != [eos]:
            ids = ids + [eos]
        if not ids:
            raise BadRecord(f"'{name}' has no tokens and the tokenizer has no eos_token")
        responses.append(ids)
    budget = min(cfg.max_prompt_length or cfg.max_length, cfg.max_length - 1)
    truncated_prompts = int(len(prompt_ids) > budget)
    if truncated_prompts:
        prompt_ids = prompt_ids[-budget:] if cfg.truncation_side == "left" else prompt_ids[:budget]
    room = cfg.max_length - len(prompt_ids)
    cut = [ids[:room] for ids in responses]
    stats.add(rows=1, truncated_prompts=truncated_prompts,
              truncated_responses=sum(len(a) != len(b) for a, b in zip(cut, responses, strict=True)))
    return TokenizedRow(row_id, prompt_ids, cut[0], cut[1], row.margin, row.weight)
