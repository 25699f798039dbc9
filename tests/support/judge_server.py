"""The test judge: a real OpenAI-compatible HTTP server on 127.0.0.1, rule-based (kubedpo_trainer.tiny_judge).

As a pytest fixture (registered in tests/conftest.py): `judge_server` is a fresh `TinyJudge` per
test, already serving (`.url` is the base URL to put in judge.llm.url, `.requests` counts every
POST /v1/chat/completions, `.fail(kind, count)` programs faults, `.heal()` clears them).
Standalone (i12plan's demo, by hand): `python -m tests.support.judge_server --port P` prints
{"url": ...} once serving; the same as `python -m kubedpo_trainer.tiny_judge`, which needs no
checkout of the tests.

Also here: `write_generations`, generation rows of the tiny task in the generate task's format,
so judge tests need no generate run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubedpo_trainer import storage
from kubedpo_trainer.tiny import CATEGORIES, WORD_CATEGORY, preference_rows
from kubedpo_trainer.tiny_judge import TinyJudge, main

__all__ = ["TinyJudge", "generation_row", "judge_server", "tiny_generations", "write_generations"]


@pytest.fixture
def judge_server() -> Iterator[TinyJudge]:
    judge = TinyJudge(hang_s=5.0).start()
    try:
        yield judge
    finally:
        judge.stop()


def row_id(prompt: Any) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


def generation_row(prompt: Any, responses: list[str], source: str = "test:1") -> dict[str, Any]:
    return {"id": row_id(prompt), "prompt": prompt, "responses": responses, "source": source}


def answers_for(prompt: str) -> tuple[str, str, str]:
    """(right, wrong, none) answers to a tiny-task prompt."""
    first = prompt.split("Words:")[1].split()[0].strip(".")
    right = WORD_CATEGORY[first]
    wrong = next(c for c in CATEGORIES if c != right)
    return f" {right}", f" {wrong}", " hmm"


def tiny_generations(n: int, seed: int = 0, chat: bool = False,
                     pattern: tuple[str, ...] = ("right", "wrong", "none", "right")) -> list[dict[str, Any]]:
    """`n` generation rows of distinct tiny prompts whose responses follow `pattern`."""
    rows = []
    for pref in preference_rows(n, seed):
        prompt: Any = pref["prompt"]
        kinds = dict(zip(("right", "wrong", "none"), answers_for(prompt), strict=True))
        responses = [kinds[k] for k in pattern]
        if chat:
            prompt = [{"role": "user", "content": prompt.removesuffix(" Answer:")}]
            responses = [r.strip() for r in responses]
        rows.append(generation_row(prompt, responses))
    return rows


def write_generations(prefix: str, shards: list[list[dict[str, Any]]], split: str = "train") -> list[str]:
    """Write `shards` as <prefix>/<split>/part-<i>.jsonl (local path or s3://); returns their URIs."""
    uris = []
    for i, rows in enumerate(shards):
        uri = storage.join(prefix, split, f"part-{i:05d}.jsonl")
        storage.write_bytes(uri, "".join(json.dumps(r) + "\n" for r in rows).encode())
        uris.append(uri)
    return uris


def read_jsonl(uri: str | Path) -> list[dict[str, Any]]:
    text = storage.read_bytes(str(uri)).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]



if __name__ == "__main__":
    raise SystemExit(main())


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained tiny reward model (tiny.build_reward_model, about 10-30 s once per session) with
    the tiny tokenizer beside it: the judge's rewardModel.uri."""
    from kubedpo_trainer.tiny import build_reward_model, build_tokenizer

    out = tmp_path_factory.mktemp("reward-model")
    build_reward_model(out, build_tokenizer(out))
    return out
