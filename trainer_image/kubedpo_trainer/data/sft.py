"""SFT rows (task sft): the prompt and the one response to imitate, tokenized like DPO's pairs.

Accepted rows, decided per row:
- prompt-completion (TRL): `{prompt, completion}`, both strings or both message lists;
- conversational (TRL "messages"): `{messages: [...]}`; the last message must be the
  assistant's and is the target, the earlier turns are the prompt;
- any preference row (`formats.parse_row`: standard, conversational, implicit): the chosen
  response is the target, so an SFT stage can run on the DPO data as it is.
An empty target is a bad row (DPO accepts an empty answer, as the rejected side of a pair).

Tokenization is DPO's (`tokenize.tokenize_row`, with the target as both responses): the same
BOS/EOS rules, chat-template split, truncation and counters, so an SFT'd model sees exactly the
prompt/response boundary the DPO stage after it trains on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..batch import SFTBatch
from ..config import DataConfig
from .formats import BadRecord, PreferenceRow, _number, _text_or_messages, parse_row
from .tokenize import DataStats, TokenizedRow, tokenize_row


def parse_sft_row(raw: Any, fmt: str = "auto") -> PreferenceRow:
    """(prompt, target) of one raw row as a PreferenceRow whose chosen and rejected are the target."""
    if isinstance(raw, BadRecord):
        raise raw
    if not isinstance(raw, dict):
        raise BadRecord(f"expected a JSON object, got {type(raw).__name__}")
    weight = _number(raw.get("weight"), "weight", 1.0)
    if weight < 0:
        raise BadRecord(f"field 'weight' must be >= 0, got {weight}")
    if raw.get("messages") is not None:
        msgs = _text_or_messages(raw["messages"], "messages")
        if not isinstance(msgs, list):
            raise BadRecord("field 'messages' must be a list of {role, content} messages")
        if msgs[-1]["role"] != "assistant":
            raise BadRecord(f"the last message of 'messages' is the target and must be the assistant's, "
                            f"got role '{msgs[-1]['role']}'")
        if not msgs[-1]["content"]:
            raise BadRecord("the last (assistant) message of 'messages' is empty")
        prompt: Any = msgs[:-1]
        target: Any = msgs[-1:]
    elif raw.get("completion") is not None:
        if raw.get("prompt") is None:
            raise BadRecord("missing field 'prompt' (a row with 'completion' needs its prompt)")
        prompt = _text_or_messages(raw["prompt"], "prompt")
        target = _text_or_messages(raw["completion"], "completion")
        if type(prompt) is not type(target):
            raise BadRecord("prompt and completion must both be strings or both message lists")
    elif raw.get("chosen") is not None:
        pair = parse_row(raw, fmt)  # type: ignore[arg-type]
        prompt, target, weight = pair.prompt, pair.chosen, pair.weight
    else:
        raise BadRecord("expected {prompt, completion}, {messages} or a preference row {prompt, chosen, "
                        "rejected}; none of 'completion', 'messages', 'chosen' is present")
    if target == "":  # DPO accepts an empty (rejected) answer; imitating one teaches answering nothing
        raise BadRecord("empty target ('completion' or 'chosen'): SFT would train the model to answer nothing")
    return PreferenceRow(prompt, target, target, 0.0, weight)


def tokenize_sft_row(raw: Any, row_id: str, tokenizer: Any, cfg: DataConfig, stats: DataStats,
                     bos: list[int] | None = None) -> TokenizedRow:
    """Token ids of prompt and target (in `chosen_ids`; `rejected_ids` empty), counted in `stats`."""
    row = parse_sft_row(raw, cfg.format)
    scratch = DataStats()
    tok = tokenize_row(row, row_id, tokenizer, cfg, scratch, bos)
    t = scratch.totals()  # the target went through as chosen and rejected: count it once
    stats.add(rows=t["rows"], truncated_prompts=t["truncated_prompts"],
              truncated_responses=t["truncated_responses"] // 2)
    return replace(tok, rejected_ids=[])


def collate_sft(rows: list[TokenizedRow], pad_id: int) -> SFTBatch:
    """The (B, T) right-padded batch of prompt+target rows; loss_mask marks the target tokens."""
    if not rows:
        raise ValueError("collate_sft needs at least one row")
    seqs = [r.prompt_ids + r.chosen_ids for r in rows]
    t = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), t), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), t), dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rows, seqs, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
        loss_mask[i, len(r.prompt_ids) : len(s)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "loss_mask": loss_mask,
        "margin": torch.zeros(len(rows), dtype=torch.float32),
        "weight": torch.tensor([r.weight for r in rows], dtype=torch.float32),
        "row_ids": [r.row_id for r in rows],
        "num_tokens": int(attention.sum()),
    }
