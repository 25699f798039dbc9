"""DPO loss variants: one pure function each, chosen by name from a registry.

Every function maps sequence log-probs (B,) to per-pair losses (B,); the rewards reported
with them are TRL's: reward = beta * (log pi(y|x) - log pi_ref(y|x)), detached (SimPO: beta times
the length-normalised policy log-prob, as TRL's CPOTrainer defines it).
Notation: h = (logp_c - ref_c) - (logp_r - ref_r), the chosen-minus-rejected log-ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import LossType, TrainingConfig


@dataclass(frozen=True)
class LossInputs:
    policy_chosen: torch.Tensor  # (B,) summed response log-probs under the policy
    policy_rejected: torch.Tensor  # (B,)
    ref_chosen: torch.Tensor | None  # (B,) under the reference; None for reference-free losses
    ref_rejected: torch.Tensor | None
    chosen_len: torch.Tensor  # (B,) response tokens
    rejected_len: torch.Tensor
    margin: torch.Tensor  # (B,) per-row margin (ODPO); zeros when absent
    weight: torch.Tensor  # (B,) per-row weight; ones when absent

    @classmethod
    def from_forward(cls, policy: Any, ref: Any, batch: dict[str, Any]) -> LossInputs:
        """From `forward.ForwardOutput`s of policy and reference (None when reference-free)."""
        dev = policy.chosen_logps.device
        return cls(
            policy.chosen_logps,
            policy.rejected_logps,
            None if ref is None else ref.chosen_logps.detach().to(dev),  # precomputed ones live on CPU
            None if ref is None else ref.rejected_logps.detach().to(dev),
            policy.chosen_len,
            policy.rejected_len,
            batch["margin"].to(dev),
            batch["weight"].to(dev),
        )

    def logratio(self) -> torch.Tensor:
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs reference log-probs")
        return (self.policy_chosen - self.ref_chosen) - (self.policy_rejected - self.ref_rejected)


@dataclass(frozen=True)
class LossOutput:
    losses: torch.Tensor  # (B,) per pair
    loss: torch.Tensor  # () weighted mean, the value to backpropagate
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


Params = TrainingConfig
LossFn = Callable[[LossInputs, float, Params], torch.Tensor]


def sigmoid(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigma(beta*h); with label smoothing eps, conservative DPO:
    -(1-eps) log sigma(beta*h) - eps log sigma(-beta*h)."""
    h = beta * x.logratio()
    eps = p.label_smoothing
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def ipo(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17) on length-averaged log-ratios as TRL does:
    (h_c/|y_c| - h_r/|y_r| - 1/(2*beta))^2, with h_c = logp_c - ref_c."""
    assert x.ref_chosen is not None and x.ref_rejected is not None
    c = (x.policy_chosen - x.ref_chosen) / x.chosen_len.clamp(min=1)
    r = (x.policy_rejected - x.ref_rejected) / x.rejected_len.clamp(min=1)
    return (c - r - 1 / (2 * beta)) ** 2


def hinge(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023): relu(1 - beta*h)."""
    return torch.relu(1 - beta * x.logratio())


def robust(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): unbiased under label-flip rate eps:
    (-(1-eps) log sigma(beta*h) + eps log sigma(-beta*h)) / (1 - 2 eps)."""
    h = beta * x.logratio()
    eps = p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


def offset(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """ODPO (Amini et al. 2024, eq. 6): -log sigma(beta*h - delta), delta = alpha * margin,
    where the row's margin says how much better chosen is (e.g. a reward-score gap)."""
    return -F.logsigmoid(beta * x.logratio() - p.offset_alpha * x.margin)


def simpo(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """SimPO (Meng et al. 2024): reference-free, length-normalised:
    -log sigma(beta*(logp_c/|y_c| - logp_r/|y_r|) - gamma)."""
    c = x.policy_chosen / x.chosen_len.clamp(min=1)
    r = x.policy_rejected / x.rejected_len.clamp(min=1)
    return -F.logsigmoid(beta * (c - r) - p.simpo_gamma)


REGISTRY: dict[str, LossFn] = {
    LossType.sigmoid: sigmoid,
    LossType.ipo: ipo,
    LossType.hinge: hinge,
    LossType.robust: robust,
    LossType.offset: offset,
    LossType.simpo: simpo,
}
REFERENCE_FREE = {LossType.simpo.value}


def rewards(name: str, x: LossInputs, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    if name in REFERENCE_FREE:
        return (beta * x.policy_chosen / x.chosen_len.clamp(min=1)).detach(), (
            beta * x.policy_rejected / x.rejected_len.clamp(min=1)
        ).detach()
    assert x.ref_chosen is not None and x.ref_rejected is not None
    return (beta * (x.policy_chosen - x.ref_chosen)).detach(), (beta * (x.policy_rejected - x.ref_rejected)).detach()


def compute_loss(name: str, x: LossInputs, beta: float, params: Params) -> LossOutput:
    fn = REGISTRY[LossType(name)]
    losses = fn(x, beta, params)
    w = x.weight.to(losses.dtype)
    loss = (losses * w).sum() / w.sum().clamp(min=1e-12)
    chosen, rejected = rewards(name, x, beta)
    return LossOutput(losses, loss, chosen, rejected)


def beta_at(step: int, total_steps: int, t: TrainingConfig) -> float:
    """beta for `step` (0-based) under training.betaSchedule: training.beta -> betaSchedule.final."""
    s = t.beta_schedule
    if s is None or total_steps <= 1:
        return t.beta
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    if s.kind == "cosine":
        frac = (1 - math.cos(math.pi * frac)) / 2
    return t.beta + (s.final - t.beta) * frac
