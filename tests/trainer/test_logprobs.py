"""Response log-probs: equal to a naive log_softmax+gather, blind to prompt logits, and the
logits_to_keep forward changes nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubedpo_trainer.forward import concatenated_forward, logits_to_keep
from kubedpo_trainer.logprobs import sequence_logps


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 10, 50, generator=g)
    ids = torch.randint(0, 50, (4, 10), generator=g)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    for i, start in enumerate((3, 5, 4, 7)):
        mask[i, start:8 + i // 2] = True
    return logits, ids, mask


def test_matches_naive_reference() -> None:
    logits, ids, mask = _case()
    naive = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = (naive * mask[:, 1:]).sum(-1)
    got = sequence_logps(logits, ids, mask, chunk=3)  # chunking must not matter
    torch.testing.assert_close(got.logps, expected)
    assert got.counts.tolist() == mask[:, 1:].sum(-1).float().tolist()


def test_prompt_logits_do_not_count_response_logits_do() -> None:
    logits, ids, mask = _case()
    base = sequence_logps(logits, ids, mask).logps
    changed = logits.clone()
    changed[0, :2] += 5.0  # positions 0..1 predict tokens 1..2: prompt tokens of row 0
    torch.testing.assert_close(sequence_logps(changed, ids, mask).logps, base)
    changed[0, 4, ids[0, 5]] += 5.0  # position 4 predicts token 5: a response token of row 0
    assert sequence_logps(changed, ids, mask).logps[0] > base[0]


def test_shape_mismatch_raises() -> None:
    logits, ids, mask = _case()
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logps(logits, ids, mask[:, :-1])


def test_logits_to_keep_forward_equals_full_forward(tiny) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny.model_dir).eval()
    ids = torch.randint(3, 100, (4, 16))
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, 9:] = True
    mask[1, 7:] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}
    assert logits_to_keep(mask) == 16 - 6
    with torch.no_grad():
        fast = concatenated_forward(model, batch)
        full_logits = model(input_ids=ids).logits
    full = sequence_logps(full_logits, ids, mask)
    torch.testing.assert_close(torch.cat([fast.chosen_logps, fast.rejected_logps]), full.logps)
    torch.testing.assert_close(torch.cat([fast.chosen_logits_sum, fast.rejected_logits_sum]), full.logits_sum)
