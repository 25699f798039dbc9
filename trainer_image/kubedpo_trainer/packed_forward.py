"""The forward of a packed micro-batch (data/packing.py): a block-sparse mask, logits only where needed.

- Attention: a (R, 1, T, T) mask built from each token's unit (`segment`) and part, passed to
  the model as a ready 4D mask (transformers uses a 4D mask as given) with per-part position
  ids. SDPA takes it as a boolean mask, eager as an additive one. On CPU an sdpa model instead
  attends unit by unit (packed_attention.py: the same mask per unit, no work across units), and
  its micro-batch is one row without padding (`row_tokens`). FlashAttention-2 cannot take
  an arbitrary mask (its varlen path expresses restarts, not a prompt shared by two responses):
  it is refused with a message rather than silently attending across sequences.
- LM head: a forward pre-hook on the output embedding gathers the M hidden states whose logits
  predict a response token before the head runs, so the (M, V) logits are the only ones ever
  computed: neither prompt positions nor padding reach the vocabulary projection. The hook
  sits on the innermost module, so DDP/FSDP/peft wrappers still run their own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .batch import PackedBatch
from .data.packing import PROMPT
from .forward import ForwardOutput, _innermost
from .logprobs import token_logps
from .models import PolicyAndReference
from .packed_attention import KWARG, applies, unit_plan

SUPPORTED_ATTENTION = ("sdpa", "eager")


def block_mask(segment: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """(R, 1, T, T) bool: query q may attend key k (k <= q, same unit, k in the prompt or q's part).

    Padding (segment -1) forms one unit of its own, so no query row is empty (an all-masked
    SDPA row is NaN, and NaN would leak through the zero attention weights of real tokens).
    """
    t = segment.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment.device).tril()
    same = segment[:, :, None] == segment[:, None, :]  # (R, T, T) q, k
    visible = (part[:, None, :] == PROMPT) | (part[:, :, None] == part[:, None, :])
    return (causal & same & visible)[:, None]


def _attention_mask(model: torch.nn.Module, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    impl = getattr(getattr(_innermost(model), "config", None), "_attn_implementation", "sdpa") or "sdpa"
    if impl == "sdpa":
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"training.packing needs the sdpa or eager attention implementation, the model uses "
                     f"{impl!r} (FlashAttention cannot express the shared-prompt mask); unset training.packing")


@contextlib.contextmanager
def _head_gathers(model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[bool]:
    """While active, the output head sees only hidden[rows, cols] as a (1, M, H) batch.

    Yields False (and gathers nothing) for a model without a findable output embedding: the
    caller then gathers from the full logits instead.
    """
    inner = _innermost(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Module):
        yield False
        return

    def gather(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]  # (R, T, H)
        return (hidden[rows, cols].unsqueeze(0), *args[1:])  # (1, M, H)

    handle = head.register_forward_pre_hook(gather)
    try:
        yield True
    finally:
        handle.remove()


def row_tokens(model: torch.nn.Module, row_tokens: int | None, max_tokens: int, max_length: int) -> int:
    """Length of a packed row: `packing.rowTokens` if set; else the whole micro-batch in one row
    where attention runs unit by unit (no padding, attention cost independent of the row), else
    `data.maxLength` (a dense mask costs row length squared per row)."""
    if row_tokens:
        return row_tokens
    return max_tokens if applies(model, _innermost(model)) else max_length


def packed_forward(model: torch.nn.Module, packed: PackedBatch) -> ForwardOutput:
    """Per-sequence log-probs of a packed micro-batch, in the padded forward's `ForwardOutput`."""
    device = next(model.parameters()).device
    input_ids = packed["input_ids"].to(device)  # (R, T)
    segment, part = packed["segment"].to(device), packed["part"].to(device)
    rows, cols = packed["tgt_row"].to(device), packed["src_pos"].to(device)  # (M,)
    dtype = next(model.parameters()).dtype
    if applies(model, _innermost(model)):
        # transformers passes a 4D mask through untouched (it would otherwise derive a dense one
        # from the restarting position ids); the plan's per-unit masks replace it.
        attn: dict[str, Any] = {"attention_mask": torch.ones(input_ids.shape[0], 1, 1, 1, dtype=torch.bool,
                                                             device=device),
                                KWARG: unit_plan(segment, part, block_mask)}
    else:
        attn = {"attention_mask": _attention_mask(model, block_mask(segment, part), dtype)}
    with _head_gathers(model, rows, cols) as gathered:
        out = model(input_ids=input_ids, position_ids=packed["position_ids"].to(device), use_cache=False, **attn)
    logits = out.logits[0] if gathered else out.logits[rows, cols]  # (M, V)
    del out
    per_token, mean_logit = token_logps(logits, packed["target"].to(device))
    seq = packed["seq"].to(device)
    n = 2 * packed["pairs"]
    work = per_token.dtype
    logps = torch.zeros(n, dtype=work, device=device).index_add(0, seq, per_token)
    logits_sum = torch.zeros(n, dtype=work, device=device).index_add(0, seq, mean_logit).detach()
    counts = torch.zeros(n, dtype=work, device=device).index_add(0, seq, torch.ones_like(per_token))
    b = packed["pairs"]
    return ForwardOutput(logps[:b], logps[b:], counts[:b], counts[b:], logits_sum[:b], logits_sum[b:])


def packed_reference(models: PolicyAndReference, packed: PackedBatch) -> ForwardOutput | None:
    """The reference's packed forward (no grad, or the LoRA adapter disabled); None if reference-free."""
    if not models.has_reference:
        return None
    with models.reference_context() as ref:
        return packed_forward(ref, packed)
