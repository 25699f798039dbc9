"""A tiny, fully local stand-in for a real model and preference data set (tests and `make demo`).

Nothing here downloads: the tokenizer is a byte-level BPE trained in about a second on the
task's own text, the model is a 2-layer Llama with seeded random weights, and both are written
with `save_pretrained`, so the trainer loads them through the same code path as a user's model.

The preference task is a real rule a small model can learn, not a token-level giveaway:
each prompt lists a few random words and asks for the *category of the first one*; the chosen
answer names that category, the rejected answer names another one. Chosen and rejected answers
are drawn from the same four category names, so no unconditional token preference wins; the
model has to read the prompt's first word. Held-out prompts are new word combinations.

Run `python -m kubedpo_trainer.tiny --out DIR` to build everything into DIR.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

CATEGORIES: dict[str, list[str]] = {
    "animal": ["cat", "dog", "horse", "mouse", "tiger", "eagle", "snake", "whale"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"],
    "tool": ["hammer", "saw", "drill", "wrench", "chisel", "shovel", "rake", "pliers"],
}
WORD_CATEGORY = {w: c for c, words in CATEGORIES.items() for w in words}
QUESTION = "What kind of thing is the first word?"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# Zephyr-style template: the prompt rendered with add_generation_prompt=True is a prefix of the
# full conversation, which is what conversational rows need to split prompt from response.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
Format = Literal["standard", "conversational", "implicit"]


@dataclass(frozen=True)
class TinyArtifacts:
    model_dir: Path
    train_uri: str
    eval_uri: str


def _corpus() -> list[str]:
    """Every string the task can produce, so BPE learns whole words as single tokens."""
    words = list(WORD_CATEGORY) + list(CATEGORIES)
    lines = [QUESTION, "Words:", "Answer:", "<|user|>", "<|assistant|>", "<|system|>"]
    lines += [" ".join(words)] * 4 + [f"Words: {w} {w}. {QUESTION} Answer: {c}" for w, c in WORD_CATEGORY.items()]
    return lines


def build_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the task vocabulary and save it as a transformers tokenizer.

    Returns the `PreTrainedTokenizerFast` (also written to `out_dir` with save_pretrained).
    No BOS is added automatically: like most chat models, special tokens come from the template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 256
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(
    out_dir: str | Path,
    tokenizer: Any,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A LlamaForCausalLM with seeded random weights, saved as safetensors in `out_dir`.

    Grouped-query attention (fewer KV heads) is on by default so the loaders see the same
    shapes as modern checkpoints.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def build_reward_model(
    out_dir: str | Path,
    tokenizer: Any,
    train_rows: int = 2048,
    steps: int = 250,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> LlamaForSequenceClassification:
    """A tiny reward model of the task (LlamaForSequenceClassification, num_labels=1), saved in `out_dir`.

    With `steps` > 0 it is trained (Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected), batch
    32, AdamW 3e-3; about 10 s on a free CPU core) on preference rows of the task: the right category
    over a wrong one, and (one row in five) over an answer naming no category, so it scores
    "prompt + response" as the rule judge does. Measured on 300 held-out rows: right over wrong
    about 0.9 of the time after 250 steps (0.8 after 150). The rows come from a seed of their own
    (`seed + 1000`), not the policy's data. The tokenizer is saved beside it: the judge loads both
    from one URI. Full multi-head attention (no grouped KV heads) learns the lookup of the first
    word faster than the policy's GQA shape.
    """
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.num_labels = 1  # one score per sequence (the property sets id2label)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    if steps:
        rng = random.Random(seed + 1000)
        nonsense = list(WORD_CATEGORY)  # words, but no category name
        pairs = [(r["prompt"] + r["chosen"],
                  r["prompt"] + (r["rejected"] if rng.random() < 0.8 else " " + rng.choice(nonsense)))
                 for r in preference_rows(train_rows, seed + 1000)]
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # matrices this small: more threads only contend (4x slower on a busy box)
        try:
            _train_reward(model, tokenizer, pairs, opt, steps, rng)
        finally:
            torch.set_num_threads(threads)
        model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return model


def _train_reward(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], opt: Any, steps: int,
                  rng: random.Random) -> None:
    import torch.nn.functional as F

    for _ in range(steps):
        batch = rng.sample(pairs, 32)
        enc = tokenizer([t for pair in batch for t in pair], return_tensors="pt", padding=True)
        rewards = model(**enc).logits[:, 0].view(-1, 2)
        loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _prompt_words(rng: random.Random, n_words: int) -> tuple[str, ...]:
    return tuple(rng.choice(list(WORD_CATEGORY)) for _ in range(n_words))


def make_row(words: tuple[str, ...], wrong: str, fmt: Format) -> dict[str, Any]:
    """One preference row in TRL's format `fmt` for prompt `words` and a wrong category."""
    text = f"Words: {' '.join(words)}. {QUESTION}"
    right = WORD_CATEGORY[words[0]]
    if fmt == "standard":
        return {"prompt": f"{text} Answer:", "chosen": f" {right}", "rejected": f" {wrong}"}
    if fmt == "conversational":
        return {
            "prompt": [{"role": "user", "content": text}],
            "chosen": [{"role": "assistant", "content": right}],
            "rejected": [{"role": "assistant", "content": wrong}],
        }
    if fmt == "implicit":
        return {"chosen": f"{text} Answer: {right}", "rejected": f"{text} Answer: {wrong}"}
    raise ValueError(f"fmt: unknown format {fmt!r} (standard, conversational, implicit)")


