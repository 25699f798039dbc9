"""One forward over chosen and rejected together, and TRL's per-batch DPO metrics.

Chosen and rejected rows share the prompt, so running them as one (2B, T) batch halves the
number of forward calls (and FSDP/DDP collectives) and keeps one padding length. Logits are
only computed from the position that predicts the earliest response token on (HF
`logits_to_keep`): prompt positions never enter the loss, and at a 128k vocabulary their logits
are most of the activation memory of a long-prompt batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .batch import Batch
from .logprobs import sequence_logps
from .losses import LossSummary


@dataclass(frozen=True)
class ForwardOutput:
    chosen_logps: torch.Tensor  # (B,) summed response log-probs
    rejected_logps: torch.Tensor  # (B,)
    chosen_len: torch.Tensor  # (B,) response tokens
    rejected_len: torch.Tensor  # (B,)
    chosen_logits_sum: torch.Tensor  # (B,) detached: sum over response positions of the vocab-mean logit
    rejected_logits_sum: torch.Tensor  # (B,)


def logits_to_keep(loss_mask: torch.Tensor) -> int:
    """How many trailing positions need logits: from the one predicting the earliest response token.

    The logit at position j predicts token j+1, so a response starting at token `first` needs
    positions first-1 .. T-1. A batch without response tokens keeps everything (nothing to save).
    """
    t = loss_mask.shape[1]
    any_pos = loss_mask.bool().any(0)  # (T,)
    if not bool(any_pos.any()):
        return t
    first = int(any_pos.nonzero()[0])
    return t - max(first - 1, 0)


def _innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP/FSDP (`.module`) and peft (`get_base_model`) wrappers."""
    m = model
    for _ in range(8):  # wrappers nest a few levels at most
        get_base_model = getattr(m, "get_base_model", None)  # peft's wrapper (its base also has peft_config)
        if callable(get_base_model):
            m = get_base_model()
        elif isinstance(inner := getattr(m, "module", None), torch.nn.Module):
            m = inner
        else:
            break
    return m


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM's forward names `logits_to_keep` (transformers >= 4.50 decoders do).

    Wrappers pass **kwargs through, so we look at the innermost model; a model that merely
    swallows **kwargs would return full logits, which `sequence_logps` also handles.
    """
    try:
        return "logits_to_keep" in inspect.signature(_innermost(model).forward).parameters
    except (TypeError, ValueError):
        return False


def concatenated_forward(model: torch.nn.Module, batch: Batch) -> ForwardOutput:
    """Policy (or reference) log-probs of a (2B, T) chosen+rejected batch from one forward.

    Rows 0..B-1 are prompt+chosen and B..2B-1 prompt+rejected (the collate contract).
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)  # (2B, T)
    loss_mask = batch["loss_mask"].to(device)  # (2B, T)
    if input_ids.shape[0] % 2:
        raise ValueError(f"batch input_ids has {input_ids.shape[0]} rows; expected 2B (chosen then rejected)")
    kwargs: dict[str, Any] = {"use_cache": False}
    if supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = logits_to_keep(loss_mask)
    out = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), **kwargs)
    seq = sequence_logps(out.logits, input_ids, loss_mask)
    del out  # the (2B, L, V) logits are no longer needed; only response rows live on in autograd
    b = input_ids.shape[0] // 2
    return ForwardOutput(
        seq.logps[:b], seq.logps[b:], seq.counts[:b], seq.counts[b:], seq.logits_sum[:b], seq.logits_sum[b:]
    )


def dpo_metrics(loss_out: LossSummary, policy: ForwardOutput, prefix: str = "") -> dict[str, float]:
    """TRL 1.16 DPOTrainer's logged values for one batch, names with '/' -> '_' and `prefix` prepended.

    As in `DPOTrainer._compute_loss`: rewards, accuracies, margins and logps are means over pairs;
    accuracies count strict `chosen > rejected` (ties are wrong); logits/* are token-weighted
    (total vocab-mean logit over total response tokens), not a mean of per-sequence means.
    """
    c, r = loss_out.chosen_rewards.detach().float(), loss_out.rejected_rewards.detach().float()
    values: dict[str, torch.Tensor | float] = {
        "loss": loss_out.loss.detach(),
        "rewards_chosen": c.mean(),
        "rewards_rejected": r.mean(),
        "rewards_accuracies": (c > r).float().mean(),
        "rewards_margins": (c - r).mean(),
        "logps_chosen": policy.chosen_logps.detach().mean(),
        "logps_rejected": policy.rejected_logps.detach().mean(),
        **logits_from_totals(logit_totals(policy)),
    }
    return {prefix + k: float(v) for k, v in values.items()}


def logit_totals(policy: ForwardOutput) -> torch.Tensor:
    """[chosen logit sum, chosen tokens, rejected logit sum, rejected tokens] of one batch, float64.

    Summed over ranks these give TRL's logits/* exactly: a global token mean, which a mean of
    per-rank means is not when ranks hold different numbers of response tokens.
    """
    return torch.stack([policy.chosen_logits_sum.detach().sum(), policy.chosen_len.sum(),
                        policy.rejected_logits_sum.detach().sum(), policy.rejected_len.sum()]).double()


def logits_from_totals(totals: torch.Tensor) -> dict[str, float]:
    """logits_chosen/rejected from (micro-batches, 4) totals summed (or averaged) over ranks: the
    global token mean per micro-batch, averaged over micro-batches (as TRL averages its logged values)."""
    t = totals.reshape(-1, 4)

    def ratio(sums: torch.Tensor, tokens: torch.Tensor) -> float:
        # Totals may be averaged over ranks (fractional token counts): only guard against zero.
        has = tokens > 0
        return float(torch.where(has, sums / torch.where(has, tokens, torch.ones_like(tokens)), 0.0).mean())

    return {"logits_chosen": ratio(t[:, 0], t[:, 1]), "logits_rejected": ratio(t[:, 2], t[:, 3])}

