"""The batch contract: (2B, T), chosen rows then rejected rows, right padding, response-only loss mask."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from kubedpo_trainer.config import DataConfig
from kubedpo_trainer.data.collate import collate
from kubedpo_trainer.data.formats import parse_row
from kubedpo_trainer.data.tokenize import DataStats, TokenizedRow, tokenize_row

PAD = 0


def _rows() -> list[TokenizedRow]:
    return [
        TokenizedRow("a.jsonl:1", [11, 12, 13], [21, 22], [31], margin=0.5, weight=1.0),
        TokenizedRow("a.jsonl:2", [14], [23, 24, 25, 26], [32, 33], margin=0.0, weight=0.0),
    ]


def test_layout_chosen_then_rejected_right_padded() -> None:
    rows = _rows()
    b = collate(rows, PAD)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["loss_mask"].shape == (4, 5)
    assert b["input_ids"].dtype == torch.long and b["loss_mask"].dtype == torch.bool
    seqs = [r.prompt_ids + r.chosen_ids for r in rows] + [r.prompt_ids + r.rejected_ids for r in rows]
    for i, s in enumerate(seqs):
        assert b["input_ids"][i, : len(s)].tolist() == s
        assert (b["input_ids"][i, len(s):] == PAD).all()
        assert b["attention_mask"][i].tolist() == [1] * len(s) + [0] * (5 - len(s))
    assert b["num_tokens"] == sum(len(s) for s in seqs)
    assert b["row_ids"] == ["a.jsonl:1", "a.jsonl:2"]
    assert b["margin"].tolist() == [0.5, 0.0] and b["weight"].tolist() == [1.0, 0.0]


def test_loss_mask_is_true_exactly_on_response_tokens() -> None:
    rows = _rows()
    b = collate(rows, PAD)
    responses = [r.chosen_ids for r in rows] + [r.rejected_ids for r in rows]
    prompts = [r.prompt_ids for r in rows] * 2
    for i, (p, resp) in enumerate(zip(prompts, responses, strict=True)):
        assert b["input_ids"][i][b["loss_mask"][i]].tolist() == resp
        assert b["loss_mask"][i].nonzero().flatten().tolist() == list(range(len(p), len(p) + len(resp)))
    assert not b["loss_mask"][b["attention_mask"] == 0].any()


def test_real_tokenized_rows_mask_prompt_and_padding(tiny) -> None:
    tok = AutoTokenizer.from_pretrained(tiny.model_dir)
    cfg = DataConfig(train="unused", max_length=64)
    rows = [tokenize_row(parse_row({"prompt": p, "chosen": c, "rejected": r}), f"x:{i}", tok, cfg, DataStats())
            for i, (p, c, r) in enumerate([("Words: cat.", " animal", " fruit color"),
                                            ("Words: red blue green.", " color", " tool")])]
    b = collate(rows, tok.pad_token_id)
    for i, row in enumerate(rows):
        for j, resp in ((i, row.chosen_ids), (i + len(rows), row.rejected_ids)):
            assert tok.decode(b["input_ids"][j][b["loss_mask"][j]]) == tok.decode(resp)
            assert resp[-1] == tok.eos_token_id and not b["loss_mask"][j][: len(row.prompt_ids)].any()


def test_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        collate([], PAD)
