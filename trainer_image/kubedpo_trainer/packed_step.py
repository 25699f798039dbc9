"""One optimizer step with `training.packing`: the step's pairs, split by a token budget, packed.

The data unit stays the stream's: a step takes batchSize x gradientAccumulationSteps pairs per
rank (so the stream's exact resume and exactly-once hold unchanged), then splits them into
micro-batches of at most `packing.maxTokens` tokens. Ranks agree on the micro-batch count (one
tiny all-reduce; a rank with shorter pairs splits further), so every rank runs as many
forwards (FSDP gathers per forward) and one gradient all-reduce, on the last micro-batch.

The loss is the step's weighted mean over its pairs, sum(w * l) / sum(w), however the pairs are
split: each micro-batch backpropagates its share, sum over its pairs of w * l / sum(w of step).
With equal weights that is exactly what the padded path computes (mean over equal micro-batches).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from . import collectives
from .batch import Batch, PackedBatch
from .data.packing import pack, rows_from_batch, split_by_budget, split_into
from .forward import ForwardOutput, dpo_metrics, logit_totals
from .losses import LossInputs, beta_at, compute_loss
from .packed_forward import packed_forward, packed_reference, row_tokens


@dataclass(frozen=True)
class _StepLoss:
    """What dpo_metrics reads from a LossOutput, over the whole step."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _cat(outs: list[ForwardOutput]) -> ForwardOutput:
    return ForwardOutput(*(torch.cat([getattr(o, f) for o in outs]) for f in ForwardOutput.__dataclass_fields__))


def micro_batches(trainer: Any, batches: list[Batch]) -> list[PackedBatch]:
    """The step's stream batches as packed micro-batches, as many on every rank."""
    pk = trainer.cfg.training.packing
    rows = [r for b in batches for r in rows_from_batch(b)]
    chunks = split_by_budget(rows, pk.max_tokens, pk.share_prompt)
    mine = torch.tensor([len(chunks)], device=trainer.acc.device)
    count = int(trainer.acc.reduce(mine, reduction="max")) if trainer.world > 1 else len(chunks)
    chunks = split_into(rows, chunks, count, pk.share_prompt)
    length = row_tokens(trainer.models.policy, pk.row_tokens, pk.max_tokens, trainer.cfg.data.max_length)
    tok = trainer.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return [pack([rows[i] for i in c], pad, pk.share_prompt, length) for c in chunks]


def train_step_packed(trainer: Any, batches: list[Batch]) -> dict[str, float]:
    """`Trainer.train_step` for packed micro-batches (same metrics, same optimizer/scheduler steps)."""
    t, acc, policy = trainer.cfg.training, trainer.acc, trainer.models.policy
    beta = beta_at(trainer.step, trainer.total_steps, t)
    packed = micro_batches(trainer, batches)
    total_weight = torch.cat([p["weight"] for p in packed]).sum().clamp(min=1e-12)
    outs, losses, chosen, rejected = [], [], [], []
    for i, mb in enumerate(packed):
        last = i == len(packed) - 1
        with contextlib.nullcontext() if last else acc.no_sync(policy):
            pol = packed_forward(policy, mb)
            with acc.autocast():  # the policy's forward is autocast by accelerate: match it
                ref = (trainer.reference.lookup(mb) if trainer.reference.table is not None
                       else packed_reference(trainer.models, mb))
            out = compute_loss(t.loss, LossInputs.from_forward(pol, ref, mb), beta, t)
            w = mb["weight"].to(out.losses.device, out.losses.dtype)
            share = (out.losses * w).sum() / total_weight.to(out.losses.device)
            # accelerate divides by gradientAccumulationSteps; the share is already the step's part.
            acc.backward(share * acc.gradient_accumulation_steps)
        outs.append(pol)
        losses.append(share.detach())
        chosen.append(out.chosen_rewards)
        rejected.append(out.rejected_rewards)
        trainer.metrics.inc("samples", len(mb["row_ids"]))
        trainer.metrics.inc("tokens", mb["num_tokens"])
        trainer.tokens_total += mb["num_tokens"]
    acc.gradient_state._set_sync_gradients(True)  # the optimizer steps only when this is set
    grad_norm = trainer._clip()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step()
    policy_out = _cat(outs)
    step_loss = _StepLoss(torch.stack(losses).sum(), torch.cat(chosen), torch.cat(rejected))
    pairs = float(sum(int((b["weight"] > 0).sum()) for b in batches))  # real pairs: padding is no data
    values = collectives.mean_over_ranks(acc, {k: v * pairs for k, v in dpo_metrics(step_loss, policy_out).items()},
                                         pairs, logit_totals(policy_out)[None] * (pairs > 0))
    values.update(grad_norm=grad_norm, learning_rate=trainer.scheduler.get_last_lr()[0], beta=beta)
    return values
