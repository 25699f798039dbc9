"""Held-out DPO metrics: the same loss and rewards as training, averaged over every eval pair.

Each rank evaluates its own share of the eval split through the *unwrapped* model (a DDP
forward may broadcast buffers, a collective that would hang when ranks hold unequal shares),
then one all-reduce of (sum, count) pairs makes the average exact over the whole split. Under
FSDP every forward all-gathers the weights, so ranks must run the same number of forwards: a
rank with fewer eval batches repeats its last one, uncounted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from .batch import Batch
from .config import TrainerConfig
from .data.stream import PreferenceStream
from .errors import InputError
from .forward import concatenated_forward, dpo_metrics, logit_totals, logits_from_totals
from .losses import LossInputs, compute_loss
from .metrics import DPO_GAUGES
from .models import PolicyAndReference
from .reference import Reference

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def evaluate(cfg: TrainerConfig, acc: Accelerator, models: PolicyAndReference, reference: Reference,
             tokenizer: PreTrainedTokenizerBase, beta: float) -> dict[str, float]:
    assert cfg.data.eval is not None
    policy = acc.unwrap_model(models.policy)
    was_training = policy.training
    policy.eval()
    stream = PreferenceStream.for_eval(cfg.data, cfg.data.eval, tokenizer, acc.process_index,
                                       acc.num_processes, cfg.training.batch_size)
    sums: dict[str, float] = {}
    logits = torch.zeros(4, dtype=torch.float64)  # token-weighted over the whole split, as TRL's logits/*
    pairs = 0
    batches: Iterable[Batch] = stream.eval_batches(device=acc.device)
    real = None  # how many batches count; the rest only keep FSDP's collectives paired
    if acc.distributed_type == DistributedType.FSDP:
        batches, real = equal_batch_counts(acc, list(batches), cfg.data.eval)
    for i, batch in enumerate(batches):
        with acc.autocast():
            out_policy = concatenated_forward(policy, batch)
            ref = reference.logps(batch)
            out = compute_loss(cfg.training.loss, LossInputs.from_forward(out_policy, ref, batch), beta,
                               cfg.training)
        if real is not None and i >= real:
            continue
        n = len(batch["row_ids"])
        for k, v in dpo_metrics(out, out_policy).items():
            sums[k] = sums.get(k, 0.0) + v * n
        logits += logit_totals(out_policy).cpu()
        pairs += n
    if was_training:
        policy.train()
    keys = list(DPO_GAUGES)  # fixed order and length on every rank, even one with no eval pairs
    t = torch.tensor([sums.get(k, 0.0) for k in keys] + logits.tolist() + [float(pairs)], dtype=torch.float64,
                     device=acc.device)
    t = acc.reduce(t, reduction="sum")
    total = float(t[-1])
    if total == 0:
        return {}
    values = {f"eval_{k}": float(v) / total for k, v in zip(keys, t[:len(keys)].tolist(), strict=True)}
    values.update({f"eval_{k}": v for k, v in logits_from_totals(t[len(keys):-1]).items()})
    return values


def equal_batch_counts(acc: Accelerator, batches: list[Batch], source: str) -> tuple[list[Batch], int]:
    """This rank's eval batches padded with repeats of its last to the most any rank has, and
    how many are real (FSDP's all-gathers must pair up across ranks)."""
    counts = acc.gather(torch.tensor([len(batches)], device=acc.device)).tolist()
    if min(counts) == 0:
        raise InputError(f"data.eval: {source}: under FSDP every rank needs at least one eval row; "
                         f"the ranks got {counts} batches (add eval rows or raise data.evalMaxRows)")
    return batches + [batches[-1]] * (max(counts) - len(batches)), len(batches)
