"""Packing and prompt sharing compute what the padded batch computes: log-probs, loss, rewards, grads.

Two attention paths: on CPU an sdpa model attends unit by unit (packed_attention.py); elsewhere
(GPU) the dense block mask goes to SDPA in one call. No GPU here, so the dense sdpa path is
taken by patching the device decision (`applies`) to False: the same code a GPU runs.

Tolerance: fp32 on CPU, 1e-5 relative on summed log-probs (different kernel shapes and summation
order reorder float additions; a leaked attention edge changes them by ~1e-1) and 1e-4 on grads.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubedpo_trainer import packed_forward as packed_forward_module
from kubedpo_trainer.config import TrainingConfig
from kubedpo_trainer.data.collate import collate
from kubedpo_trainer.data.packing import (
    pack,
    pair_tokens,
    rows_from_batch,
    split_by_budget,
    split_into,
)
from kubedpo_trainer.data.tokenize import TokenizedRow
from kubedpo_trainer.forward import concatenated_forward
from kubedpo_trainer.losses import LossInputs, compute_loss
from kubedpo_trainer.models import enable_activation_checkpointing
from kubedpo_trainer.packed_attention import NAME
from kubedpo_trainer.packed_forward import block_mask, packed_forward, row_tokens

VOCAB, PAD = 101, 0


def _model(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=PAD, attn_implementation=attn)
    return LlamaForCausalLM(cfg)


def _rows(n: int, seed: int = 0, min_prompt: int = 1) -> list[TokenizedRow]:
    """Pairs with a spread of prompt and response lengths (some responses of one token)."""
    rng = random.Random(seed)

    def toks(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    return [TokenizedRow(f"r{i}", toks(min_prompt, 20), toks(1, 9), toks(1, 12), 0.0, 1.0) for i in range(n)]


def _padded(model: torch.nn.Module, rows: list[TokenizedRow]):
    return concatenated_forward(model, collate(rows, PAD))


@pytest.fixture(params=["units", "dense"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which attention path packed_forward takes for an sdpa model (dense = the GPU path)."""
    if request.param == "dense":
        monkeypatch.setattr(packed_forward_module, "applies", lambda model, inner: False)
    return request.param


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("row_tokens", [1, 64, 10_000])
def test_packed_logps_equal_the_padded_batch(share: bool, row_tokens: int, path: str) -> None:
    model, rows = _model().eval(), _rows(7)
    with torch.no_grad():
        ref, got = _padded(model, rows), packed_forward(model, pack(rows, PAD, share, row_tokens))
    assert (model.config._attn_implementation == NAME) == (path == "units")
    for name in ("chosen_logps", "rejected_logps", "chosen_len", "rejected_len",
                 "chosen_logits_sum", "rejected_logits_sum"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-5, msg=name)


def test_eager_attention_takes_the_same_mask() -> None:
    rows = _rows(4, seed=3)
    with torch.no_grad():
        ref = _padded(_model("sdpa").eval(), rows)
        got = packed_forward(_model("eager").eval(), pack(rows, PAD, True, 64))
    torch.testing.assert_close(got.chosen_logps, ref.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected_logps, ref.rejected_logps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("layout", [48, 10_000])  # several short rows with padding; one row, none
def test_loss_rewards_and_gradients_equal_the_padded_batch(share: bool, checkpointing: bool, layout: int,
                                                           path: str) -> None:
    """Also under gradient checkpointing: the recompute must see the same per-unit plan."""
    rows, t = _rows(6, seed=1), TrainingConfig()
    ref_logps = torch.randn(12, generator=torch.Generator().manual_seed(0))

    def run(forward) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        model = _model()
        if checkpointing:
            enable_activation_checkpointing(model)  # the product's switch
            model.train()
        pol = forward(model)
        ref = type("R", (), {"chosen_logps": ref_logps[:6], "rejected_logps": ref_logps[6:]})()
        batch = {"margin": torch.zeros(6), "weight": torch.ones(6)}
        out = compute_loss("sigmoid", LossInputs.from_forward(pol, ref, batch), 0.1, t)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.loss.detach(), torch.stack([out.chosen_rewards, out.rejected_rewards]), grads

    loss_a, rew_a, grads_a = run(lambda m: _padded(m, rows))
    loss_b, rew_b, grads_b = run(lambda m: packed_forward(m, pack(rows, PAD, share, layout)))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rew_b, rew_a, rtol=1e-5, atol=1e-6)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_sharing_packs_the_prompt_once() -> None:
    rows = _rows(5, seed=2)
    plain, shared = pack(rows, PAD, False, 10_000), pack(rows, PAD, True, 10_000)
    prompts = sum(len(r.prompt_ids) for r in rows)
    real = lambda p: int((p["segment"] >= 0).sum())  # noqa: E731
    assert real(plain) - real(shared) == prompts
    assert plain["num_tokens"] == shared["num_tokens"] == real(plain)  # the padded batch's unit


