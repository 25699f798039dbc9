"""Task sft: the DPO Trainer's loop (streaming, checkpoints, resume, metrics, export) with the
SFT objective of `sft.py` and no reference model.

Only the step and the evaluation differ from DPO: rows are prompt+target (`data/sft.py`),
one (B, T) forward per micro-batch, the loss is the step's mean NLL per target token.
LoRA trains the adapter (exported as for DPO); FSDP shards the policy as for DPO.
Refused (ConfigError at validation, config.py): packing and precomputed reference log-probs,
which are DPO-only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from . import collectives
from .batch import SFTBatch
from .data.stream import PreferenceStream, RowKind
from .evaluate import equal_batch_counts
from .metrics import DPO_GAUGES
from .sft import sft_forward, sft_loss, weighted_tokens
from .train import Trainer

log = logging.getLogger(__name__)


class SFTTrainer(Trainer):
    row_kind: RowKind = "sft"
    uses_reference = False
    # No pairs, no reference, no beta: these series would only ever read 0.
    unused_gauges = frozenset({n for n in DPO_GAUGES if n != "loss"} | {"beta"})

    def train_step(self, batches: list[Any]) -> dict[str, float] | None:
        """One optimizer step; None (skipped, scheduler advanced) when no rank has a target token."""
        shares = [weighted_tokens(b) for b in batches]  # this rank's weighted target tokens per micro-batch
        total = collectives.sum_over_ranks(self.acc, sum(shares))
        if total <= 0:
            self.scheduler.step()
            return None
        # accelerate divides each micro-batch's loss by the accumulation steps and DDP/FSDP average
        # gradients over ranks: undo both so the step's gradient is that of the global token mean.
        scale = self.world * self.cfg.training.gradient_accumulation_steps
        nll = correct = 0.0
        grad_norm = float("nan")
        for batch in batches:
            with self.acc.accumulate(self.models.policy):
                out = sft_forward(self.models.policy, batch)
                loss = sft_loss(out, batch["weight"], total)
                self.acc.backward(loss * scale)
                if self.acc.sync_gradients:
                    grad_norm = self._clip()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            w = batch["weight"].to(out.nll.device)
            nll += float((w * out.nll.detach()).sum())
            correct += float((w * out.correct).sum())
            self.metrics.inc("samples", int((batch["weight"] > 0).sum()))
            self.metrics.inc("tokens", batch["num_tokens"])
            self.tokens_total += batch["num_tokens"]
        self.scheduler.step()
        sums = collectives.sum_each(self.acc, [nll, correct])
        return {"loss": sums[0] / total, "mean_token_accuracy": sums[1] / total, "grad_norm": grad_norm,
                "learning_rate": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean NLL per target token (`eval_loss`) and argmax token accuracy over all eval rows."""
        if not self.cfg.data.eval:
            return {}
        policy = self.acc.unwrap_model(self.models.policy)
        was_training = policy.training
        policy.eval()
        stream = PreferenceStream.for_eval(self.cfg.data, self.cfg.data.eval, self.tokenizer, self.rank,
                                           self.world, self.cfg.training.batch_size, rows="sft")
        batches: Iterable[SFTBatch] = stream.eval_batches()
        real = None
        if self.fsdp:  # every rank must run the same number of forwards (all-gathers pair up)
            batches, real = equal_batch_counts(self.acc, list(batches), self.cfg.data.eval)
        nll = correct = tokens = 0.0
        for i, batch in enumerate(batches):
            with self.acc.autocast():
                out = sft_forward(policy, batch)
            if real is not None and i >= real:
                continue
            w = batch["weight"].to(out.nll.device)
            nll += float((w * out.nll).sum())
            correct += float((w * out.correct).sum())
            tokens += float((w * out.tokens).sum())
        if was_training:
            policy.train()
        nll, correct, tokens = collectives.sum_each(self.acc, [nll, correct, tokens])
        if tokens == 0:
            return {}
        values = {"eval_loss": nll / tokens, "eval_mean_token_accuracy": correct / tokens}
        self.metrics.set(values)
        self.log.eval(self.step, values)
        return values

    def result(self, summary: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"step": summary["step"], "loss": summary["train"].get("loss"),
                               "outputUri": self.cfg.output.uri}
        if "eval_loss" in summary["eval"]:
            out["evalLoss"] = summary["eval"]["eval_loss"]
        return out
