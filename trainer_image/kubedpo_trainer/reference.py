"""Reference log-probs: live (a no-grad forward per step) or precomputed once, then looked up.

Precompute (`training.referenceLogps: precompute`) runs the reference over the train and eval
splits once before training (under FSDP with the reference sharded, every rank running the same
number of forwards), each rank on its share, gathers the (row id -> chosen, rejected)
table on every rank (16 bytes a row: 1M rows are 16 MB), and frees a full-fine-tune reference
model. It saves a forward per step and, without LoRA, a whole model's memory. The table is
rebuilt on every attempt (deterministic), so checkpoints stay small.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from .config import TrainerConfig
from .data.stream import PreferenceStream

log = logging.getLogger(__name__)


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


@torch.no_grad()
def precompute(cfg: TrainerConfig, acc: Accelerator, models: Any, tokenizer: Any) -> Reference:
    table: dict[str, tuple[float, float]] = {}
    for uri in filter(None, (cfg.data.train, cfg.data.eval)):
        stream = PreferenceStream.for_eval(cfg.data, uri, tokenizer, acc.process_index, acc.num_processes,
                                           cfg.training.batch_size)
        batches: Any = stream.eval_batches()
        if acc.distributed_type == DistributedType.FSDP:  # a sharded reference: forwards are collectives
            from .evaluate import equal_batch_counts

            batches, _ = equal_batch_counts(acc, list(batches), uri)
        for batch in batches:  # a repeated batch re-writes the same rows' entries
            with acc.autocast():
                ref = models.reference_logps(batch)
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
