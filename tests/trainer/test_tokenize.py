"""Tokenization: exact prompt/response boundary, BOS/EOS like TRL, chat templates, counted truncation."""

from __future__ import annotations

import copy

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from kubedpo_trainer.config import DataConfig
from kubedpo_trainer.data.formats import parse_row
from kubedpo_trainer.data.tokenize import DataStats, bos_prefix, tokenize_row
from kubedpo_trainer.errors import InputError

CFG = DataConfig(train="unused", max_length=64, max_prompt_length=32)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    """The tiny model's tokenizer, loaded the way the trainer loads a user's (no BOS added by itself)."""
    return AutoTokenizer.from_pretrained(tiny.model_dir)


@pytest.fixture(scope="module")
def llama_like(tokenizer):
    """Same vocabulary, but its post-processor adds BOS and EOS around every text (Llama-style)."""
    tok = copy.deepcopy(tokenizer)
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)]
    )
    return tok


def _tok(raw: dict, tok, cfg: DataConfig = CFG, stats: DataStats | None = None):
    return tokenize_row(parse_row(raw), "f.jsonl:1", tok, cfg, stats if stats is not None else DataStats())


def test_standard_row_prompt_and_responses_tokenized_apart_with_eos(tokenizer) -> None:
    row = _tok({"prompt": "Words: cat dog.", "chosen": " animal", "rejected": " color", "weight": 2}, tokenizer)
    eos = tokenizer.eos_token_id
    assert row.prompt_ids == tokenizer("Words: cat dog.", add_special_tokens=False)["input_ids"]
    assert row.chosen_ids == tokenizer(" animal", add_special_tokens=False)["input_ids"] + [eos]
    assert row.rejected_ids == tokenizer(" color", add_special_tokens=False)["input_ids"] + [eos]
    assert eos not in row.prompt_ids and row.weight == 2.0 and row.row_id == "f.jsonl:1"


def test_an_empty_response_is_the_eos_token_alone(tokenizer) -> None:
    row = _tok({"prompt": "Words: cat dog.", "chosen": " animal", "rejected": ""}, tokenizer)
    assert row.rejected_ids == [tokenizer.eos_token_id]


def test_eos_is_not_doubled_when_the_response_already_ends_with_it(tokenizer) -> None:
    row = _tok({"prompt": "Q", "chosen": " animal</s>", "rejected": " color"}, tokenizer)
    assert row.chosen_ids.count(tokenizer.eos_token_id) == 1 and row.chosen_ids[-1] == tokenizer.eos_token_id


def test_bos_added_once_for_tokenizers_that_add_it_and_no_eos_in_prompt(llama_like, tokenizer) -> None:
    assert bos_prefix(llama_like) == [llama_like.bos_token_id] and bos_prefix(tokenizer) == []
    row = _tok({"prompt": "Words: cat.", "chosen": " animal", "rejected": " color"}, llama_like)
    body = llama_like("Words: cat.", add_special_tokens=False)["input_ids"]
    assert row.prompt_ids == [llama_like.bos_token_id] + body  # BOS, but not the EOS the tokenizer appends
    assert row.chosen_ids[0] != llama_like.bos_token_id  # responses never get BOS
    already = _tok({"prompt": "<s>Words: cat.", "chosen": " a", "rejected": " b"}, llama_like)
    assert already.prompt_ids.count(llama_like.bos_token_id) == 1


def test_conversational_rendered_with_chat_template_response_is_the_difference(tokenizer) -> None:
    prompt = [{"role": "user", "content": "Words: cat dog."}]
    chosen, rejected = [{"role": "assistant", "content": "animal"}], [{"role": "assistant", "content": "color"}]
    row = _tok({"prompt": prompt, "chosen": chosen, "rejected": rejected}, tokenizer)
    p_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
    assert full.startswith(p_text)
    assert row.prompt_ids == tokenizer(p_text, add_special_tokens=False)["input_ids"]
    resp = tokenizer(full[len(p_text):], add_special_tokens=False)["input_ids"]
    # TRL adds EOS only to non-conversational rows: the response ends where the template ends the turn.
    assert row.chosen_ids == resp
    assert tokenizer.decode(row.chosen_ids).endswith(tokenizer.eos_token + "\n")  # the template's own end
    assert "animal" in tokenizer.decode(row.chosen_ids) and "animal" not in tokenizer.decode(row.prompt_ids)
    assert "color" in tokenizer.decode(row.rejected_ids)


