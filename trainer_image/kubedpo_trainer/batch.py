"""The batch contract: what the data stream yields and the forward, losses and reference read.

Its own module at the bottom of the trainer's layers, so the math (losses, forward) can name
the type without importing the data pipeline (readers, S3) that produces it.
"""

from __future__ import annotations

from typing import TypedDict

import torch


class Batch(TypedDict):
    """The batch contract between the data stream, the forward, the losses and the reference."""

    input_ids: torch.Tensor  # (2B, T) long, right-padded with pad_id; rows B.. are the rejected
    attention_mask: torch.Tensor  # (2B, T) long
    loss_mask: torch.Tensor  # (2B, T) bool, True on response tokens (incl. EOS) only
    margin: torch.Tensor  # (B,) float32
    weight: torch.Tensor  # (B,) float32 (0 for padding rows)
    row_ids: list[str]  # B ids "<shard uri>:<line or row index>"
    num_tokens: int  # non-padding tokens of the 2B rows
