"""The batch contracts: what the data stream yields and the forward, losses and reference read.

Their own module at the bottom of the trainer's layers, so the math (losses, forward) can name
the types without importing the data pipeline (readers, S3) that produces them.
"""

from __future__ import annotations

from typing import TypedDict

import torch


class PairFields(TypedDict):
    """What every batch layout carries per pair: the losses and the reference table read only these."""

    margin: torch.Tensor  # (B,) float32
    weight: torch.Tensor  # (B,) float32 (0 for padding rows)
    row_ids: list[str]  # B ids "<shard uri>:<line or row index>"
    num_tokens: int  # tokens of the 2B sequences as a padded batch holds them


class Batch(PairFields):
    """A padded (2B, T) batch (`data.collate`): rows B.. are the rejected of rows 0..B-1."""

    input_ids: torch.Tensor  # (2B, T) long, right-padded with pad_id
    attention_mask: torch.Tensor  # (2B, T) long
    loss_mask: torch.Tensor  # (2B, T) bool, True on response tokens (incl. EOS) only


class PackedBatch(PairFields):
    """A packed micro-batch (`data.packing.pack`, read by `packed_forward`): R rows of T tokens."""

    input_ids: torch.Tensor  # (R, T) long
    position_ids: torch.Tensor  # (R, T) long, restarting per sequence
    segment: torch.Tensor  # (R, T) long, which unit of its row a token belongs to
    part: torch.Tensor  # (R, T) long, prompt / chosen / rejected
    tgt_row: torch.Tensor  # (M,) long: response token m's logit sits at (tgt_row[m], src_pos[m])
    src_pos: torch.Tensor  # (M,) long
    target: torch.Tensor  # (M,) long, its token id
    seq: torch.Tensor  # (M,) long, its sequence: chosen of pair i is i, rejected is B + i
    pairs: int  # B


class SFTBatch(PairFields):
    """A padded (B, T) batch of prompt+target rows (`data.sft.collate_sft`), for task sft."""

    input_ids: torch.Tensor  # (B, T) long, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) bool, True on target tokens (incl. EOS) only
