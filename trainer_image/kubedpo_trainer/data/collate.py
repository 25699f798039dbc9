"""Tokenized pairs to the (2B, T) batch the forward expects: chosen rows first, then rejected."""

from __future__ import annotations

from typing import Any

import torch

from .tokenize import TokenizedRow


def collate(rows: list[TokenizedRow], pad_id: int) -> dict[str, Any]:
    seqs = [r.prompt_ids + r.chosen_ids for r in rows] + [r.prompt_ids + r.rejected_ids for r in rows]
    prompt_lens = [len(r.prompt_ids) for r in rows] * 2
    t = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention = torch.zeros((n, t), dtype=torch.long)
    loss_mask = torch.zeros((n, t), dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
        loss_mask[i, p : len(s)] = True
    return {
        "input_ids": input_ids,  # (2B, T)
        "attention_mask": attention,  # (2B, T)
        "loss_mask": loss_mask,  # (2B, T) response tokens only
        "margin": torch.tensor([r.margin for r in rows], dtype=torch.float32),  # (B,)
        "weight": torch.tensor([r.weight for r in rows], dtype=torch.float32),  # (B,)
        "row_ids": [r.row_id for r in rows],
        "num_tokens": int(attention.sum()),
    }
