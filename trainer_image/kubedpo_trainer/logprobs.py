"""Per-sequence log-probabilities of response tokens, from logits, without a (N,T,V) log_softmax copy.

log p(token) = logit[token] - logsumexp(logits): gathering one logit and one logsumexp per
position needs O(N*T) extra memory instead of the O(N*T*V) float32 copy that
`log_softmax(...).gather(...)` makes, which dominates memory at a 128k-token vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceLogps:
    logps: torch.Tensor  # (N,) summed log-probs of response tokens
    counts: torch.Tensor  # (N,) response tokens per sequence
    logits_sum: torch.Tensor  # (N,) sum over response positions of the vocabulary-mean logit (TRL's logits/*)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, chunk: int = 1024
) -> SequenceLogps:
    """Sum log p(x_t | x_<t) over positions t where loss_mask[t] is True.

    logits: (N, L, V) where logits[:, j] predicts input_ids[:, offset + j + 1] and
    offset = T - L (L < T when the model was asked for only the last L positions).
    input_ids, loss_mask: (N, T). Token 0 is never predicted, so a mask on it is ignored.
    """
    n, t = input_ids.shape
    if loss_mask.shape != (n, t):
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if logits.dim() != 3 or logits.shape[0] != n or logits.shape[1] > t:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit input_ids {tuple(input_ids.shape)}")
    offset = t - logits.shape[1]
    targets = input_ids[:, offset + 1 :]  # (N, L-1)
    mask = loss_mask[:, offset + 1 :].to(torch.float32)  # (N, L-1)
    dropped = loss_mask[:, 1 : offset + 1]
    if dropped.any():
        raise ValueError("loss_mask marks tokens whose logits were not computed (logits_to_keep too small)")
    per_token = torch.empty_like(targets, dtype=torch.float32)
    logit_sums = torch.zeros(n, dtype=torch.float32, device=logits.device)
    for s in range(0, targets.shape[1], chunk):
        block = logits[:, s : s + chunk].float()  # (N, c, V) predicting targets[:, s:s+c]
        block = block[:, : targets.shape[1] - s]
        tgt = targets[:, s : s + block.shape[1]]
        picked = block.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        per_token[:, s : s + block.shape[1]] = picked - torch.logsumexp(block, dim=-1)
        logit_sums += (block.mean(-1) * mask[:, s : s + block.shape[1]]).sum(-1)
    counts = mask.sum(-1)
    logps = (per_token * mask).sum(-1)
    return SequenceLogps(logps, counts, logit_sums)
