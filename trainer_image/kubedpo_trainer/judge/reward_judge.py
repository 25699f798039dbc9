"""The reward-model judge: a sequence-classification model (one logit) scores each response on the worker.

The model comes through the trainer's own loading path (s3:// downloaded once per node, a local
folder, or hf://org/name). Each (prompt, response) is scored as the policy sees it: a string
prompt followed by the response, or a chat prompt rendered with the tokenizer's chat template
with the response as the assistant's turn. Longer than `maxLength` tokens: cut at the left
(the prompt's start) and counted. Scores are cached like LLM answers (keyed by the model's URI
and file versions, so a retrained model at the same URI is never mistaken for the old one).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

from .. import storage
from ..errors import InputError
from ..models import load_tokenizer, resolve_model_source
from ..stage_config import JudgeConfig, RewardModelJudgeConfig
from .cache import JudgementCache, request_key
from .pairs import Scored, pointwise
from .tally import Tally

log = logging.getLogger(__name__)


class RewardModelJudge:
    kind = "rewardModel"

    def __init__(self, cfg: JudgeConfig, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        assert cfg.reward_model is not None
        self.rm: RewardModelJudgeConfig = cfg.reward_model
        self.cache: JudgementCache | None = None
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.tokenizer = load_tokenizer(self.rm.uri)
            path = resolve_model_source(self.rm.uri)
        except InputError as err:
            raise InputError(f"judge.rewardModel.uri: {err}") from None
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as err:
            raise InputError(f"judge.rewardModel.uri {self.rm.uri}: cannot load a sequence-classification "
                             f"model: {err}") from None
        if model.config.num_labels != 1:
            raise InputError(f"judge.rewardModel.uri {self.rm.uri}: the model has {model.config.num_labels} "
                             "labels; a reward model has exactly one (num_labels=1)")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()
        self._versions = hashlib.sha256(repr(storage.versions(self.rm.uri)).encode()).hexdigest()[:16]

    def fingerprint_parts(self) -> dict[str, Any]:
        return {"kind": "rewardModel", "uri": self.rm.uri, "versions": self._versions, "maxLength": self.rm.max_length}

    def text(self, prompt: Any, response: str) -> str:
        if isinstance(prompt, list):
            return str(self.tokenizer.apply_chat_template(
                [*prompt, {"role": "assistant", "content": response}], tokenize=False))
        return f"{prompt}{response}"

    def scores(self, items: Sequence[tuple[Any, str]], tally: Tally) -> list[float]:
        """One reward per (prompt, response), cached, the rest in batches of `batchSize`."""
        cache = self.cache
        fp = cache.fp if cache is not None else ""
        keys = [request_key(fp, {"prompt": p, "response": r}) for p, r in items]
        found: dict[str, float] = {}
        todo: dict[str, str] = {}
        for key, (p, r) in zip(keys, items, strict=True):
            if key in found or key in todo:
                continue
            hit = cache.get(key) if cache is not None else None
            if isinstance(hit, int | float):
                found[key] = float(hit)
                tally.on_cache_hit()
            else:
                todo[key] = self.text(p, r)
        todo_keys = list(todo)
        for start in range(0, len(todo_keys), self.rm.batch_size):
            batch = todo_keys[start:start + self.rm.batch_size]
            for key, score in zip(batch, self._forward([todo[k] for k in batch], tally), strict=True):
                found[key] = score
                if cache is not None:
                    cache.put(key, score)
        return [found[k] for k in keys]

    def _forward(self, texts: list[str], tally: Tally) -> list[float]:
        import time

        import torch

        started = time.monotonic()
        pad = self.tokenizer.pad_token_id
        ids = []
        for text in texts:
            tokens = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if len(tokens) > self.rm.max_length:
                tokens = tokens[-self.rm.max_length:]
                tally.truncated += 1
            ids.append(tokens)
        width = max(len(t) for t in ids)
        input_ids = torch.tensor([t + [pad] * (width - len(t)) for t in ids], device=self.device)
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in ids], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        out = [float(x) for x in logits[:, 0].float().cpu()]
        seconds = (time.monotonic() - started) / len(texts)
        for t in ids:
            tally.on_request(True, seconds, len(t))
        return out

    def score(self, rows: Sequence[tuple[Any, list[str]]], tally: Tally) -> list[Scored]:
        flat = [(p, r) for p, responses in rows for r in responses]
        it = iter(self.scores(flat, tally))
        out = []
        for _, responses in rows:
            values = [next(it) for _ in responses]
            scored = pointwise([("score", v) for v in values])
            scored.notes = {(i, i): f"reward {v:.4f}" for i, v in enumerate(values)}
            out.append(scored)
        return out

    def compare(self, items: Sequence[tuple[Any, str, str]], tally: Tally) -> list[str]:
        flat = [(p, x) for p, c, b in items for x in (c, b)]
        it = iter(self.scores(flat, tally))
        out = []
        for _ in items:
            c, b = next(it), next(it)
            out.append("i" if c > b else "j" if b > c else "tie")
        return out