def test_mask_never_crosses_a_sequence_and_rejected_never_sees_chosen() -> None:
    rows = [TokenizedRow("a", [5, 6], [7, 8], [9], 0.0, 1.0), TokenizedRow("b", [10], [11], [12, 13], 0.0, 1.0)]
    p = pack(rows, PAD, True, 100)
    m = block_mask(p["segment"], p["part"])[0, 0]
    ids = p["input_ids"][0].tolist()
    at = {tok: i for i, tok in enumerate(ids) if tok}
    assert m[at[9], at[6]] and m[at[9], at[5]] and not m[at[9], at[7]] and not m[at[9], at[8]]
    assert not m[at[11], at[6]] and m[at[11], at[10]]  # pair b never sees pair a
    assert p["position_ids"][0, at[9]] == 2 and p["position_ids"][0, at[7]] == 2  # both continue the prompt
    assert p["part"][0, at[9]] == 2 and p["part"][0, at[7]] == 1


def test_rows_from_batch_inverts_collate() -> None:
    rows = _rows(5, seed=4)
    assert rows_from_batch(collate(rows, PAD)) == rows


def test_split_by_budget_keeps_order_and_budget() -> None:
    rows = _rows(20, seed=5)
    chunks = split_by_budget(rows, 80, True)
    assert [i for c in chunks for i in c] == list(range(20))
    for c in chunks:
        assert len(c) == 1 or sum(pair_tokens(rows[i], True) for i in c) <= 80
    more = split_into(rows, chunks, len(chunks) + 3, True)
    assert len(more) == len(chunks) + 3 and sorted(i for c in more for i in c) == list(range(20))
    assert all(more)


def test_unit_attention_is_sdpa_outside_a_packed_forward() -> None:
    """After a packed forward switched the model to `kubedpo_units`, padded forwards (evaluation,
    the padded reference) still compute exactly what sdpa computes, padding mask included."""
    rows = _rows(5, seed=6)
    plain, switched = _model().eval(), _model().eval()
    with torch.no_grad():
        packed_forward(switched, pack(rows[:2], PAD, True, 64))
        assert switched.config._attn_implementation == NAME
        a, b = _padded(plain, rows), _padded(switched, rows)
    torch.testing.assert_close(b.chosen_logps, a.chosen_logps, rtol=0, atol=0)
    torch.testing.assert_close(b.rejected_logps, a.rejected_logps, rtol=0, atol=0)


def test_row_length_default_one_row_without_padding_on_cpu(path: str) -> None:
    """Unit-by-unit attention: a micro-batch is one row with no padding (its budget); the dense
    mask path keeps rows of data.maxLength; an explicit packing.rowTokens always wins."""
    model, rows = _model(), _rows(9, seed=7)
    length = row_tokens(model, None, 4096, 48)
    assert length == (4096 if path == "units" else 48)
    assert row_tokens(model, 100, 4096, 48) == 100
    assert row_tokens(_model("eager"), None, 4096, 48) == 48  # eager keeps the dense additive mask
    p = pack(rows, PAD, True, length)
    if path == "units":
        assert p["input_ids"].shape[0] == 1 and bool((p["segment"] >= 0).all())  # one row, no padding
    else:
        assert p["input_ids"].shape[0] > 1
