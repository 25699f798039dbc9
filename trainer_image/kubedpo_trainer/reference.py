"""Reference log-probs: live (a no-grad forward per step) or precomputed once, then looked up.

Precompute (`training.referenceLogps: precompute`) runs the reference over the train and eval
splits once before training, each rank on its share, gathers the (row id -> chosen, rejected)
table on every rank (16 bytes a row: 1M rows are 16 MB), and frees a full-fine-tune reference
model. It saves a forward per step and, without LoRA, a whole model's memory. The table is
rebuilt on every attempt (deterministic), so checkpoints stay small.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .batch import Batch
from .config import TrainerConfig
from .data.stream import PreferenceStream
from .losses import PairLogps
from .models import PolicyAndReference

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


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
        pairs = [self.table[_row_key(r)] for r in batch["row_ids"]]
        t = torch.tensor(pairs, dtype=torch.float32)
        return ReferenceLogps(t[:, 0], t[:, 1])


@torch.no_grad()
def precompute(cfg: TrainerConfig, acc: Accelerator, models: PolicyAndReference,
               tokenizer: PreTrainedTokenizerBase) -> Reference:
    table: dict[str, tuple[float, float]] = {}
    for uri in filter(None, (cfg.data.train, cfg.data.eval)):
        stream = PreferenceStream.for_eval(cfg.data, uri, tokenizer, acc.process_index, acc.num_processes,
                                           cfg.training.batch_size)
        for batch in stream.eval_batches():
            with acc.autocast():
                ref = models.reference_logps(batch)
            if ref is None:  # config validation refuses precompute with a reference-free loss
                raise ValueError(f"training.referenceLogps: precompute with {cfg.training.loss}, which has no reference")
            for rid, c, r in zip(batch["row_ids"], ref.chosen_logps.tolist(), ref.rejected_logps.tolist(),
                                 strict=True):
                table[rid] = (c, r)
    merged: dict[str, tuple[float, float]] = {}
    for part in gather_object([table]):
        merged.update(part)
    if not models.is_lora:
        models.release_reference()
    log.info("precomputed reference log-probs for %d rows", len(merged))
    return Reference(models, merged)
