"""Attention of packed rows computed unit by unit (CPU): no work across units, no padding rows.

Why: a dense (R, 1, T, T) block mask makes SDPA on CPU pay T^2 per row however few of those
query-key pairs a unit may see (the CPU kernel cannot skip masked blocks), so rows had to stay
short (`data.maxLength`), and short rows leave padding that every linear layer pays for. Here
each unit (a pair's [prompt chosen rejected], or one sequence, or a row's trailing padding) runs
its own SDPA over its own span with its own small mask, so attention costs sum(unit^2) and a
micro-batch can be one row with no padding at all.

How: a registered transformers attention implementation, `kubedpo_units`. Without the
`kubedpo_units` keyword (any forward that is not a packed one: evaluation, generation, the
padded path) it is exactly transformers' `sdpa` (same function, same mask builder). With it,
it loops over the plan's spans. The plan travels as a forward keyword, which transformers hands
to every attention call and keeps for a gradient-checkpointing recompute. GPUs keep the dense
mask (one kernel; many small ones would be slower there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .data.packing import CHOSEN, REJECTED

NAME = "kubedpo_units"
KWARG = "kubedpo_units"


@dataclass(frozen=True)
class UnitPlan:
    """Spans (row, start, end) tiling every row in order; a unit's (1, 1, U, U) mask, or None
    where the unit is plain causal (one sequence, or padding) and SDPA can use its causal path."""

    spans: tuple[tuple[int, int, int], ...]
    masks: tuple[torch.Tensor | None, ...]


def unit_plan(segment: torch.Tensor, part: torch.Tensor, mask_of: Any) -> UnitPlan:
    """The plan of a packed batch: one span per run of equal `segment` in a row.

    `mask_of(segment, part)` is the dense block mask (packed_forward.block_mask), applied to
    the unit alone, so both paths see the same mask by construction.
    """
    spans: list[tuple[int, int, int]] = []
    masks: list[torch.Tensor | None] = []
    seg = segment.tolist()
    for r, row in enumerate(seg):
        start = 0
        for i in range(1, len(row) + 1):
            if i == len(row) or row[i] != row[start]:
                sub_part = part[r:r + 1, start:i]
                has_both = bool((sub_part == CHOSEN).any()) and bool((sub_part == REJECTED).any())
                spans.append((r, start, i))
                masks.append(mask_of(segment[r:r + 1, start:i], sub_part) if has_both else None)
                start = i
    return UnitPlan(tuple(spans), tuple(masks))


def unit_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa, per unit of the plan when one is given. query (B, H, T, D) -> (B, T, H, D)."""
    plan: UnitPlan | None = kwargs.pop(KWARG, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows: list[list[torch.Tensor]] = [[] for _ in range(query.shape[0])]
    for (r, s, e), mask in zip(plan.spans, plan.masks, strict=True):
        out, _ = sdpa_attention_forward(module, query[r:r + 1, :, s:e], key[r:r + 1, :, s:e],
                                        value[r:r + 1, :, s:e], mask, **kwargs)
        rows[r].append(out)  # (1, U, H, D)
    return torch.cat([torch.cat(parts, dim=1) for parts in rows]), None


AttentionInterface.register(NAME, unit_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # unplanned forwards build sdpa's mask, as sdpa


def applies(model: torch.nn.Module, inner: torch.nn.Module) -> bool:
    """Whether `model` computes packed attention unit by unit: an sdpa model on CPU.

    Switches such a model's implementation to `kubedpo_units` (idempotent; identical to sdpa for
    every forward that carries no plan).
    """
    config = getattr(inner, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl == NAME:
        return True
    if impl != "sdpa" or next(model.parameters()).device.type != "cpu" or config is None:
        return False
    config._attn_implementation = NAME
    return True
