"""Losses: equal to TRL's own code on identical log-prob tensors, and to hand-computed values.

TRL is a test-only dependency. DPOTrainer's loss lives inside `DPOTrainer._compute_loss`, which
calls the model and reads per-token log-probs from its output; the test gives it a stand-in
model whose output carries exactly our tensors (and precomputed reference log-probs), so TRL's
real loss *and metric* code runs on the same numbers ours does. SimPO and conservative DPO are
checked against `CPOTrainer.cpo_loss` (TRL 1.16's DPOTrainer has neither).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from pydantic import ValidationError
from trl import DPOTrainer

from kubedpo_trainer.config import BetaSchedule, LossType, TrainingConfig
from kubedpo_trainer.forward import ForwardOutput, dpo_metrics
from kubedpo_trainer.losses import REGISTRY, LossInputs, beta_at, compute_loss

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning
    from trl.experimental.cpo import CPOTrainer

B, T = 6, 9
# Every loss type we share with TRL 1.16's DPOTrainer, and the label smoothing each is tested with.
TRL_DPO_TYPES = {
    "sigmoid": 0.0, "ipo": 0.0, "hinge": 0.0, "robust": 0.1, "sigmoid_norm": 0.0, "exo_pair": 0.1,
    "nca_pair": 0.0, "bco_pair": 0.0, "sppo_hard": 0.0, "apo_zero": 0.0, "apo_down": 0.0, "discopop": 0.0,
}
OURS_ONLY = {"offset", "simpo"}  # offset: not in TRL; simpo: checked against CPOTrainer below
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T - 2, (2 * B,), generator=g)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        mask[i, T - n :] = 1  # the last n tokens are the response (prompt before them)
    per_token = -torch.rand(2 * B, T - 1, generator=g) * 3 * mask[:, 1:]
    mean_logits = torch.randn(2 * B, T - 1, generator=g) * mask[:, 1:]
    ref = -torch.rand(2 * B, generator=g) * 3 * lens
    return {"mask": mask, "per_token": per_token, "mean_logits": mean_logits, "ref": ref}


def _trl(loss_type: str, beta: float, label_smoothing: float, x: dict[str, torch.Tensor], tau: float = 0.05):
    """TRL's `_compute_loss` on a trainer object holding only the attributes that method reads."""
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
        ref_model=None, args=SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None),
    )
    for k, v in attrs.items():
        object.__setattr__(tr, k, v)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": x["mask"], "ref_chosen_logps": x["ref"][:B], "ref_rejected_logps": x["ref"][B:]}
    loss = tr._compute_loss(model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in tr._metrics["train"].items()}


def _ours(loss_type: str, beta: float, cfg: TrainingConfig, x: dict[str, torch.Tensor], prefix: str = ""):
    logps = x["per_token"].sum(1)
    counts = x["mask"][:, 1:].sum(1).float()
    logit_sums = x["mean_logits"].sum(1)
    fwd = ForwardOutput(logps[:B], logps[B:], counts[:B], counts[B:], logit_sums[:B], logit_sums[B:])
    inputs = LossInputs(logps[:B], logps[B:], x["ref"][:B], x["ref"][B:], counts[:B], counts[B:],
                        torch.zeros(B), torch.ones(B))
    out = compute_loss(loss_type, inputs, beta, cfg)
    return out, dpo_metrics(out, fwd, prefix)


def test_every_loss_type_has_a_function_and_a_trl_test() -> None:
    """A new LossType must come with its function and (if TRL has it) join the TRL comparison."""
    assert set(REGISTRY) == set(LossType)
    assert set(TRL_DPO_TYPES) | OURS_ONLY == {t.value for t in LossType}


