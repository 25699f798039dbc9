"""Judge task tests: a config builder and the generation rows they judge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubedpo_trainer.config import TrainerConfig, parse_config
from tests.support.judge_server import tiny_generations, write_generations


def judge_config(out: str, judge: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A task-judge trainer config (model/data are required by the schema, unused by an LLM judge)."""
    return {"task": "judge", "model": {"uri": "unused"}, "data": {"train": "unused"}, "output": {"uri": out},
            "metrics": {"port": 0}, "judge": judge, **top}


def llm(url: str, **kw: Any) -> dict[str, Any]:
    return {"url": url, "model": "tiny-judge", "timeoutSeconds": 10, "maxRetries": 3, **kw}


def parse(d: dict[str, Any]) -> TrainerConfig:
    return parse_config(d)


@pytest.fixture
def generations(tmp_path: Path) -> dict[str, Any]:
    """Two train shards of 6 prompts (responses right, wrong, none, right) and held-out answers of a
    candidate (always right) and a baseline (right on 2 of 6 prompts, wrong on the others)."""
    rows = tiny_generations(12, seed=3)
    gen = str(tmp_path / "gen")
    write_generations(gen, [rows[:6], rows[6:]])
    cand = [dict(r, responses=[r["responses"][0]]) for r in rows[:6]]
    base = [dict(r, responses=[r["responses"][0] if i < 2 else r["responses"][1]]) for i, r in enumerate(rows[:6])]
    write_generations(gen, [cand], split="heldout")
    write_generations(str(tmp_path / "base"), [base], split="heldout")
    return {"gen": gen, "base": str(tmp_path / "base"), "rows": rows}
