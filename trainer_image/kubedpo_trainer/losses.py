"""DPO loss variants: one pure function each, chosen by name (config.LossType) from a registry.

Every function maps sequence log-probs (B,) to per-pair losses (B,). Notation (as in TRL):
  r_c = logp_c - ref_c, r_r = logp_r - ref_r   the chosen / rejected log-ratios (implicit rewards / beta)
  h = r_c - r_r                                 the chosen-minus-rejected margin of log-ratios
Rewards reported with them are TRL DPOTrainer's, beta * r (detached); for the reference-free
SimPO they are TRL CPOTrainer's, beta * logp / |y|. The formulas of every variant TRL also has
are tested against TRL's own code on identical tensors (tests/trainer/test_losses.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .batch import PairFields
from .config import LossType, TrainingConfig


class PairLogps(Protocol):
    """Summed response log-probs of a batch's pairs: `reference.ReferenceLogps` or `forward.ForwardOutput`."""

    @property
    def chosen_logps(self) -> torch.Tensor: ...  # (B,)

    @property
    def rejected_logps(self) -> torch.Tensor: ...  # (B,)


class PolicyLogps(PairLogps, Protocol):
    """The policy's side also counts response tokens (length-normalised losses): `forward.ForwardOutput`."""

    @property
    def chosen_len(self) -> torch.Tensor: ...  # (B,)

    @property
    def rejected_len(self) -> torch.Tensor: ...  # (B,)


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
    def from_forward(cls, policy: PolicyLogps, ref: PairLogps | None, batch: PairFields) -> LossInputs:
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

    def logratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_c, r_r), each (B,)."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs reference log-probs (training.loss is not reference-free)")
        return self.policy_chosen - self.ref_chosen, self.policy_rejected - self.ref_rejected

    def logratio(self) -> torch.Tensor:
        """h = r_c - r_r, (B,)."""
        c, r = self.logratios()
        return c - r


class LossSummary(Protocol):
    """What the logged metrics read of a loss: `LossOutput`, or a packed step's totals."""

    @property
    def loss(self) -> torch.Tensor: ...

    @property
    def chosen_rewards(self) -> torch.Tensor: ...  # (B,) detached

    @property
    def rejected_rewards(self) -> torch.Tensor: ...  # (B,) detached


@dataclass(frozen=True)
class LossOutput:
    losses: torch.Tensor  # (B,) per pair
    loss: torch.Tensor  # () weighted mean, the value to backpropagate
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


