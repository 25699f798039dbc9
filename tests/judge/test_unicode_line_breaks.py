"""JSONL is split at "\\n" only: a sampled response may hold U+0085, U+2028 or a form feed, which
json.dumps(ensure_ascii=False) writes raw and str.splitlines() would take for line ends.

Seen in make demo-iterative: a tiny policy sampled " thing\\x85", the generation part was written
whole and valid, and the judge stage refused it ("part-00001.jsonl:35: not a JSON object").
"""

from __future__ import annotations

from pathlib import Path

from kubedpo_trainer.generate.rows import decode_part, encode_part
from kubedpo_trainer.judge.cache import JudgementCache
from kubedpo_trainer.judge.rows import count_rows, read_generations

ODD = [" thing\x85", " a\u2028b", " c\u2029d", " e\x0cf", " g\x1eh", " i\x0bj"]


def test_generation_parts_round_trip_responses_with_unicode_line_breaks(tmp_path: Path) -> None:
    rows = [{"id": "0123456789abcdef", "prompt": "Words: cat. Q? Answer:", "responses": ODD, "source": "p:1"},
            {"id": "fedcba9876543210", "prompt": "Words: red. Q? Answer:", "responses": [" color"], "source": "p:2"}]
    data = encode_part(rows)
    assert decode_part(data) == rows
    part = tmp_path / "part-00000.jsonl"
    part.write_bytes(data)
    assert count_rows(str(part)) == 2
    read = read_generations(str(part))
    assert [r.responses for r in read] == [ODD, [" color"]]


def test_cached_judgements_with_unicode_line_breaks_are_read_back(tmp_path: Path) -> None:
    cache = JudgementCache(str(tmp_path / "cache"), "f" * 64, flush_every=1)
    cache.put("k1", {"answer": "A is better\u2028[[A]]", "raw": ODD})
    cache.put("k2", "[[B]]")
    cache.flush()
    again = JudgementCache(str(tmp_path / "cache"), "f" * 64)
    assert again.load() == 2
    assert again.get("k1") == {"answer": "A is better\u2028[[A]]", "raw": ODD} and again.get("k2") == "[[B]]"