@pytest.mark.parametrize("loss_type", sorted(TRL_DPO_TYPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_trl_dpo_trainer_loss_and_metrics(loss_type: str, seed: int) -> None:
    x = _tensors(seed)
    eps = TRL_DPO_TYPES[loss_type]
    tau = 0.3 if seed else 0.05  # discopop's temperature must reach TRL's code too
    trl_loss, trl_metrics = _trl(loss_type, 0.2, eps, x, tau)
    out, ours = _ours(loss_type, 0.2, TrainingConfig(loss=loss_type, label_smoothing=eps, discopop_tau=tau), x)
    assert float(out.loss) == pytest.approx(trl_loss, abs=1e-5)
    assert ours["loss"] == pytest.approx(trl_loss, abs=1e-5)
    for name in METRICS:
        assert ours[name.replace("/", "_")] == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert 0 < trl_metrics["rewards/accuracies"] < 1  # the tensors exercise both outcomes
    assert out.losses.shape == (B,) and not out.chosen_rewards.requires_grad


def test_eval_prefix_names() -> None:
    _, ours = _ours("sigmoid", 0.1, TrainingConfig(), _tensors())
    _, evals = _ours("sigmoid", 0.1, TrainingConfig(), _tensors(), prefix="eval_")
    assert evals == {"eval_" + k: v for k, v in ours.items()}
    assert set(ours) == {"loss"} | {m.replace("/", "_") for m in METRICS}


def _cpo(loss_type: str, beta: float, eps: float, gamma: float, chosen: torch.Tensor, rejected: torch.Tensor):
    tr = CPOTrainer.__new__(CPOTrainer)
    for k, v in dict(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=eps, simpo_gamma=gamma,
                     accelerator=Accelerator(cpu=True)).items():
        object.__setattr__(tr, k, v)
    return tr.cpo_loss(chosen, rejected)


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_simpo_equals_trl_cpo_trainer(eps: float) -> None:
    """TRL's CPOTrainer gets length-averaged log-probs for simpo; we get sums and lengths."""
    x = _tensors(2)
    logps, counts = x["per_token"].sum(1), x["mask"][:, 1:].sum(1).float()
    cfg = TrainingConfig(loss="simpo", simpo_gamma=0.7, label_smoothing=eps)
    ours = compute_loss("simpo", LossInputs(logps[:B], logps[B:], None, None, counts[:B], counts[B:],
                                            torch.zeros(B), torch.ones(B)), 2.0, cfg)
    avg = logps / counts
    losses, chosen, rejected = _cpo("simpo", 2.0, eps, 0.7, avg[:B], avg[B:])
    torch.testing.assert_close(ours.losses, losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, chosen, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, rejected, atol=1e-6, rtol=0)


def test_conservative_sigmoid_equals_trl_cpo_formula() -> None:
    """cDPO: TRL 1.16's DPOTrainer dropped label smoothing from sigmoid; CPOTrainer's sigmoid keeps the
    formula -(1-eps) log sigma(beta*z) - eps log sigma(-beta*z) on z = logp_c - logp_r. Feeding it the
    log-ratios r_c, r_r makes z = h, i.e. exactly conservative DPO."""
    x = _tensors(3)
    logps, counts = x["per_token"].sum(1), x["mask"][:, 1:].sum(1).float()
    inputs = LossInputs(logps[:B], logps[B:], x["ref"][:B], x["ref"][B:], counts[:B], counts[B:],
                        torch.zeros(B), torch.ones(B))
    ours = compute_loss("sigmoid", inputs, 0.3, TrainingConfig(label_smoothing=0.2))
    losses, _, _ = _cpo("sigmoid", 0.3, 0.2, 0.0, logps[:B] - x["ref"][:B], logps[B:] - x["ref"][B:])
    torch.testing.assert_close(ours.losses, losses, atol=1e-6, rtol=0)
    plain = compute_loss("sigmoid", inputs, 0.3, TrainingConfig())
    assert not torch.allclose(plain.losses, ours.losses)  # smoothing really changes the loss


def _inputs(pc, pr, rc, rr, lc=1.0, lr=1.0, margin=0.0) -> LossInputs:
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    return LossInputs(t(pc), t(pr), t(rc), t(rr), t(lc), t(lr), t(margin), t(1.0))


def test_sigmoid_by_hand() -> None:
    """h = (-1 - -2) - (-3 - -2.5) = 1 + 0.5 = 1.5; beta 0.1: loss = -log sigmoid(0.15) = log(1 + e^-0.15)
    = 0.62096; rewards: chosen 0.1 * 1 = 0.1, rejected 0.1 * -0.5 = -0.05."""
    out = compute_loss("sigmoid", _inputs(-1, -3, -2, -2.5), 0.1, TrainingConfig())
    assert float(out.loss) == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-7)
    assert float(out.loss) == pytest.approx(0.62096, abs=1e-5)
    assert float(out.chosen_rewards) == pytest.approx(0.1) and float(out.rejected_rewards) == pytest.approx(-0.05)


def test_ipo_by_hand() -> None:
    """Length-averaged log-ratios: chosen (-1 - -2)/2 = 0.5, rejected (-3 - -2.5)/4 = -0.125;
    beta 0.5: loss = (0.5 + 0.125 - 1/(2*0.5))^2 = (-0.375)^2 = 0.140625."""
    out = compute_loss("ipo", _inputs(-1, -3, -2, -2.5, lc=2, lr=4), 0.5, TrainingConfig())
    assert float(out.loss) == pytest.approx(0.140625, abs=1e-7)


def test_offset_with_zero_margin_is_sigmoid_and_margin_raises_the_bar() -> None:
    """ODPO: -log sigma(beta*h - alpha*margin); h = 1.5, beta 0.1, alpha 0.5, margin 2:
    -log sigma(0.15 - 1.0) = log(1 + e^0.85)."""
    x0, x1 = _inputs(-1, -3, -2, -2.5), _inputs(-1, -3, -2, -2.5, margin=2.0)
    sig = float(compute_loss("sigmoid", x0, 0.1, TrainingConfig()).loss)
    assert float(compute_loss("offset", x0, 0.1, TrainingConfig()).loss) == pytest.approx(sig, abs=1e-7)
    got = float(compute_loss("offset", x1, 0.1, TrainingConfig(offset_alpha=0.5)).loss)
    assert got == pytest.approx(math.log1p(math.exp(0.85)), abs=1e-6) and got > sig


def test_simpo_is_reference_free_and_length_normalised() -> None:
    """-log sigmoid(beta*(lc_avg - lr_avg) - gamma) = -log sigmoid(2*(-2 + 3) - 0.5); no reference."""
    cfg = TrainingConfig(simpo_gamma=0.5)
    x = LossInputs(torch.tensor([-4.0]), torch.tensor([-12.0]), None, None, torch.tensor([2.0]),
                   torch.tensor([4.0]), torch.zeros(1), torch.ones(1))
    expected = math.log1p(math.exp(-(2.0 * (-2.0 + 3.0) - 0.5)))
    out = compute_loss("simpo", x, 2.0, cfg)
    assert float(out.loss) == pytest.approx(expected, abs=1e-6)
    assert float(out.chosen_rewards) == pytest.approx(-4.0) and float(out.rejected_rewards) == pytest.approx(-6.0)
    longer = LossInputs(x.policy_chosen, x.policy_rejected, None, None, torch.tensor([4.0]), torch.tensor([4.0]),
                        x.margin, x.weight)
    assert float(compute_loss("simpo", longer, 2.0, cfg).loss) != pytest.approx(expected, abs=1e-3)


def test_reference_losses_refuse_missing_reference() -> None:
    x = LossInputs(torch.zeros(1), torch.zeros(1), None, None, torch.ones(1), torch.ones(1), torch.zeros(1),
                   torch.ones(1))
    with pytest.raises(ValueError, match="reference"):
        compute_loss("sigmoid", x, 0.1, TrainingConfig())
    with pytest.raises(ValueError, match="training.loss"):
        compute_loss("dpo++", x, 0.1, TrainingConfig())


def test_exo_pair_requires_label_smoothing_in_config() -> None:
    with pytest.raises(ValidationError, match="exo_pair"):
        TrainingConfig(loss="exo_pair")
    assert TrainingConfig(loss="exo_pair", label_smoothing=1e-3).label_smoothing == 1e-3


def test_row_weights_weight_the_mean() -> None:
    """Weights (1, 0): the second row, whatever its loss, does not count."""
    base = _inputs(-1, -3, -2, -2.5)
    two = LossInputs(*(torch.cat([v, v * 3]) for v in (base.policy_chosen, base.policy_rejected, base.ref_chosen,
                                                       base.ref_rejected)), torch.ones(2), torch.ones(2),
                     torch.zeros(2), torch.tensor([1.0, 0.0]))
    out = compute_loss("sigmoid", two, 0.1, TrainingConfig())
    assert float(out.losses[1]) != pytest.approx(float(out.losses[0]))
    assert float(out.loss) == pytest.approx(float(compute_loss("sigmoid", base, 0.1, TrainingConfig()).loss))


def test_gradient_reaches_policy_not_reference() -> None:
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    x = LossInputs(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.5]), torch.ones(1), torch.ones(1),
                   torch.zeros(1), torch.ones(1))
    compute_loss("sigmoid", x, 0.1, TrainingConfig()).loss.backward()
    # d/dpc -log sigma(beta*h) = -beta * sigma(-beta*h) < 0, and the opposite for pr
    assert float(pc.grad) == pytest.approx(-0.1 / (1 + math.exp(0.15)), abs=1e-7)
    assert float(pr.grad) == pytest.approx(0.1 / (1 + math.exp(0.15)), abs=1e-7)


def test_beta_schedule_anneals_from_beta_to_final() -> None:
    """Linear: 0.5 + (0.1-0.5)*5/10 = 0.3 at step 5 of 11; cosine passes 0.3 at the midpoint too but
    stays nearer the start early on."""
    t = TrainingConfig(beta=0.5, beta_schedule=BetaSchedule(kind="linear", final=0.1))
    assert beta_at(0, 11, t) == pytest.approx(0.5) and beta_at(10, 11, t) == pytest.approx(0.1)
    assert beta_at(5, 11, t) == pytest.approx(0.3) and beta_at(99, 11, t) == pytest.approx(0.1)
    c = TrainingConfig(beta=0.5, beta_schedule=BetaSchedule(kind="cosine", final=0.1))
    assert beta_at(5, 11, c) == pytest.approx(0.3) and beta_at(2, 11, c) > beta_at(2, 11, t)
    assert beta_at(7, 11, TrainingConfig(beta=0.2)) == 0.2