Params = TrainingConfig
LossFn = Callable[[LossInputs, float, Params], torch.Tensor]


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1-eps) log sigma(z) - eps log sigma(-z): BCE against a soft label 1-eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta*h). With label smoothing eps it is
    conservative DPO (Mitchell 2023, cDPO; TRL's sigmoid before 1.0): -(1-eps) log sigma(beta*h)
    - eps log sigma(-beta*h)."""
    return _smoothed(beta * x.logratio(), p.label_smoothing)


def _avg_logratios(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = x.logratios()
    return c / x.chosen_len.clamp(min=1), r / x.rejected_len.clamp(min=1)


def ipo(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17) on length-averaged log-ratios, as TRL does (confirmed with the
    authors): (r_c/|y_c| - r_r/|y_r| - 1/(2*beta))^2."""
    c, r = _avg_logratios(x)
    return (c - r - 1 / (2 * beta)) ** 2


def sigmoid_norm(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """DPO on length-averaged log-ratios (TRL's sigmoid_norm): -log sigma(beta*(r_c/|y_c| - r_r/|y_r|))."""
    c, r = _avg_logratios(x)
    return -F.logsigmoid(beta * (c - r))


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
    """ODPO (Amini, Vieira, Cotterell 2024, "Direct Preference Optimization with an Offset",
    arXiv:2402.10571): -log sigma(beta*h - Delta_r) with Delta_r = alpha * f(score_w - score_l).

    The row's `margin` is taken as f(score_w - score_l) as is; the paper's experiments (and its
    code, rycolab/odpo `preference_loss`) use f = log, so write log(score gap) into the margin
    column to reproduce them. Margin 0 gives plain DPO.
    """
    return -F.logsigmoid(beta * x.logratio() - p.offset_alpha * x.margin.to(x.policy_chosen.dtype))


def simpo(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free and length-normalised, as TRL's CPOTrainer:
    z = beta*(logp_c/|y_c| - logp_r/|y_r|) - gamma; loss = -(1-eps) log sigma(z) - eps log sigma(-z)."""
    c = x.policy_chosen / x.chosen_len.clamp(min=1)
    r = x.policy_rejected / x.rejected_len.clamp(min=1)
    return _smoothed(beta * (c - r) - p.simpo_gamma, p.label_smoothing)


def exo_pair(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """EXO (Ji et al. 2024, eq. 16, K=2): KL(q || p_eps) with q = softmax of beta*r over
    {chosen, rejected} and target p_eps = (1-eps, eps); eps = labelSmoothing > 0."""
    eps = p.label_smoothing
    if eps <= 0:
        raise ValueError("training.labelSmoothing must be > 0 with loss exo_pair")
    z = beta * x.logratio()
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def nca_pair(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """NCA (Chen et al. 2024, pairwise): -log sigma(beta*r_c) - 1/2 log sigma(-beta*r_c) - 1/2 log sigma(-beta*r_r)."""
    c, r = x.logratios()
    return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)


def bco_pair(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """TRL 1.16 DPOTrainer's bco_pair (BCO, Jung et al. 2024, without the running reward shift):
    -log sigma(beta*r_c) - log sigma(-beta*r_r)."""
    c, r = x.logratios()
    return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)


def sppo_hard(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities 1/0:
    (r_c - 1/(2 beta))^2 + (r_r + 1/(2 beta))^2."""
    c, r = x.logratios()
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


def apo_zero(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): push chosen up and rejected down absolutely:
    1 - sigma(beta*r_c) + sigma(beta*r_r)."""
    c, r = x.logratios()
    return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)


def apo_down(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8), for chosen answers worse than the model's own:
    sigma(beta*r_c) + 1 - sigma(beta*(r_c - r_r))."""
    c, r = x.logratios()
    return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))


def discopop(x: LossInputs, beta: float, p: Params) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, eq. 5), z = beta*h:
    mix = sigma(z/tau); loss = (1-mix) * -log sigma(z) + mix * exp(-z)."""
    z = beta * x.logratio()
    mix = torch.sigmoid(z / p.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


REGISTRY: dict[str, LossFn] = {
    LossType.sigmoid: sigmoid,
    LossType.ipo: ipo,
    LossType.hinge: hinge,
    LossType.robust: robust,
    LossType.offset: offset,
    LossType.simpo: simpo,
    LossType.sigmoid_norm: sigmoid_norm,
    LossType.exo_pair: exo_pair,
    LossType.nca_pair: nca_pair,
    LossType.bco_pair: bco_pair,
    LossType.sppo_hard: sppo_hard,
    LossType.apo_zero: apo_zero,
    LossType.apo_down: apo_down,
    LossType.discopop: discopop,
}
REFERENCE_FREE = {LossType.simpo.value}


def rewards(name: str, x: LossInputs, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached (chosen, rejected) rewards, each (B,): beta*r, or beta*logp/|y| when reference-free."""
    if name in REFERENCE_FREE:
        c = x.policy_chosen / x.chosen_len.clamp(min=1)
        r = x.policy_rejected / x.rejected_len.clamp(min=1)
    else:
        c, r = x.logratios()
    return (beta * c).detach(), (beta * r).detach()


def compute_loss(name: str, x: LossInputs, beta: float, params: Params) -> LossOutput:
    """Per-pair losses of variant `name`, their weighted mean sum(w*l)/sum(w), and the rewards."""
    try:
        fn = REGISTRY[LossType(name)]
    except ValueError:
        raise ValueError(f"training.loss: unknown loss {name!r}; one of {sorted(REGISTRY)}") from None
    losses = fn(x, beta, params)
    w = x.weight.to(losses.dtype)
    loss = (losses * w).sum() / w.sum().clamp(min=1e-12)
    chosen, rejected = rewards(name, x, beta)
    return LossOutput(losses, loss, chosen, rejected)


def beta_at(step: int, total_steps: int, t: TrainingConfig) -> float:
    """beta for optimizer `step` (0-based) under training.betaSchedule: training.beta at step 0,
    betaSchedule.final at the last step (total_steps - 1), linear or half-cosine in between."""
    s = t.beta_schedule
    if s is None or total_steps <= 1:
        return t.beta
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    if s.kind == "cosine":
        frac = (1 - math.cos(math.pi * frac)) / 2
    return t.beta + (s.final - t.beta) * frac
