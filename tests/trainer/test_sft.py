"""Task sft's pure parts: row formats, (B, T) batches, and the loss against a hand computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from kubedpo_trainer.config import DataConfig, parse_config
from kubedpo_trainer.data.formats import BadRecord
from kubedpo_trainer.data.sft import collate_sft, parse_sft_row, tokenize_sft_row
from kubedpo_trainer.data.tokenize import DataStats
from kubedpo_trainer.errors import ConfigError
from kubedpo_trainer.sft import SFTOutput, argmax_hits, sft_forward, sft_loss, weighted_tokens

CFG = DataConfig(train="unused", max_length=64, max_prompt_length=32)
USER = {"role": "user", "content": "Words: cat dog. What kind of thing is the first word?"}
ASSISTANT = {"role": "assistant", "content": "animal"}


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny.model_dir)


def test_prompt_completion_messages_and_preference_rows_give_prompt_and_target() -> None:
    row = parse_sft_row({"prompt": "Q:", "completion": " A"})
    assert (row.prompt, row.chosen) == ("Q:", " A")
    row = parse_sft_row({"messages": [USER, ASSISTANT]})
    assert row.prompt == [USER] and row.chosen == [ASSISTANT] and row.conversational
    row = parse_sft_row({"prompt": "Q:", "chosen": " A", "rejected": " B", "weight": 2})
    assert (row.prompt, row.chosen, row.weight) == ("Q:", " A", 2.0)
    row = parse_sft_row({"chosen": "Q: A", "rejected": "Q: B"})  # implicit prompt
    assert (row.prompt, row.chosen) == ("Q:", " A")


@pytest.mark.parametrize("raw, says", [
    ({"messages": [ASSISTANT, USER]}, "must be the assistant's"),
    ({"completion": " A"}, "missing field 'prompt'"),
    ({"prompt": "Q", "completion": [ASSISTANT]}, "both be strings or both message lists"),
    ({"prompt": "Q"}, "none of 'completion', 'messages', 'chosen'"),
    ({"prompt": "Q", "completion": " A", "weight": -1}, "'weight' must be >= 0"),
    ({"prompt": "Q", "completion": ""}, "empty target"),
    ({"prompt": "Q", "chosen": "", "rejected": " B"}, "empty target"),
    (["not", "an", "object"], "expected a JSON object"),
])
def test_bad_sft_rows_say_what_is_wrong(raw, says: str) -> None:
    with pytest.raises(BadRecord, match=says):
        parse_sft_row(raw)


def test_tokenized_like_dpo_and_truncation_counted_once(tokenizer) -> None:
    stats = DataStats()
    tok = tokenize_sft_row({"prompt": "Words: cat.", "completion": " animal"}, "f:1", tokenizer, CFG, stats)
    assert tok.chosen_ids[-1] == tokenizer.eos_token_id and tok.rejected_ids == []
    assert tokenizer.decode(tok.chosen_ids, skip_special_tokens=True) == " animal"
    short = DataConfig(train="unused", max_length=8, max_prompt_length=4)
    tokenize_sft_row({"prompt": "Words: cat dog red blue.", "completion": " animal animal animal animal"},
                     "f:2", tokenizer, short, stats)
    assert stats.totals() == {"rows": 2, "bad_records": 0, "truncated_prompts": 1, "truncated_responses": 1}
    conv = tokenize_sft_row({"messages": [USER, ASSISTANT]}, "f:3", tokenizer, CFG, DataStats())
    assert tokenizer.decode(conv.chosen_ids).startswith("animal")  # the template's turn, no generation prompt


def test_collate_masks_only_target_tokens(tokenizer) -> None:
    rows = [tokenize_sft_row({"prompt": p, "completion": c}, f"f:{i}", tokenizer, CFG, DataStats())
            for i, (p, c) in enumerate([("Words: cat.", " animal"), ("Words: red blue green.", " color")])]
    b = collate_sft(rows, tokenizer.pad_token_id)
    assert b["input_ids"].shape[0] == 2  # (B, T), not DPO's (2B, T)
    for i, r in enumerate(rows):
        n = len(r.prompt_ids) + len(r.chosen_ids)
        assert b["loss_mask"][i].nonzero().flatten().tolist() == list(range(len(r.prompt_ids), n))
        assert int(b["attention_mask"][i].sum()) == n
    assert b["num_tokens"] == sum(len(r.prompt_ids) + len(r.chosen_ids) for r in rows)


class _Logits(torch.nn.Module):
    """Returns fixed logits: the hand computation below needs known numbers, not a trained model."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = False):
        return SimpleNamespace(logits=self.logits)


