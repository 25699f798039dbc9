"""Reference log-probs: live (a no-grad forward per step) or precomputed once, then looked up.

Precompute (`training.referenceLogps: precompute`) runs the reference over the train and eval
splits once before training, each rank on its share, gathers the (row id -> chosen, rejected)
table on every rank (16 bytes a row: 1M rows are 16 MB), and frees a full-fine-tune reference
model. It saves a forward per step and, without LoRA, a whole model's memory. The precompute
pass and its cache (kept across attempts, epochs and rounds) are in reference_cache.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import Batch, PairFields
from .losses import PairLogps
from .models import PolicyAndReference


@dataclass(frozen=True)
class ReferenceLogps:
    chosen_logps: torch.Tensor  # (B,)
    rejected_logps: torch.Tensor  # (B,)


def _row_key(row_id: str) -> str:
    return row_id.removeprefix("pad:")  # padding rows reuse a real row's reference


class Reference:
    """`logps(batch)` for the loss, whichever way they are obtained."""

    def __init__(self, models: PolicyAndReference, table: dict[str, tuple[float, float]] | None = None) -> None:
        self.models, self.table = models, table

    def logps(self, batch: Batch) -> PairLogps | None:
        """(B,) chosen and rejected reference log-probs; None for a reference-free loss."""
        if self.table is None:
            return self.models.reference_logps(batch)
        return self.lookup(batch)

    def lookup(self, batch: PairFields) -> ReferenceLogps:
        """The precomputed log-probs of the batch's rows (any layout: only row ids are read)."""
        if self.table is None:
            raise RuntimeError("no precomputed reference log-probs (training.referenceLogps is live)")
        pairs = [self.table[_row_key(r)] for r in batch["row_ids"]]
        t = torch.tensor(pairs, dtype=torch.float32)
        return ReferenceLogps(t[:, 0], t[:, 1])
