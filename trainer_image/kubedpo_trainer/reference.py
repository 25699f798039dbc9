"""Reference log-probs: live (a no-grad forward per step) or precomputed once, then looked up.

Precompute (`training.referenceLogps: precompute`) runs the reference over the train and eval
splits once before training, each rank on its share, gathers the (row id -> chosen, rejected)
table on every rank (16 bytes a row: 1M rows are 16 MB), and frees a full-fine-tune reference
model. It saves a forward per step and, without LoRA, a whole model's memory. The precompute
pass and its cache (kept across attempts, epochs and rounds) are in reference_cache.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ReferenceLogps:
    chosen_logps: torch.Tensor  # (B,)
    rejected_logps: torch.Tensor  # (B,)


def _row_key(row_id: str) -> str:
    return row_id.removeprefix("pad:")  # padding rows reuse a real row's reference


class Reference:
    """`logps(batch)` for the loss, whichever way they are obtained."""

    def __init__(self, models: Any, table: dict[str, tuple[float, float]] | None = None) -> None:
        self.models, self.table = models, table

    def logps(self, batch: dict[str, Any]) -> Any:
        if self.table is None:
            return self.models.reference_logps(batch)
        pairs = [self.table[_row_key(r)] for r in batch["row_ids"]]
        t = torch.tensor(pairs, dtype=torch.float32)
        return ReferenceLogps(t[:, 0], t[:, 1])
