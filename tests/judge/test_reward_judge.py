"""The reward-model judge: a tiny trained LlamaForSequenceClassification scoring on the worker.

`tiny_reward_model` (tests/support/judge_server.py) is trained once per session on rows of its own
seed; the prompts judged here come from other seeds, so its preferences are measured held out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubedpo_trainer.errors import InputError
from kubedpo_trainer.judge.task import JudgeTask
from kubedpo_trainer.signals import StopRequest
from kubedpo_trainer.tiny_judge import first_category, right_category
from tests.judge.conftest import judge_config, parse
from tests.support.judge_server import read_jsonl, tiny_generations, write_generations

pytestmark = pytest.mark.slow  # trains the reward model once per session


def run(cfg: dict[str, Any]) -> tuple[JudgeTask, dict[str, Any]]:
    task = JudgeTask(parse(cfg), StopRequest())
    return task, task.run()


def rm_judge(uri: Path | str, gen: str, **kw: Any) -> dict[str, Any]:
    return {"kind": "rewardModel", "rewardModel": {"uri": str(uri), "batchSize": 16}, "generations": gen, **kw}


def test_the_reward_model_prefers_right_answers(tiny_reward_model: Path, tmp_path: Path) -> None:
    rows = tiny_generations(40, seed=11)
    gen = str(tmp_path / "gen")
    write_generations(gen, [rows[:20], rows[20:]])
    write_generations(gen, [[dict(r, responses=r["responses"][:1]) for r in rows]], split="heldout")
    write_generations(str(tmp_path / "base"), [[dict(r, responses=r["responses"][1:2]) for r in rows]],
                      split="heldout")
    out = str(tmp_path / "out")
    task, result = run(judge_config(out, rm_judge(tiny_reward_model, gen,
                                                  compare={"rightVsWrong": [gen, str(tmp_path / "base")]})))
    pairs = read_jsonl(f"{out}/pairs/part-00000.jsonl") + read_jsonl(f"{out}/pairs/part-00001.jsonl")
    right = sum(first_category(p["chosen"]) == right_category(p["prompt"]) for p in pairs)
    assert len(pairs) == 40 and right / len(pairs) >= 0.75, f"{right}/{len(pairs)} pairs choose the right answer"
    assert all(p["margin"] > 0 for p in pairs)
    assert result["winRates"]["rightVsWrong"] >= 0.75
    # 4 responses per prompt, the repeated right answer scored once; the held-out answers compared
    # (right vs wrong of the same prompts) were scored while ranking: all from the cache
    assert result["requests"] == 40 * 3 and result["cacheHits"] == 2 * 40
    rationale = read_jsonl(f"{out}/rationales/part-00000.jsonl")[0]
    assert len(rationale["scores"]) == 4 and "reward" in rationale["rationale"]
    summary = json.loads(Path(out, "kubedpo_judge_summary.json").read_text())
    assert summary["kind"] == "rewardModel" and summary["truncated"] == 0
    # scores are cached: judging the same rows into another output costs no forward pass
    _, again = run(judge_config(str(tmp_path / "again"), rm_judge(tiny_reward_model, gen,
                                                                  cacheUri=f"{out}/judge-cache")))
    assert again["requests"] == 0 and again["cacheHits"] == 40 * 3 and again["pairs"] == 40


def test_chat_prompts_and_truncation(tiny_reward_model: Path, tmp_path: Path) -> None:
    rows = tiny_generations(4, seed=12, chat=True)
    gen = str(tmp_path / "gen")
    write_generations(gen, [rows])
    out = str(tmp_path / "out")
    judge = rm_judge(tiny_reward_model, gen)
    judge["rewardModel"]["maxLength"] = 8
    _, result = run(judge_config(out, judge))
    pairs = read_jsonl(f"{out}/pairs/part-00000.jsonl")
    assert pairs and pairs[0]["chosen"][0]["role"] == "assistant" and isinstance(pairs[0]["prompt"], list)
    summary = json.loads(Path(out, "kubedpo_judge_summary.json").read_text())
    assert summary["truncated"] == 4 * 3  # every distinct (prompt, response) is longer than 8 tokens


def test_a_model_that_is_not_a_reward_model_is_refused(tiny: Any, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="judge.rewardModel.uri: .*missing: no such folder"):
        run(judge_config(str(tmp_path / "out"), rm_judge(tmp_path / "missing", "unused")))
    from transformers import AutoModelForSequenceClassification

    two = tmp_path / "two-labels"
    AutoModelForSequenceClassification.from_pretrained(tiny.model_dir, num_labels=2).save_pretrained(two)
    for f in Path(tiny.model_dir).glob("tok*"):
        (two / f.name).write_bytes(f.read_bytes())
    with pytest.raises(InputError, match="has 2 labels; a reward model has exactly one"):
        run(judge_config(str(tmp_path / "out"), rm_judge(two, "unused")))


def test_reward_model_from_seaweedfs(tiny_reward_model: Path, s3: Any, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """s3:// goes through the trainer's model loading (downloaded once into KUBEDPO_CACHE_DIR)."""
    from kubedpo_trainer import storage

    monkeypatch.setenv("KUBEDPO_CACHE_DIR", str(tmp_path / "model-cache"))
    storage.upload_dir(tiny_reward_model, s3.uri("models/rm/"))
    rows = tiny_generations(6, seed=13)
    write_generations(s3.uri("gen"), [rows])
    cfg = judge_config(s3.uri("judge/"), rm_judge(s3.uri("models/rm/"), s3.uri("gen/")),
                       s3={"endpointUrl": s3.endpoint})
    _, result = run(cfg)
    assert result["pairs"] == 6 and result["requests"] == 6 * 3
    assert any((tmp_path / "model-cache").rglob("model.safetensors"))
