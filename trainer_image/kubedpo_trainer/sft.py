"""Supervised fine-tuning's objective (task sft): next-token cross-entropy on the target tokens.

Normalisation: the loss of one optimizer step is the mean negative log-likelihood per target
token over the whole global batch: every micro-batch of the step on every rank,

    loss = sum_i w_i * NLL_i / sum_i w_i * n_i

(NLL_i: summed NLL of row i's target tokens, n_i its target tokens, w_i its `weight`, 1 unless
the row says otherwise, 0 for onBadRecord padding). Long and short responses count per token
(as TRL's SFT and HF's gradient-accumulation fix), and the value and its gradients are those of
one big batch however the rows are split over ranks and accumulation steps: each micro-batch
backpropagates its share `sum_(i in micro) w_i NLL_i / N` with N the step's global token count
(one all-reduce before the step), scaled back up by the averaging that accelerate (over
accumulation steps) and DDP/FSDP (over ranks) apply to gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .batch import SFTBatch
from .forward import logits_to_keep, supports_logits_to_keep
from .logprobs import sequence_logps


@dataclass(frozen=True)
class SFTOutput:
    nll: torch.Tensor  # (B,) summed NLL of each row's target tokens (differentiable)
    tokens: torch.Tensor  # (B,) target tokens per row
    correct: torch.Tensor  # (B,) target tokens the model ranks first (argmax), detached


def sft_forward(model: torch.nn.Module, batch: SFTBatch) -> SFTOutput:
    """Per-row NLL, token counts and argmax hits of a (B, T) batch from one forward.

    Logits are kept only from the position predicting the earliest target token (as DPO's
    forward), and the NLL goes through the chunked `sequence_logps` (no float32 (B, T, V) copy).
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)  # (B, T)
    loss_mask = batch["loss_mask"].to(device)  # (B, T)
    kwargs: dict[str, Any] = {"use_cache": False}
    if supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = logits_to_keep(loss_mask)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), **kwargs).logits
    seq = sequence_logps(logits, input_ids, loss_mask)  # (B,)
    correct = argmax_hits(logits.detach(), input_ids, loss_mask)
    return SFTOutput(-seq.logps, seq.counts, correct)


def argmax_hits(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(B,) target tokens whose logit is the largest; logits (B, L, V) are the last L positions."""
    offset = input_ids.shape[1] - logits.shape[1]
    shifted = loss_mask.bool()[:, offset + 1:]  # (B, L-1): positions predicting a target token
    hits = (logits[:, :-1].argmax(-1) == input_ids[:, offset + 1:]) & shifted
    return hits.sum(-1).float()


def sft_loss(out: SFTOutput, weight: torch.Tensor, global_tokens: float) -> torch.Tensor:
    """This micro-batch's share of the step's mean NLL per target token (module docstring).

    weight: (B,) row weights; global_tokens: sum of weight x target tokens over the step's
    micro-batches on all ranks (> 0). Summing this over the step's micro-batches and ranks
    gives the step's loss.
    """
    if global_tokens <= 0:
        raise ValueError(f"global_tokens must be > 0, got {global_tokens}")
    w = weight.to(out.nll.device, out.nll.dtype)
    return (w * out.nll).sum() / global_tokens


def weighted_tokens(batch: SFTBatch) -> float:
    """sum_i w_i * n_i of a batch (the normaliser's share of this micro-batch), without a forward.

    n_i counts target tokens that have a prediction (token 0 of a sequence has none).
    """
    mask = batch["loss_mask"].bool()[:, 1:]
    return float((batch["weight"] * mask.sum(-1).float()).sum())
