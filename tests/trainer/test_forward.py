"""concatenated_forward on a real (tiny, random) Llama: logits_to_keep changes nothing but memory."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubedpo_trainer.forward import concatenated_forward, logits_to_keep, supports_logits_to_keep
from kubedpo_trainer.logprobs import sequence_logps

B, T, VOCAB, PAD = 3, 24, 100, 0


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=PAD)
    return LlamaForCausalLM(cfg).eval()


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows; shared prompts of different lengths; right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((2 * B, T), PAD)
    att = torch.zeros(2 * B, T, dtype=torch.long)
    mask = torch.zeros(2 * B, T, dtype=torch.bool)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (9, 12, 15)]
    for i in range(2 * B):
        p = prompts[i % B]
        resp = torch.randint(3, VOCAB, (int(torch.randint(2, T - len(p), (1,), generator=g)),), generator=g)
        n = len(p) + len(resp)
        ids[i, :n] = torch.cat([p, resp])
        att[i, :n] = 1
        mask[i, len(p) : n] = True
    return {"input_ids": ids, "attention_mask": att, "loss_mask": mask}


def _full(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    return sequence_logps(logits, batch["input_ids"], batch["loss_mask"])


def test_logits_to_keep_counts_from_the_earliest_response_token() -> None:
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 6:] = True
    mask[1, 4:8] = True
    assert logits_to_keep(mask) == 10 - 3  # token 4 is predicted by position 3
    assert logits_to_keep(torch.zeros(2, 10, dtype=torch.bool)) == 10


def test_logits_to_keep_forward_equals_full_forward(model: LlamaForCausalLM) -> None:
    batch = _batch()
    keep = logits_to_keep(batch["loss_mask"])
    assert keep == T - 8  # shortest prompt has 9 tokens: positions 8.. are needed
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.logits.shape)))
    try:
        fast = concatenated_forward(model, batch)
    finally:
        hook.remove()
    assert shapes == [(2 * B, keep, VOCAB)]  # the model really computed fewer logits
    full = _full(model, batch)
    torch.testing.assert_close(torch.cat([fast.chosen_logps, fast.rejected_logps]), full.logps)
    torch.testing.assert_close(torch.cat([fast.chosen_len, fast.rejected_len]), full.counts)
    torch.testing.assert_close(torch.cat([fast.chosen_logits_sum, fast.rejected_logits_sum]), full.logits_sum)


def test_logits_to_keep_gradients_equal_full_forward(model: LlamaForCausalLM) -> None:
    batch = _batch(1)
    model.zero_grad()
    fast = concatenated_forward(model, batch)
    (fast.chosen_logps.sum() - 0.5 * fast.rejected_logps.sum()).backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = _full(model, batch).logps
    (full[:B].sum() - 0.5 * full[B:].sum()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fast_grads[n], p.grad, msg=n)
    model.zero_grad()


def test_chosen_and_rejected_halves_follow_row_order(model: LlamaForCausalLM) -> None:
    batch = _batch(2)
    swapped = {k: torch.cat([v[B:], v[:B]]) for k, v in batch.items()}
    with torch.no_grad():
        a, b = concatenated_forward(model, batch), concatenated_forward(model, swapped)
    torch.testing.assert_close(a.chosen_logps, b.rejected_logps)
    torch.testing.assert_close(a.rejected_len, b.chosen_len)
    with pytest.raises(ValueError, match="2B"):
        concatenated_forward(model, {k: v[:-1] for k, v in batch.items()})


class _NoKeepKwarg(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (older or custom modelling code)."""

    def __init__(self, inner: LlamaForCausalLM) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_models_without_logits_to_keep_get_full_logits(model: LlamaForCausalLM) -> None:
    assert supports_logits_to_keep(model)
    plain = _NoKeepKwarg(model)
    assert not supports_logits_to_keep(plain)
    batch = _batch(3)
    with torch.no_grad():
        got = concatenated_forward(plain, batch)
        ref = _full(model, batch)
    torch.testing.assert_close(torch.cat([got.chosen_logps, got.rejected_logps]), ref.logps)


def test_wrapped_models_are_seen_through(model: LlamaForCausalLM) -> None:
    """peft and DDP-style `.module` wrappers take **kwargs; the check looks at the Llama inside."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(LlamaForCausalLM(model.config), LoraConfig(r=2, target_modules=["q_proj"]))

    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    assert supports_logits_to_keep(peft_model) and supports_logits_to_keep(Wrapper(peft_model))
    assert not supports_logits_to_keep(Wrapper(_NoKeepKwarg(model)))
    batch = _batch(4)
    with torch.no_grad():
        got = concatenated_forward(Wrapper(peft_model), batch)
        ref = _full(peft_model, batch)
    torch.testing.assert_close(torch.cat([got.chosen_logps, got.rejected_logps]), ref.logps)


def test_logits_metric_is_the_global_token_mean_like_trl() -> None:
    """Two ranks' totals: rank 0 has 2 response tokens with mean logit 1.0, rank 1 has 6 with 3.0.
    TRL logs (2*1 + 6*3) / 8 = 2.5; a mean of per-rank means would say 2.0."""
    from kubedpo_trainer.forward import ForwardOutput, logit_totals, logits_from_totals

    def rank(chosen_sum: float, chosen_tokens: int) -> torch.Tensor:
        out = ForwardOutput(torch.zeros(1), torch.zeros(1), torch.tensor([chosen_tokens]), torch.tensor([4]),
                            torch.tensor([chosen_sum]), torch.tensor([-4.0]))
        return logit_totals(out)

    summed = rank(2.0, 2) + rank(18.0, 6)  # what the all-reduce adds up
    got = logits_from_totals(summed)
    assert got["logits_chosen"] == pytest.approx(2.5) and got["logits_rejected"] == pytest.approx(-1.0)
    # two micro-batches (gradient accumulation): the global mean of each, averaged, as TRL logs them
    two = logits_from_totals(torch.stack([summed, rank(0.0, 1) + rank(0.0, 1)]))
    assert two["logits_chosen"] == pytest.approx(1.25)
    assert logits_from_totals(torch.zeros(4)) == {"logits_chosen": 0.0, "logits_rejected": 0.0}
    # averaged over ranks instead of summed (what the trainer's one all-reduce does): same ratios,
    # even where a mean token count falls below 1
    assert logits_from_totals(summed / 2) == pytest.approx(got)
    tiny_share = logits_from_totals((rank(3.0, 1) + rank(0.0, 0)) / 2)
    assert tiny_share["logits_chosen"] == pytest.approx(3.0)
