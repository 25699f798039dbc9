"""The small all-reduces and gathers of the training loop, as functions of the Accelerator.

Every rank must make each of these calls at the same step with the same shapes, or the job
hangs; keeping them together, each saying what it combines, keeps that contract readable.
Sums run in float64 so counters of billions of tokens stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import Accelerator

from .forward import logits_from_totals


def sum_each(acc: Accelerator, values: Sequence[float]) -> list[float]:
    """Each value summed over ranks, in one all-reduce."""
    t = torch.tensor(list(values), dtype=torch.float64, device=acc.device)
    return [float(v) for v in acc.reduce(t, reduction="sum").tolist()]


def sum_over_ranks(acc: Accelerator, value: float) -> float:
    return sum_each(acc, [value])[0]


def gather_int(acc: Accelerator, value: int) -> list[int]:
    """Every rank's `value`, in rank order, on every rank."""
    t = torch.tensor([value], dtype=torch.int64, device=acc.device)
    return [int(v) for v in acc.gather(t).tolist()]


def any_rank(acc: Accelerator, *flags: bool) -> tuple[bool, ...]:
    """Each flag true on some rank: so that every rank stops or checkpoints at the same step."""
    return tuple(v > 0 for v in sum_each(acc, [float(f) for f in flags]))


def mean_over_ranks(acc: Accelerator, sums: dict[str, float], pairs: float,
                    logit_totals: torch.Tensor) -> dict[str, float]:
    """Per-pair metrics averaged over the real pairs of all ranks (`sums` are pair-weighted), and
    logits/* from the micro-batches' token totals, in one all-reduce. With full batches this is
    TRL's mean over micro-batches and ranks; summing the totals keeps their ratio the global
    token mean TRL logs."""
    keys = sorted(sums)
    t = torch.cat([torch.tensor([sums[k] for k in keys] + [pairs], dtype=torch.float64, device=acc.device),
                   logit_totals.to(acc.device, torch.float64).flatten()])
    t = acc.reduce(t, reduction="sum")
    total = float(t[len(keys)])
    out = {k: v / total for k, v in zip(keys, t[:len(keys)].tolist(), strict=True)}
    out.update(logits_from_totals(t[len(keys) + 1:]))
    return out