def test_template_rendering_the_prompt_differently_splits_at_the_shared_prefix(tokenizer) -> None:
    """Like DeepSeek-R1's `<think>` after the generation prompt: the split is where renderings diverge."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tokenizer.chat_template.replace("<|assistant|>\n{% endif %}", "<|assistant|>\nWords:{% endif %}")
    assert tok.chat_template != tokenizer.chat_template
    row = _tok({"prompt": [{"role": "user", "content": "cat"}], "chosen": [{"role": "assistant", "content": "animal"}],
                "rejected": [{"role": "assistant", "content": "color"}]}, tok)
    assert tok.decode(row.prompt_ids).endswith("<|assistant|>\n")
    assert tok.decode(row.chosen_ids).startswith("animal")


def test_conversational_without_chat_template_is_a_setup_error(tokenizer) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    raw = {"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(InputError, match=r"f\.jsonl:1: conversational row, but the tokenizer has no chat_template"):
        _tok(raw, tok)


def test_implicit_prompt_tokenizes_like_the_explicit_row(tokenizer) -> None:
    implicit = _tok({"chosen": "Words: cat. Answer: animal", "rejected": "Words: cat. Answer: color"}, tokenizer)
    explicit = _tok({"prompt": "Words: cat. Answer:", "chosen": " animal", "rejected": " color"}, tokenizer)
    assert implicit == explicit


@pytest.mark.parametrize("side", ["left", "right"])
def test_prompt_truncation_keeps_the_configured_end_and_is_counted(tokenizer, side: str) -> None:
    cfg = DataConfig(train="unused", max_length=16, max_prompt_length=5, truncation_side=side)
    stats = DataStats()
    prompt = "Words: " + " ".join(["cat", "dog", "red", "blue"] * 5) + "."
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    row = _tok({"prompt": prompt, "chosen": " animal", "rejected": " color"}, tokenizer, cfg, stats)
    assert row.prompt_ids == (ids[-5:] if side == "left" else ids[:5])
    assert row.chosen_ids[-1] == tokenizer.eos_token_id  # short responses still fit whole
    assert stats.totals() == {"rows": 1, "bad_records": 0, "truncated_prompts": 1, "truncated_responses": 0}


def test_response_truncated_at_the_right_to_fit_max_length_and_counted(tokenizer) -> None:
    cfg = DataConfig(train="unused", max_length=12, max_prompt_length=None)
    stats = DataStats()
    long = " animal color fruit tool" * 10
    row = _tok({"prompt": "Words: cat.", "chosen": long, "rejected": " color"}, tokenizer, cfg, stats)
    full = tokenizer(long, add_special_tokens=False)["input_ids"]
    assert len(row.prompt_ids) + len(row.chosen_ids) == 12
    assert row.chosen_ids == full[: 12 - len(row.prompt_ids)]  # the start of the response is kept
    assert stats.truncated_responses == 1 and stats.truncated_prompts == 0  # only chosen was cut


def test_prompt_alone_longer_than_max_length_leaves_room_for_a_response_token(tokenizer) -> None:
    cfg = DataConfig(train="unused", max_length=8, max_prompt_length=None)
    stats = DataStats()
    row = _tok({"prompt": " ".join(["cat"] * 30), "chosen": " animal", "rejected": " color"}, tokenizer, cfg, stats)
    assert len(row.prompt_ids) == 7 and len(row.chosen_ids) == len(row.rejected_ids) == 1
    assert stats.truncated_prompts == 1 and stats.truncated_responses == 2
