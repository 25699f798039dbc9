"""Tokenized pairs to the (2B, T) batch the concatenated forward expects.

Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected in the same order, so one
forward computes both log-probs and `logps[:B] - logps[B:]` pairs them up. Right padding
keeps every prompt at position 0 (causal models need no position-id fix-ups); T is the
longest sequence of this batch, not maxLength, so short batches cost less.
"""

from __future__ import annotations

import torch

from ..batch import Batch
from .tokenize import TokenizedRow


def collate(rows: list[TokenizedRow], pad_id: int) -> Batch:
    """The (2B, T) batch of `rows`: see `Batch` for the contract."""
    if not rows:
        raise ValueError("collate needs at least one row")
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
        "input_ids": input_ids,  # (2B, T) right-padded with pad_id
        "attention_mask": attention,  # (2B, T)
        "loss_mask": loss_mask,  # (2B, T) True on response tokens (incl. EOS) only
        "margin": torch.tensor([r.margin for r in rows], dtype=torch.float32),  # (B,)
        "weight": torch.tensor([r.weight for r in rows], dtype=torch.float32),  # (B,)
        "row_ids": [r.row_id for r in rows],  # B ids "<shard uri>:<line or row index>"
        "num_tokens": int(attention.sum()),
    }
