"""The transformers engine: prompts to token ids, left-padded batches, `model.generate`, decoding.

Left padding keeps every prompt's last token at the same position, so one `generate` call with
the KV cache (transformers' default) extends a whole batch; position ids come from the
attention mask. K samples of a prompt are K rows of the batch (the prompt repeated), so the
batch is `batchSize x K` sequences; greedy decoding (temperature 0) computes one and repeats it.
Responses are the new tokens up to the first stop token (the tokenizer's EOS and the model's
generation-config EOS ids, e.g. a chat template's end-of-turn), decoded without special tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..data.formats import Messages
from ..data.tokenize import bos_prefix
from ..errors import InputError


@dataclass(frozen=True)
class Sampling:
    samples: int  # K responses per prompt
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: off
    max_new_tokens: int


@dataclass
class Counts:
    tokens: int = 0  # generated tokens (up to and including the stop token)
    truncated_prompts: int = 0


class PromptEncoder:
    """Prompt -> token ids: chat prompts through the chat template (with the generation prompt),
    plain prompts as DPO tokenizes them (BOS when the tokenizer adds one itself), cut to
    `max_prompt_length` on `truncation_side` (counted)."""

    def __init__(self, tokenizer: Any, max_prompt_length: int | None, truncation_side: str) -> None:
        self.tokenizer, self.max_len, self.side = tokenizer, max_prompt_length, truncation_side
        self.bos = bos_prefix(tokenizer)

    def __call__(self, prompt: str | Messages, source: str, counts: Counts) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, list):
            if getattr(tok, "chat_template", None) is None:
                raise InputError(f"{source}: chat prompt, but the tokenizer has no chat_template "
                                 "(use a chat model's tokenizer, or set model.tokenizerUri)")
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            if self.bos and ids[:1] != self.bos:
                ids = self.bos + ids
        if self.max_len is not None and len(ids) > self.max_len:
            counts.truncated_prompts += 1
            ids = ids[-self.max_len:] if self.side == "left" else ids[:self.max_len]
        return list(ids)


def stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS and the generation config's EOS id(s)."""
    ids: set[int] = set()
    for v in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return sorted(ids)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) input ids left-padded with pad_id and the (N, T) attention mask."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, t - len(s):] = 1
    return ids, mask


def cut_at_stop(tokens: list[int], stops: list[int]) -> tuple[list[int], int]:
    """(response tokens before the first stop token, tokens generated including that stop)."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i], i + 1
    return tokens, len(tokens)


class Sampler:
    """Generates K responses for batches of prompts with one model on one device."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, autocast_dtype: torch.dtype | None) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.autocast_dtype = autocast_dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stops = stop_ids(tokenizer, model)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], s: Sampling, counts: Counts) -> list[list[str]]:
        """K decoded responses for each prompt (token ids), in order."""
        greedy = s.temperature == 0
        rows = prompts if greedy else [p for p in prompts for _ in range(s.samples)]
        ids, mask = left_pad(rows, self.pad_id)
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "pad_token_id": self.pad_id,
                                  "eos_token_id": self.stops or None, "use_cache": True}
        if greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        with self._autocast():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        new = out[:, ids.shape[1]:].tolist()
        texts = []
        for seq in new:
            kept, used = cut_at_stop(seq, self.stops)
            counts.tokens += used
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True))
        if greedy:
            return [[t] * s.samples for t in texts]
        return [texts[i * s.samples:(i + 1) * s.samples] for i in range(len(prompts))]


def batched(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