def preference_rows(n: int, seed: int, fmt: Format = "standard") -> list[dict[str, Any]]:
    """`n` rows with pairwise distinct prompts (3 to 5 words each)."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        words = _prompt_words(rng, rng.randint(3, 5))
        if words in seen:
            continue
        seen.add(words)
        wrong = rng.choice([c for c in CATEGORIES if c != WORD_CATEGORY[words[0]]])
        rows.append(make_row(words, wrong, fmt))
    return rows


def _write_shards(rows: list[dict[str, Any]], folder: Path, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        part = rows[i::shards]
        text = "".join(json.dumps(r) + "\n" for r in part)
        (folder / f"part-{i:05d}.jsonl").write_text(text)


def write_preference_task(
    out_dir: str | Path,
    n_train: int = 2048,
    n_eval: int = 256,
    seed: int = 0,
    fmt: Format = "standard",
    shards: int = 2,
) -> tuple[str, str]:
    """JSONL shards under out_dir/train/ and out_dir/eval/; no prompt is in both splits.

    Returns (train_uri, eval_uri) as local folder paths.
    """
    rows = preference_rows(n_train + n_eval, seed, fmt)
    out = Path(out_dir)
    _write_shards(rows[:n_train], out / "train", shards)
    _write_shards(rows[n_train:], out / "eval", max(1, min(shards, n_eval)))
    return str(out / "train"), str(out / "eval")


@dataclass(frozen=True)
class PipelineTask:
    """The tiny task split for a DPOPipeline: SFT rows and two prompt sets, no prompt in two of them."""

    sft_uri: str
    prompts_uri: str
    held_out_uri: str


def write_pipeline_task(
    out_dir: str | Path, n_sft: int = 512, n_prompts: int = 256, n_held_out: int = 128, seed: int = 0,
    fmt: Format = "standard",
) -> PipelineTask:
    """out_dir/sft/ (preference rows: the SFT stage's targets are their chosen answers),
    out_dir/prompts/train/ and out_dir/prompts/heldout/ (prompt-only rows `{"prompt": ...}`).

    The held-out prompts are new word combinations, so a win rate on them measures the rule
    learnt, not answers remembered.
    """
    if fmt == "implicit":
        raise ValueError("fmt: prompts need an explicit prompt (standard or conversational)")
    rows = preference_rows(n_sft + n_prompts + n_held_out, seed, fmt)
    out = Path(out_dir)
    _write_shards(rows[:n_sft], out / "sft", 2)
    prompts = [{"prompt": r["prompt"]} for r in rows[n_sft:]]
    _write_shards(prompts[:n_prompts], out / "prompts" / "train", 2)
    _write_shards(prompts[n_prompts:], out / "prompts" / "heldout", 1)
    return PipelineTask(str(out / "sft"), str(out / "prompts" / "train"), str(out / "prompts" / "heldout"))


def build_all(
    root: str | Path, n_train: int = 2048, n_eval: int = 256, fmt: Format = "standard", seed: int = 0
) -> TinyArtifacts:
    """Tokenizer + model in root/model, task in root/data/{train,eval}."""
    root = Path(root)
    model_dir = root / "model"
    tokenizer = build_tokenizer(model_dir)
    build_model(model_dir, tokenizer, seed=seed)
    train_uri, eval_uri = write_preference_task(root / "data", n_train, n_eval, seed, fmt)
    return TinyArtifacts(model_dir, train_uri, eval_uri)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubedpo_trainer.tiny", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="Folder to build into (model/ and data/).")
    p.add_argument("--format", default="standard", choices=["standard", "conversational", "implicit"])
    p.add_argument("--train-rows", type=int, default=2048)
    p.add_argument("--eval-rows", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    art = build_all(args.out, args.train_rows, args.eval_rows, args.format, args.seed)
    print(json.dumps({"model": str(art.model_dir), "train": art.train_uri, "eval": art.eval_uri}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
