"""Task generate's pure parts: prompt rows, ids, units, seeds, padding and stop tokens."""

from __future__ import annotations

import hashlib
import json

import pytest

from kubedpo_trainer.config import parse_config
from kubedpo_trainer.data.formats import BadRecord
from kubedpo_trainer.errors import ConfigError
from kubedpo_trainer.generate.rows import (
    HELDOUT_SEED_OFFSET,
    Unit,
    assigned,
    decode_part,
    encode_part,
    generation_row,
    parse_prompt,
    plan_units,
    prompt_id,
    unit_seed,
)
from kubedpo_trainer.generate.sampler import cut_at_stop, left_pad
from kubedpo_trainer.generate.task import run_generate
from kubedpo_trainer.signals import StopRequest

CHAT = [{"role": "user", "content": "Words: cat dog."}]


def test_prompt_rows_preference_rows_and_implicit_pairs_are_prompts() -> None:
    assert parse_prompt({"prompt": "Q:", "other": 1}) == "Q:"
    assert parse_prompt({"prompt": CHAT}) == CHAT
    assert parse_prompt({"prompt": "Q:", "chosen": " a", "rejected": " b"}) == "Q:"
    assert parse_prompt({"chosen": "Q: a", "rejected": "Q: b"}) == "Q:"


@pytest.mark.parametrize("raw, says", [
    ({"text": "Q"}, "missing field 'prompt'"),
    ({"prompt": 3}, "must be a string or a non-empty list"),
    ({"prompt": ""}, "empty 'prompt'"),
    ([1], "expected a JSON object"),
    (BadRecord("not valid JSON: x"), "not valid JSON"),
])
def test_bad_prompt_rows_say_why(raw, says: str) -> None:
    with pytest.raises(BadRecord, match=says):
        parse_prompt(raw)


def test_generation_row_id_is_the_contracts_hash() -> None:
    row = generation_row(CHAT, ["a", "b"], "s3://b/p.jsonl:7")
    assert row == {"id": hashlib.sha256(json.dumps(CHAT, sort_keys=True).encode()).hexdigest()[:16],
                   "prompt": CHAT, "responses": ["a", "b"], "source": "s3://b/p.jsonl:7"}
    assert prompt_id("Q") != prompt_id("Q ") and len(prompt_id("Q")) == 16
    assert decode_part(encode_part([row, row])) == [row, row]
    assert encode_part([]) == b""


def test_units_cover_every_prompt_once_and_ranks_take_every_world_th() -> None:
    units = plan_units("train", 10, 4)
    assert [(u.start, u.stop, u.name) for u in units] == [
        (0, 4, "part-00000.jsonl"), (4, 8, "part-00001.jsonl"), (8, 10, "part-00002.jsonl")]
    assert plan_units("train", 0, 4) == []
    assert assigned(5, 0, 2) == [0, 2, 4] and assigned(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError):
        plan_units("train", 3, 0)


def test_seeds_depend_on_the_unit_only_and_split_apart() -> None:
    assert unit_seed(7, Unit("train", 3, 0, 1)) == 10
    assert unit_seed(7, Unit("heldout", 3, 0, 1)) == 10 + HELDOUT_SEED_OFFSET


def test_left_padding_and_stop_tokens() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([4, 5, 2, 0, 0], [2]) == ([4, 5], 3)  # EOS counted as generated, not returned
    assert cut_at_stop([4, 5, 6], [2]) == ([4, 5, 6], 3)  # hit max_new_tokens
    assert cut_at_stop([9, 4], [2, 9]) == ([], 1)


def test_vllm_engine_refused_before_anything_loads(tmp_path) -> None:
    """vllm is not in this environment (nor in the CPU test image): a ConfigError (exit 2) naming the
    field, raised before a model or data is touched; never a silent fallback to transformers."""
    cfg = parse_config({"task": "generate", "model": {"uri": str(tmp_path / "none")}, "data": {"train": "x"},
                        "output": {"uri": str(tmp_path / "out")}, "generate": {"engine": "vllm"}})
    with pytest.raises(ConfigError, match="generate.engine: vllm is not installed in this trainer image"):
        run_generate(cfg, StopRequest())
    assert not (tmp_path / "out").exists()


def test_metrics_names_the_operator_and_dashboards_read() -> None:
    from prometheus_client import generate_latest

    from kubedpo_trainer.generate.metrics import GenerateMetrics

    m = GenerateMetrics("job", "ns", 0)
    m.set(step=12, total_steps=40, generate_prompts_done=12, generate_prompts_total=40, eta_seconds=3.5,
          tokens_per_second=100.0)
    m.advance("generate_tokens", 500)
    m.advance("generate_tokens", 700)
    m.advance("generate_tokens", 650)  # a running total never goes back
    text = generate_latest(m.registry).decode()
    for line in ('kubedpo_step{dpojob="job",namespace="ns",rank="0"} 12.0',
                 'kubedpo_total_steps{dpojob="job",namespace="ns",rank="0"} 40.0',
                 'kubedpo_generate_prompts_done{dpojob="job",namespace="ns",rank="0"} 12.0',
                 'kubedpo_generate_prompts_total{dpojob="job",namespace="ns",rank="0"} 40.0',
                 'kubedpo_eta_seconds{dpojob="job",namespace="ns",rank="0"} 3.5',
                 'kubedpo_tokens_per_second{dpojob="job",namespace="ns",rank="0"} 100.0',
                 'kubedpo_generate_tokens_total{dpojob="job",namespace="ns",rank="0"} 700.0'):
        assert line in text
    assert "kubedpo_loss" not in text and "rewards" not in text  # no DPO series that would read as 0


def test_spec_record_names_what_changed(tmp_path) -> None:
    from kubedpo_trainer.errors import InputError
    from kubedpo_trainer.generate.spec import check_spec

    def cfg(**generate):
        return parse_config({"task": "generate", "model": {"uri": "m"}, "data": {"train": "t"},
                             "output": {"uri": str(tmp_path)}, "generate": generate})

    check_spec(cfg(samplesPerPrompt=4))  # records
    check_spec(cfg(samplesPerPrompt=4))  # same spec: fine
    with pytest.raises(InputError, match=r"generate.maxPrompts: None -> 10; generate.samplesPerPrompt: 4 -> 2"):
        check_spec(cfg(samplesPerPrompt=2, maxPrompts=10))


def test_lora_section_refused_for_generate() -> None:
    """A LoRA section would otherwise be ignored and the base model sampled, silently."""
    with pytest.raises(ConfigError, match=r"model.lora: task generate samples from full weights"):
        parse_config({"task": "generate", "model": {"uri": "m", "lora": {"rank": 8}}, "data": {"train": "t"},
                      "output": {"uri": "o"}, "generate": {}})
