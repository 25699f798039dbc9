"""One forward over chosen and rejected together, and TRL's per-batch DPO metrics.

Chosen and rejected rows share the prompt, so running them as one (2B, T) batch halves the
number of kernel launches and keeps one padding length. Logits are only computed from the
earliest response position on (`logits_to_keep`): prompt positions never enter the loss, and
at a 128k vocabulary their logits are most of the activation memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .logprobs import sequence_logps


@dataclass(frozen=True)
class ForwardOutput:
    chosen_logps: torch.Tensor  # (B,)
    rejected_logps: torch.Tensor  # (B,)
    chosen_len: torch.Tensor  # (B,) response tokens
    rejected_len: torch.Tensor  # (B,)
    chosen_logits_sum: torch.Tensor  # (B,) sum over response positions of the vocab-mean logit
    rejected_logits_sum: torch.Tensor  # (B,)


def logits_to_keep(loss_mask: torch.Tensor) -> int:
    """Positions from the one predicting the earliest response token to the end."""
    t = loss_mask.shape[1]
    any_pos = loss_mask.any(0)
    if not bool(any_pos.any()):
        return t
    first = int(torch.nonzero(any_pos)[0])
    return t - max(first - 1, 0)


def concatenated_forward(model: torch.nn.Module, batch: dict[str, Any]) -> ForwardOutput:
    input_ids = batch["input_ids"]
    loss_mask = batch["loss_mask"]
    device = next(model.parameters()).device
    input_ids, loss_mask = input_ids.to(device), loss_mask.to(device)
    keep = logits_to_keep(loss_mask)
    out = model(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"].to(device),
        logits_to_keep=keep,
        use_cache=False,
    )
    seq = sequence_logps(out.logits, input_ids, loss_mask)
    b = input_ids.shape[0] // 2
    return ForwardOutput(
        seq.logps[:b], seq.logps[b:], seq.counts[:b], seq.counts[b:], seq.logits_sum[:b], seq.logits_sum[b:]
    )


def dpo_metrics(loss_out: Any, policy: ForwardOutput, prefix: str = "") -> dict[str, float]:
    """TRL 1.16 DPOTrainer's logged values for one batch, names with '/' -> '_'."""
    c, r = loss_out.chosen_rewards, loss_out.rejected_rewards
    values = {
        "loss": loss_out.loss.detach(),
        "rewards_chosen": c.mean(),
        "rewards_rejected": r.mean(),
        "rewards_accuracies": (c > r).float().mean(),
        "rewards_margins": (c - r).mean(),
        "logps_chosen": policy.chosen_logps.detach().mean(),
        "logps_rejected": policy.rejected_logps.detach().mean(),
        # Token-weighted, as TRL: total logits over total response tokens.
        "logits_chosen": policy.chosen_logits_sum.detach().sum() / policy.chosen_len.sum().clamp(min=1),
        "logits_rejected": policy.rejected_logits_sum.detach().sum() / policy.rejected_len.sum().clamp(min=1),
    }
    return {prefix + k: float(v) for k, v in values.items()}
