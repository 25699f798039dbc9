"""Per-sequence log-probabilities of response tokens, from logits, without a float32 (N,T,V) copy.

log p(token) = logit[token] - logsumexp(logits). The usual `log_softmax(logits.float()).gather()`
keeps a float32 copy of every logit alive for the backward pass: at a 128k vocabulary and 16k
response tokens that is 8 GB on top of the bf16 logits. Here:

- only response positions are touched (prompt and padding rows are dropped before any math);
- the forward walks those positions in chunks, upcasting one chunk at a time to float32, and
  keeps one float32 logsumexp per position (O(M) memory, M = response tokens);
- a custom backward recomputes softmax chunk by chunk from the saved logits in their own dtype,
  so autograd never holds a float32 copy either.

Results equal a float32 `log_softmax + gather` on the same logits (tests/trainer/test_logprobs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Positions x vocabulary elements upcast at once: 2**25 float32 values are 128 MiB per chunk.
DEFAULT_CHUNK_ELEMENTS = 2**25


@dataclass(frozen=True)
class SequenceLogps:
    logps: torch.Tensor  # (N,) float32 summed log-probs of response tokens (differentiable)
    counts: torch.Tensor  # (N,) float32 response tokens per sequence
    logits_sum: torch.Tensor  # (N,) detached: sum over response positions of the vocabulary-mean logit

    @property
    def logits_mean(self) -> torch.Tensor:
        """(N,) per-sequence mean of the response logits (0 for a sequence without response tokens)."""
        return self.logits_sum / self.counts.clamp(min=1)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, float64 stays float64 (so gradcheck can verify the backward)."""
    return torch.promote_types(dtype, torch.float32)


class _TokenLogps(torch.autograd.Function):
    """(M,V) logits, (M,) targets -> (M,) log p(target) and (M,) vocabulary-mean logit (no grad).

    Saves the logits in their own dtype plus an (M,) logsumexp; backward is
    d logp / d logits = onehot(target) - softmax(logits), rebuilt one chunk at a time.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> Any:
        work = _work_dtype(logits.dtype)
        m = logits.shape[0]
        lse = torch.empty(m, dtype=work, device=logits.device)
        mean = torch.empty(m, dtype=work, device=logits.device)
        for s in range(0, m, rows):
            block = logits[s : s + rows].to(work)  # (c, V)
            lse[s : s + rows] = torch.logsumexp(block, dim=-1)
            mean[s : s + rows] = block.mean(dim=-1)
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).to(work)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        ctx.mark_non_differentiable(mean)
        return picked - lse, mean

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor, _grad_mean: Any) -> Any:
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        work = lse.dtype
        g = grad_logps.to(work)
        for s in range(0, logits.shape[0], ctx.rows):
            e = s + ctx.rows
            d = -torch.exp(logits[s:e].to(work) - lse[s:e, None]) * g[s:e, None]  # -softmax * g
            d.scatter_add_(-1, targets[s:e, None], g[s:e, None])  # + onehot * g
            grad[s:e] = d.to(grad.dtype)
        return grad, None, None


def token_logps(
    logits: torch.Tensor, targets: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) (M,) and the detached vocabulary-mean logit (M,) for (M,V) logits."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_logps: logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}")
    rows = max(1, chunk_elements // max(1, logits.shape[-1]))
    return _TokenLogps.apply(logits, targets, rows)


def sequence_logps(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> SequenceLogps:
    """Sum log p(x_t | x_<t) over the positions t where loss_mask[:, t] is True.

    logits: (N, L, V) with L <= T; logits[:, j] predicts input_ids[:, offset + j + 1] where
    offset = T - L, i.e. the model returned only its last L positions (HF `logits_to_keep`).
    input_ids, loss_mask: (N, T); loss_mask marks *token* positions of the response.
    Token 0 has no prediction, so a mask on it is ignored (no prompt means nothing to condition on).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (N, T), got {tuple(input_ids.shape)}")
    n, t = input_ids.shape
    if tuple(loss_mask.shape) != (n, t):
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if logits.dim() != 3 or logits.shape[0] != n or not 1 <= logits.shape[1] <= t:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit input_ids {tuple(input_ids.shape)}")
    offset = t - logits.shape[1]
    mask = loss_mask.bool()
    if mask[:, 1 : offset + 1].any():
        raise ValueError(
            f"loss_mask marks tokens before position {offset + 1}, whose logits were not computed "
            "(logits_to_keep too small)"
        )
    shifted = mask[:, offset + 1 :]  # (N, L-1): which logits positions predict a response token
    row, col = shifted.nonzero(as_tuple=True)  # (M,) each
    targets = input_ids[:, offset + 1 :][row, col]  # (M,)
    picked_logits = logits[row, col]  # (M, V): only response positions, in the logits' dtype
    per_token, mean_logit = token_logps(picked_logits, targets, chunk_elements)
    work = per_token.dtype
    logps = torch.zeros(n, dtype=work, device=logits.device).index_add(0, row, per_token)
    logits_sum = torch.zeros(n, dtype=work, device=logits.device).index_add(0, row, mean_logit)
    counts = shifted.sum(-1).to(work)
    return SequenceLogps(logps, counts, logits_sum.detach())