def test_loss_equals_hand_computed_mean_nll_per_target_token() -> None:
    """Vocabulary 3, rows of 4 tokens. Row 0: prompt [0], target [1, 2] (predicted at positions
    0, 1); row 1: prompt [0, 1], target [2] (predicted at position 1), then padding.
    NLL_t = logsumexp(logits[pos]) - logits[pos, target]; loss = (w0*(NLL01+NLL02) + w1*NLL12)
    / (2*w0 + 1*w1) with weights w = [1, 3]."""
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                           [[0.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    batch = {"input_ids": torch.tensor([[0, 1, 2, 0], [0, 1, 2, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]]),
             "loss_mask": torch.tensor([[False, True, True, False], [False, False, True, False]]),
             "weight": torch.tensor([1.0, 3.0]), "margin": torch.zeros(2), "row_ids": ["a", "b"], "num_tokens": 6}

    def nll(pos_logits: list[float], target: int) -> float:
        return math.log(sum(math.exp(x) for x in pos_logits)) - pos_logits[target]

    n01, n02 = nll([2.0, 0.0, -1.0], 1), nll([0.5, 0.5, 3.0], 2)
    n12 = nll([1.0, 2.0, 0.0], 2)
    out = sft_forward(_Logits(logits), batch)
    assert out.nll.tolist() == pytest.approx([n01 + n02, n12], abs=1e-6)
    assert out.tokens.tolist() == [2.0, 1.0]
    # argmax hits: row 0 pos 0 argmax 0 (target 1: miss), pos 1 argmax 2 (target 2: hit); row 1 argmax 1 (miss)
    assert out.correct.tolist() == [1.0, 0.0]
    total = weighted_tokens(batch)
    assert total == 2 * 1 + 1 * 3
    loss = sft_loss(out, batch["weight"], total)
    assert loss.item() == pytest.approx((n01 + n02 + 3 * n12) / 5, abs=1e-6)
    loss.backward()  # differentiable through the chunked log-probs


def test_split_over_micro_batches_sums_to_the_global_token_mean() -> None:
    """Two micro-batches (or ranks) with different token counts: the shares, each divided by the
    step's global count, add up to the one-batch mean, not to the mean of the two means."""
    a = SFTOutput(torch.tensor([6.0]), torch.tensor([3.0]), torch.tensor([0.0]))
    b = SFTOutput(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    total = 3 + 2
    got = sft_loss(a, torch.ones(1), total) + sft_loss(b, torch.ones(2), total)
    assert float(got) == pytest.approx(8 / 5)
    assert float(got) != pytest.approx((6 / 3 + 2 / 2) / 2)
    with pytest.raises(ValueError, match="global_tokens"):
        sft_loss(a, torch.ones(1), 0)


def test_argmax_hits_with_logits_of_the_last_positions_only() -> None:
    """logits_to_keep: logits (B, L, V) are the last L positions of T."""
    ids = torch.tensor([[5, 0, 1, 2]])
    mask = torch.tensor([[False, False, True, True]])
    logits = torch.zeros(1, 3, 3)  # positions 1..3 of 4
    logits[0, 0, 1] = 1.0  # position 1 predicts token 2 (id 1): hit
    logits[0, 1, 0] = 1.0  # position 2 predicts token 3 (id 2): miss
    assert argmax_hits(logits, ids, mask).tolist() == [1.0]


@pytest.mark.parametrize("training, says", [
    ({"packing": {"maxTokens": 64}}, "training.packing: not supported with task sft"),
    ({"referenceLogps": "precompute"}, "training.referenceLogps: task sft has no reference model"),
])
def test_dpo_only_settings_refused_with_sft(training, says: str) -> None:
    cfg = {"task": "sft", "model": {"uri": "m"}, "data": {"train": "t"}, "output": {"uri": "o"},
           "training": training}
    with pytest.raises(ConfigError, match=says):
        parse_config(cfg)


def test_sft_exports_no_reward_series_that_would_read_zero() -> None:
    """The operator copies kubedpo_rewards_accuracies into status.progress: an SFT run must not
    export one (it has no pairs), nor beta or logps; loss and token accuracy it does."""
    from prometheus_client import generate_latest

    from kubedpo_trainer.metrics import TrainerMetrics
    from kubedpo_trainer.sft_train import SFTTrainer

    m = TrainerMetrics("job", "ns", 0, unused=SFTTrainer.unused_gauges)
    m.set({"loss": 1.5, "mean_token_accuracy": 0.5, "eval_loss": 1.25})
    text = generate_latest(m.registry).decode()
    assert 'kubedpo_loss{dpojob="job",namespace="ns",rank="0"} 1.5' in text
    assert 'kubedpo_mean_token_accuracy{dpojob="job",namespace="ns",rank="0"} 0.5' in text
    assert 'kubedpo_eval_loss{dpojob="job",namespace="ns",rank="0"} 1.25' in text
    for name in ("rewards_accuracies", "rewards_margins", "logps_chosen", "logits_chosen", "beta"):
        assert f"kubedpo_{name}{{" not in text, name
    dpo = generate_latest(TrainerMetrics("job", "ns", 0).registry).decode()
    assert "kubedpo_rewards_accuracies{" in dpo  # a DPO run keeps its series from the start
