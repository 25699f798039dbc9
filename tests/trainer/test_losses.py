"""Losses: equal to TRL's DPOTrainer on identical log-prob tensors, and to hand-computed values.

TRL is a test-only dependency. Its loss lives inside `DPOTrainer._compute_loss`, which calls the
model and reads per-token log-probs from the output; the test gives it a stand-in model whose
output carries exactly our tensors (and precomputed reference log-probs), so TRL's real loss
and metric code runs on the same numbers ours does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from trl import DPOTrainer

from kubedpo_trainer.config import BetaSchedule, TrainingConfig
from kubedpo_trainer.forward import ForwardOutput, dpo_metrics
from kubedpo_trainer.losses import LossInputs, beta_at, compute_loss

B, T = 6, 9


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T - 2, (2 * B,), generator=g)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        mask[i, T - n :] = 1  # the last n tokens are the response (prompt before them)
    per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64).float() * 3 * mask[:, 1:]
    mean_logits = torch.randn(2 * B, T - 1, generator=g) * mask[:, 1:]
    ref = -torch.rand(2 * B, generator=g) * 3 * lens
    return {"mask": mask, "per_token": per_token, "mean_logits": mean_logits, "ref": ref}


def _trl(loss_type: str, beta: float, label_smoothing: float, x: dict[str, torch.Tensor]):
    tr = DPOTrainer.__new__(DPOTrainer)
    fake_out = SimpleNamespace(
        log_probs=x["per_token"], mean_logits=x["mean_logits"], entropy=torch.zeros_like(x["per_token"]),
        is_top1=torch.zeros_like(x["per_token"], dtype=torch.bool), aux_loss=None,
    )

    class Model(torch.nn.Module):
        def forward(self, **kwargs):
            return fake_out

    model = Model().train()
    attrs = dict(
        model=model, accelerator=Accelerator(cpu=True), precompute_ref_logps=True, loss_types=[loss_type],
        loss_weights=[1.0], ld_alpha=None, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        ref_model=None,
    )
    for k, v in attrs.items():
        object.__setattr__(tr, k, v)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": x["mask"], "ref_chosen_logps": x["ref"][:B], "ref_rejected_logps": x["ref"][B:]}
    loss = tr._compute_loss(model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in tr._metrics["train"].items()}


def _ours(loss_type: str, beta: float, label_smoothing: float, x: dict[str, torch.Tensor]):
    logps = x["per_token"].sum(1)
    counts = x["mask"][:, 1:].sum(1).float()
    logit_sums = x["mean_logits"].sum(1)
    fwd = ForwardOutput(logps[:B], logps[B:], counts[:B], counts[B:], logit_sums[:B], logit_sums[B:])
    inputs = LossInputs(logps[:B], logps[B:], x["ref"][:B], x["ref"][B:], counts[:B], counts[B:],
                        torch.zeros(B), torch.ones(B))
    params = TrainingConfig(beta=beta, label_smoothing=label_smoothing)
    out = compute_loss(loss_type, inputs, beta, params)
    return float(out.loss), dpo_metrics(out, fwd)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_trl_loss_and_metrics(loss_type: str, seed: int) -> None:
    x = _tensors(seed)
    smoothing = 0.1 if loss_type == "robust" else 0.0
    trl_loss, trl_metrics = _trl(loss_type, 0.2, smoothing, x)
    our_loss, our_metrics = _ours(loss_type, 0.2, smoothing, x)
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected"):
        assert our_metrics[name.replace("/", "_")] == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert 0 < trl_metrics["rewards/accuracies"] < 1  # the tensors exercise both outcomes


def _inputs(pc, pr, rc, rr, lc=1.0, lr=1.0, margin=0.0) -> LossInputs:
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    return LossInputs(t(pc), t(pr), t(rc), t(rr), t(lc), t(lr), t(margin), t(1.0))


def test_sigmoid_by_hand() -> None:
    """h = (-1 - -2) - (-3 - -2.5) = 1.5; beta 0.1: loss = -log(sigmoid(0.15)) = log(1 + e^-0.15)."""
    out = compute_loss("sigmoid", _inputs(-1, -3, -2, -2.5), 0.1, TrainingConfig())
    assert float(out.loss) == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-7)
    assert float(out.chosen_rewards) == pytest.approx(0.1) and float(out.rejected_rewards) == pytest.approx(-0.05)


def test_ipo_by_hand() -> None:
    """Length-averaged log-ratios: chosen (-1 - -2)/2 = 0.5, rejected (-3 - -2.5)/4 = -0.125;
    beta 0.5: loss = (0.5 + 0.125 - 1/(2*0.5))^2 = (-0.375)^2 = 0.140625."""
    out = compute_loss("ipo", _inputs(-1, -3, -2, -2.5, lc=2, lr=4), 0.5, TrainingConfig())
    assert float(out.loss) == pytest.approx(0.140625, abs=1e-7)


def test_offset_with_zero_margin_is_sigmoid_and_margin_raises_the_bar() -> None:
    x0, x1 = _inputs(-1, -3, -2, -2.5), _inputs(-1, -3, -2, -2.5, margin=2.0)
    sig = float(compute_loss("sigmoid", x0, 0.1, TrainingConfig()).loss)
    assert float(compute_loss("offset", x0, 0.1, TrainingConfig()).loss) == pytest.approx(sig)
    assert float(compute_loss("offset", x1, 0.1, TrainingConfig()).loss) > sig


def test_simpo_is_reference_free_and_length_normalised() -> None:
    """-log sigmoid(beta*(lc_avg - lr_avg) - gamma); the reference does not enter."""
    cfg = TrainingConfig(simpo_gamma=0.5)
    x = LossInputs(torch.tensor([-4.0]), torch.tensor([-12.0]), None, None, torch.tensor([2.0]),
                   torch.tensor([4.0]), torch.zeros(1), torch.ones(1))
    expected = -math.log(1 / (1 + math.exp(-(2.0 * (-2.0 + 3.0) - 0.5))))
    assert float(compute_loss("simpo", x, 2.0, cfg).loss) == pytest.approx(expected, abs=1e-6)
    longer = LossInputs(x.policy_chosen, x.policy_rejected, None, None, torch.tensor([4.0]), torch.tensor([4.0]),
                        x.margin, x.weight)
    assert float(compute_loss("simpo", longer, 2.0, cfg).loss) != pytest.approx(expected)


def test_row_weights_weight_the_mean() -> None:
    base = _inputs(-1, -3, -2, -2.5)
    two = LossInputs(*(torch.cat([v, v * 3]) for v in (base.policy_chosen, base.policy_rejected, base.ref_chosen,
                                                       base.ref_rejected)), torch.ones(2), torch.ones(2),
                     torch.zeros(2), torch.tensor([1.0, 0.0]))
    assert float(compute_loss("sigmoid", two, 0.1, TrainingConfig()).loss) == pytest.approx(
        float(compute_loss("sigmoid", base, 0.1, TrainingConfig()).loss))


def test_beta_schedule_anneals_from_beta_to_final() -> None:
    t = TrainingConfig(beta=0.5, beta_schedule=BetaSchedule(kind="linear", final=0.1))
    assert beta_at(0, 11, t) == pytest.approx(0.5) and beta_at(10, 11, t) == pytest.approx(0.1)
    assert beta_at(5, 11, t) == pytest.approx(0.3)
    c = TrainingConfig(beta=0.5, beta_schedule=BetaSchedule(kind="cosine", final=0.1))
    assert beta_at(5, 11, c) == pytest.approx(0.3) and beta_at(2, 11, c) > beta_at(2, 11, t)
