"""Prompt rows in, generation rows out, and the units of work: pure functions (no torch, no I/O).

Prompt rows: `{"prompt": str | [messages]}`, other keys ignored, so preference rows are prompt
rows too (an implicit-prompt row `{chosen, rejected}` gives its shared prefix, as DPO reads it).
Generation rows: `{"id", "prompt", "responses", "source"}` (docs/iterative-dpo.md); `id` is the
first 16 hex digits of sha256(json.dumps(prompt, sort_keys=True)), the same for the same prompt
in every round, so the judge can match a prompt's responses across generations.

Units: the prompts, in the data's rank-independent global (file) order, cut into consecutive
runs of `promptsPerShard`; unit u is written whole as `part-<u:05d>.jsonl`, so its content
depends only on the data, the spec and u (its sampling seed is `seed + u`), never on the number
of ranks or on restarts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..data.formats import BadRecord, Messages, _text_or_messages, split_common_prefix

HELDOUT_SEED_OFFSET = 1 << 20  # held-out unit u samples with seed + 2**20 + u: apart from train's


@dataclass(frozen=True)
class Unit:
    """One output shard: `split` (train or heldout), its number and the epoch positions it covers."""

    split: str  # "train" | "heldout"
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return part_name(self.index)

    @property
    def size(self) -> int:
        return self.stop - self.start


def part_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


def plan_units(split: str, prompts: int, per_shard: int) -> list[Unit]:
    """Consecutive units of `per_shard` prompts (the last may be shorter) covering 0..prompts-1."""
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    return [Unit(split, u, s, min(s + per_shard, prompts)) for u, s in enumerate(range(0, prompts, per_shard))]


def assigned(jobs: int, rank: int, world: int) -> list[int]:
    """Job indices of `rank`, round by round (job j goes to rank j % world); None-free."""
    return list(range(rank, jobs, world))


def unit_seed(seed: int, unit: Unit) -> int:
    return seed + unit.index + (HELDOUT_SEED_OFFSET if unit.split == "heldout" else 0)


def parse_prompt(raw: Any) -> str | Messages:
    """The prompt of one raw row: a string or a message list; BadRecord says why not."""
    if isinstance(raw, BadRecord):
        raise raw
    if not isinstance(raw, dict):
        raise BadRecord(f"expected a JSON object, got {type(raw).__name__}")
    if raw.get("prompt") is not None:
        prompt = _text_or_messages(raw["prompt"], "prompt")
    elif raw.get("chosen") is not None and raw.get("rejected") is not None:  # implicit-prompt pair
        prompt = split_common_prefix(_text_or_messages(raw["chosen"], "chosen"),
                                     _text_or_messages(raw["rejected"], "rejected"))[0]
    else:
        raise BadRecord("missing field 'prompt' (a prompt row is {\"prompt\": str | [messages]})")
    if not prompt:
        raise BadRecord("empty 'prompt'")
    return prompt


def prompt_id(prompt: str | Messages) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


def generation_row(prompt: str | Messages, responses: list[str], source: str) -> dict[str, Any]:
    return {"id": prompt_id(prompt), "prompt": prompt, "responses": responses, "source": source}


def encode_part(rows: list[dict[str, Any]]) -> bytes:
    """A part's bytes: one JSON object per line (an empty unit is an empty, finished part)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def decode_part(data: bytes) -> list[dict[str, Any]]:
    # "\n" only: str.splitlines() also breaks at U+0085/U+2028/form feeds, which a sampled
    # response may hold and json.dumps(ensure_ascii=False) writes raw.
    return [json.loads(line) for line in data.decode().split("\n") if line.strip()]
