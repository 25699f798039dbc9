"""The tiny local model, tokenizer and preference task that tests and `make demo` rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubedpo_trainer.tiny import (
    CATEGORIES,
    WORD_CATEGORY,
    preference_rows,
    write_pipeline_task,
    write_preference_task,
)


def _rows(folder: str) -> list[dict]:
    return [json.loads(line) for f in sorted(Path(folder).glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_tokenizer_and_model_reload_through_auto_classes(tiny) -> None:
    tok = AutoTokenizer.from_pretrained(tiny.model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny.model_dir)
    assert {tok.pad_token, tok.bos_token, tok.eos_token} == {"<pad>", "<s>", "</s>"}
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert (tiny.model_dir / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tok)
    # Every task word is one token, so the rule is about words, not sub-word pieces.
    for word in list(WORD_CATEGORY) + list(CATEGORIES):
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    ids = tok("Words: cat red. What kind of thing is the first word? Answer: animal", return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_chat_template_renders_prompt_as_prefix_of_conversation(tiny) -> None:
    tok = AutoTokenizer.from_pretrained(tiny.model_dir)
    row = preference_rows(1, seed=3, fmt="conversational")[0]
    prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert full.startswith(prompt) and len(full) > len(prompt)
    assert row["chosen"][0]["content"] in full[len(prompt):]


@pytest.mark.parametrize("fmt", ["standard", "conversational", "implicit"])
def test_splits_share_schema_and_never_share_a_prompt(tmp_path: Path, fmt: str) -> None:
    train_uri, eval_uri = write_preference_task(tmp_path, n_train=300, n_eval=60, seed=1, fmt=fmt, shards=3)
    train, held_out = _rows(train_uri), _rows(eval_uri)
    assert (len(train), len(held_out)) == (300, 60)
    assert len(list(Path(train_uri).glob("*.jsonl"))) == 3
    keys = {frozenset(r) for r in train + held_out}
    assert len(keys) == 1  # one schema in both splits
    assert ("prompt" in next(iter(keys))) == (fmt != "implicit")

    def prompt_of(r: dict) -> str:
        if fmt == "implicit":
            return r["chosen"].rsplit(" ", 1)[0]
        return json.dumps(r["prompt"])

    assert not {prompt_of(r) for r in train} & {prompt_of(r) for r in held_out}
    assert len({prompt_of(r) for r in train}) == 300


def test_chosen_follows_the_rule_and_rejected_breaks_it() -> None:
    rows = preference_rows(400, seed=7)
    chosen_names, rejected_names = set(), set()
    for r in rows:
        first = r["prompt"].split("Words: ")[1].split()[0]
        assert r["chosen"].strip() == WORD_CATEGORY[first]
        assert r["rejected"].strip() != r["chosen"].strip()
        chosen_names.add(r["chosen"].strip())
        rejected_names.add(r["rejected"].strip())
    # Both answers come from the same names: no token wins without reading the prompt.
    assert chosen_names == rejected_names == set(CATEGORIES)


def test_same_seed_same_data_other_seed_other_data() -> None:
    assert preference_rows(50, seed=1) == preference_rows(50, seed=1)
    assert preference_rows(50, seed=1) != preference_rows(50, seed=2)


@pytest.mark.slow  # 200 training steps in-process
def test_a_two_layer_model_learns_the_rule_on_held_out_prompts(tiny) -> None:
    """DPO (sigmoid loss, beta 0.1) for 200 steps of 16 pairs: held-out reward accuracy >= 0.85.

    A minimal DPO loop of the test's own, so the task's learnability is checked independently of
    the product's loop. Reward accuracy = share of pairs with beta*(logratio_chosen -
    logratio_rejected) > 0; at step 0 policy == reference, so every reward is exactly 0.
    """
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny.model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny.model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny.model_dir).eval()
    train, held_out = _rows(tiny.train_uri), _rows(tiny.eval_uri)

    def batch(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seqs, masks = [], []
        for key in ("chosen", "rejected"):  # rows 0..B-1 chosen, B..2B-1 rejected
            for r in rows:
                p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
                a = tok(r[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                seqs.append(p + a)
                masks.append([0] * len(p) + [1] * len(a))
        t = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (t - len(s)) for s in seqs])
        att = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs])
        return ids, att, torch.tensor([m + [0] * (t - len(m)) for m in masks]).bool()

    def logps(model, ids, att, mask) -> torch.Tensor:
        lp = model(input_ids=ids, attention_mask=att).logits[:, :-1].log_softmax(-1)
        return (torch.gather(lp, 2, ids[:, 1:, None])[..., 0] * mask[:, 1:]).sum(-1)

    def margins(rows: list[dict]) -> torch.Tensor:
        ids, att, mask = batch(rows)
        with torch.no_grad():
            ref = logps(reference, ids, att, mask)
        r = 0.1 * (logps(policy, ids, att, mask) - ref)
        return r[: len(rows)] - r[len(rows):]

    def held_out_accuracy() -> float:
        with torch.no_grad():
            return (margins(held_out) > 0).float().mean().item()

    assert held_out_accuracy() == 0.0
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for step in range(200):
        loss = -torch.nn.functional.logsigmoid(margins(train[step * 16 % len(train):][:16])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # 0.90+ on one CPU, 0.883 (113 of 128) on another after 200 or 300 steps: float kernels differ by
    # machine. 0.85 is still far from a coin flip (0.5) and from step 0 (0.0).
    assert held_out_accuracy() >= 0.85


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_pipeline_task_splits_share_no_prompt(tmp_path: Path, fmt: str) -> None:
    task = write_pipeline_task(tmp_path, n_sft=40, n_prompts=30, n_held_out=20, fmt=fmt)  # type: ignore[arg-type]
    sft, train, held = _rows(task.sft_uri), _rows(task.prompts_uri), _rows(task.held_out_uri)
    assert (len(sft), len(train), len(held)) == (40, 30, 20)
    assert set(sft[0]) == {"prompt", "chosen", "rejected"} and all(set(r) == {"prompt"} for r in train + held)
    keys = [{json.dumps(r["prompt"]) for r in part} for part in (sft, train, held)]
    assert sum(map(len, keys)) == len(set().union(*keys)) == 90
    with pytest.raises(ValueError, match="fmt"):
        write_pipeline_task(tmp_path / "x", fmt="implicit")
