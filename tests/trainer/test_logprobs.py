"""Response log-probs: equal to a naive log_softmax+gather (values and gradients), blind to prompt and
padding logits, chunking-invariant, exact under bf16 logits, and no float32 logits copy kept for backward."""

from __future__ import annotations

import pytest
import torch

from kubedpo_trainer.logprobs import sequence_logps, token_logps

N, T, V = 4, 10, 50


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=g) * 3
    ids = torch.randint(0, V, (N, T), generator=g)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i, (start, end) in enumerate(((3, 8), (5, 10), (4, 9), (7, 8))):
        mask[i, start:end] = True  # prompt before start, padding after end
    return logits, ids, mask


def _naive(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """The textbook computation: full float32 log_softmax, shift by one, gather, mask, sum."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:].float()
    mean_logit = logits[:, :-1].float().mean(-1)
    return (logp * m).sum(-1), m.sum(-1), (mean_logit * m).sum(-1)


@pytest.mark.parametrize("chunk_elements", [1, 3 * V, 2**25])  # one row per chunk .. everything at once
def test_matches_naive_reference(chunk_elements: int) -> None:
    logits, ids, mask = _case()
    logps, counts, logits_sum = _naive(logits, ids, mask)
    got = sequence_logps(logits, ids, mask, chunk_elements=chunk_elements)
    torch.testing.assert_close(got.logps, logps)
    torch.testing.assert_close(got.logits_sum, logits_sum)
    assert got.counts.tolist() == [5.0, 5.0, 5.0, 1.0]  # end - start of the mask spans above
    torch.testing.assert_close(got.logits_mean, logits_sum / counts)


def test_gradient_matches_naive() -> None:
    logits, ids, mask = _case(1)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])  # distinct upstream gradient per row
    (sequence_logps(a, ids, mask, chunk_elements=2 * V).logps * w).sum().backward()
    (_naive(b, ids, mask)[0] * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert a.grad[0, :2].abs().max() == 0  # prompt positions get no gradient
    assert a.grad[0, 2].abs().max() > 0  # position 2 predicts token 3, the first response token


def test_custom_backward_passes_gradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logps(x, targets, chunk_elements=14)[0], (logits,))


def test_prompt_and_padding_logits_do_not_count_response_logits_do() -> None:
    logits, ids, mask = _case()
    base = sequence_logps(logits, ids, mask).logps
    changed = logits.clone()
    changed[0, :2] += 5.0  # positions 0..1 predict tokens 1..2: prompt tokens of row 0
    changed[0, 7:] -= 4.0  # positions 7..9 predict tokens 8..10: padding after row 0's response
    torch.testing.assert_close(sequence_logps(changed, ids, mask).logps, base)
    changed[0, 4, ids[0, 5]] += 5.0  # position 4 predicts token 5: a response token of row 0
    after = sequence_logps(changed, ids, mask).logps
    assert after[0] > base[0]
    torch.testing.assert_close(after[1:], base[1:])


def test_truncated_logits_equal_full_when_they_cover_the_response() -> None:
    """Logits for only the last L positions (HF logits_to_keep) give the same result."""
    logits, ids, mask = _case()
    full = sequence_logps(logits, ids, mask)
    keep = T - 2  # earliest response token is 3, predicted by position 2
    part = sequence_logps(logits[:, -keep:], ids, mask)
    torch.testing.assert_close(part.logps, full.logps)
    torch.testing.assert_close(part.logits_sum, full.logits_sum)
    with pytest.raises(ValueError, match="logits_to_keep"):
        sequence_logps(logits[:, -(keep - 1) :], ids, mask)


def test_bf16_logits_are_computed_in_float32() -> None:
    """bf16 logits upcast chunk by chunk equal float32 math on the same (rounded) values; a bf16
    log_softmax would be off by ~1e-2 per token."""
    logits, ids, mask = _case(3)
    low = logits.to(torch.bfloat16)
    got = sequence_logps(low, ids, mask, chunk_elements=2 * V)
    assert got.logps.dtype == torch.float32
    expected = _naive(low.float(), ids, mask)[0]
    torch.testing.assert_close(got.logps, expected, atol=1e-5, rtol=1e-6)
    bf16_math = (torch.log_softmax(low[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1).float()
                 * mask[:, 1:]).sum(-1)
    assert (bf16_math - expected).abs().max() > 1e-3  # so the check above can tell the difference


def test_backward_keeps_no_float32_copy_of_bf16_logits() -> None:
    """Every tensor autograd saves is either the bf16 logits or O(M) sized — never M*V float32."""
    logits, ids, mask = _case()
    low = logits.to(torch.bfloat16).requires_grad_()
    saved: list[tuple[torch.dtype, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sequence_logps(low, ids, mask, chunk_elements=V)
    m = int(mask[:, 1:].sum())
    big_fp32 = [n for dtype, n in saved if dtype == torch.float32 and n >= m * V]
    assert big_fp32 == [] and any(dtype == torch.bfloat16 and n == m * V for dtype, n in saved)
    out.logps.sum().backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16


def test_shape_mismatch_raises() -> None:
    logits, ids, mask = _case()
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logps(logits, ids, mask[:, :-1])
    with pytest.raises(ValueError, match="logits"):
        sequence_logps(logits[:2], ids, mask)
    with pytest.raises(ValueError, match="logits"):
        sequence_logps(torch.cat([logits, logits[:, :1]], 1), ids, mask)
    with pytest.raises(ValueError, match="input_ids"):
        sequence_logps(logits, ids[0], mask[0])
    with pytest.raises(ValueError, match="token_logps"):
        token_logps(logits[0], ids[0, :3])


def test_no_response_tokens_gives_zero() -> None:
    logits, ids, _ = _case()
    got = sequence_logps(logits, ids, torch.zeros(N, T, dtype=torch.bool))
    assert got.logps.tolist() == [0.0] * N and got.counts.tolist() == [0.0] * N
    assert got.logits_mean.tolist() == [0.0] * N
