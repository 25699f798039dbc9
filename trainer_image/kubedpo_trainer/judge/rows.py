"""Generation rows in, preference and rationale rows out (formats: ISSUE12 / docs/iterative-dpo.md).

Generation row: {"id": 16 hex, "prompt": str | [messages], "responses": [str, ...], "source"}.
Pair row: TRL's standard or conversational preference row + "margin" + "id"; for a chat
prompt chosen/rejected are [{"role": "assistant", "content": ...}]. Rationale row:
{"id", "chosen": i, "rejected": j, "scores": [...], "rationale": str}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .. import storage
from ..errors import InputError
from .pairs import Pair

SHARD_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class GenerationRow:
    id: str
    prompt: Any
    responses: list[str]
    source: str


def parse_generation_line(line: str, where: str) -> GenerationRow:
    """One JSON line, checked; InputError naming `where` (file:line) and the field otherwise."""
    try:
        d = json.loads(line)
    except ValueError as err:
        raise InputError(f"{where}: not a JSON object ({err})") from None
    if not isinstance(d, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(d).__name__}")
    rid, prompt, responses = d.get("id"), d.get("prompt"), d.get("responses")
    if not isinstance(rid, str) or not rid:
        raise InputError(f"{where}: id: expected a non-empty string")
    if not isinstance(prompt, str | list):
        raise InputError(f"{where}: prompt: expected a string or a list of messages")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise InputError(f"{where}: responses: expected a list of strings")
    return GenerationRow(rid, prompt, responses, str(d.get("source", where)))


def read_generations(uri: str) -> list[GenerationRow]:
    text = storage.read_bytes(uri).decode()
    # "\n" only: str.splitlines() also breaks at U+0085/U+2028/form feeds inside a response.
    return [parse_generation_line(line, f"{uri}:{n}") for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def count_rows(uri: str) -> int:
    return sum(1 for line in storage.read_bytes(uri).decode().split("\n") if line.strip())


def list_shards(prefix: str) -> list[str]:
    """The generation shards under `prefix` (a generate task's train/ or heldout/), sorted."""
    return [o.uri for o in storage.list_objects(prefix, suffixes=SHARD_SUFFIXES)]


def pair_row(row: GenerationRow, pair: Pair) -> dict[str, Any]:
    chosen, rejected = row.responses[pair.chosen], row.responses[pair.rejected]
    if isinstance(row.prompt, list):
        return {"prompt": row.prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}], "margin": pair.margin, "id": row.id}
    return {"prompt": row.prompt, "chosen": chosen, "rejected": rejected, "margin": pair.margin, "id": row.id}


def rationale_row(row: GenerationRow, pair: Pair, scores: list[float | None], rationale: str) -> dict[str, Any]:
    return {"id": row.id, "chosen": pair.chosen, "rejected": pair.rejected, "scores": scores, "rationale": rationale}


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
