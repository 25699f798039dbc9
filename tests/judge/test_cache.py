"""The judgement cache: segments flushed every FLUSH_EVERY, merged at the end, damaged lines re-paid."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubedpo_trainer.judge.cache import JudgementCache, fingerprint, request_key


def segments(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jsonl"))


def test_flush_every_n_then_compact_into_one(tmp_path: Path) -> None:
    fp = fingerprint({"kind": "llm", "model": "m"})
    cache = JudgementCache(str(tmp_path), fp, flush_every=4)
    for i in range(10):
        cache.put(request_key(fp, i), {"text": str(i)})
    assert len(segments(tmp_path)) == 2  # 8 written in two segments; 2 still buffered
    fresh = JudgementCache(str(tmp_path), fp)
    assert fresh.load() == 8  # a kill now would lose the 2 unflushed
    cache.compact()
    assert len(segments(tmp_path)) == 1
    again = JudgementCache(str(tmp_path), fp)
    assert again.load() == 10 and again.get(request_key(fp, 9)) == {"text": "9"}


def test_keys_depend_on_config_and_request(tmp_path: Path) -> None:
    a, b = fingerprint({"model": "a"}), fingerprint({"model": "b"})
    assert request_key(a, [1]) != request_key(b, [1]) and request_key(a, [1]) != request_key(a, [2])
    JudgementCache(str(tmp_path), a, flush_every=1).put(request_key(a, [1]), 1)
    assert JudgementCache(str(tmp_path), b).load() == 0  # another judge config reads another folder


def test_a_damaged_line_is_ignored_and_paid_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fp = fingerprint({})
    JudgementCache(str(tmp_path), fp, flush_every=2).put(request_key(fp, 1), 1)
    cache = JudgementCache(str(tmp_path), fp, flush_every=1)
    cache.put(request_key(fp, 2), 2)
    (seg,) = segments(tmp_path)
    seg.write_text(seg.read_text() + '{"k": "truncated\n')
    loaded = JudgementCache(str(tmp_path), fp)
    assert loaded.load() == 1
    assert "not a cache entry" in caplog.text and f"{seg}:2" in caplog.text


def test_an_entry_of_another_shape_is_asked_again_not_a_crash(tmp_path: Path, judge_server) -> None:  # noqa: ANN001
    from kubedpo_trainer.judge import templates as t
    from kubedpo_trainer.judge.llm_judge import LLMJudge
    from kubedpo_trainer.judge.tally import Tally
    from kubedpo_trainer.stage_config import JudgeConfig, LLMJudgeConfig

    judge = LLMJudge(JudgeConfig(kind="llm", llm=LLMJudgeConfig(url=judge_server.url, model="m"), generations="x"))
    fp = fingerprint(judge.fingerprint_parts())
    judge.cache = JudgementCache(str(tmp_path), fp)
    request = t.messages("[User Question]\nWords: cat.\n\n[The Start of the Assistant's Answer]\nanimal\n"
                         "[The End of the Assistant's Answer]", None)
    judge.cache.put(request_key(fp, request), "an old format")
    tally = Tally()
    (answer,) = judge.ask([request], tally)
    assert answer is not None and answer.text.endswith("[[10]]")
    assert judge_server.requests == 1 and tally.cache_hits == 0
    assert judge.cache.get(request_key(fp, request))["text"] == answer.text  # replaced by the new answer
