"""The DPOPipeline's plan: stage order, child names, each stage's DPOJob spec, and status from results."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedpo_operator.api import MAX_NAME, SpecError
from kubedpo_operator.pipeline_api import PIPELINE_MAX_NAME, parse_pipeline_spec
from kubedpo_operator.pipeline_plan import parse_pipeline, plan_pipeline, round_results, stage_progress

REPO = Path(__file__).resolve().parents[2]
O = "s3://runs/p/"


def base(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": "s3://models/base/"},
        "prompts": {"train": "s3://prompts/train/", "heldOut": "s3://prompts/heldout/"},
        "rounds": 2,
        "judge": {"kind": "llm", "llm": {"url": "http://judge:8000/v1", "model": "m"}},
        "output": "s3://runs/p",
        "workers": 2,
        "envFrom": [{"secretRef": {"name": "s3"}}],
        "checkpoint": {"everySteps": 5},
    }
    spec.update(over)
    return spec


def stages_of(spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {s.name: s for s in plan_pipeline(name, parse_pipeline_spec(spec))}


def test_stage_order_and_child_names_with_sft() -> None:
    spec = base(sft={"data": {"train": "s3://sft/"}})
    stages = plan_pipeline("demo", parse_pipeline_spec(spec))
    assert [s.job_name for s in stages] == [
        "demo-sft", "demo-r1-generate", "demo-r1-judge", "demo-r1-train",
        "demo-r2-generate", "demo-r2-judge", "demo-r2-train", "demo-final-generate", "demo-final-judge"]
    assert [s.task for s in stages] == ["sft", "generate", "judge", "dpo"] * 2 + ["generate", "judge"] \
        or [s.task for s in stages] == ["sft"] + ["generate", "judge", "dpo"] * 2 + ["generate", "judge"]
    assert [(s.stage, s.round) for s in stages][:2] == [("sft", 0), ("generate", 1)]
    assert [(s.stage, s.round) for s in stages][-2:] == [("evaluate", 2), ("evaluate", 2)]


def test_no_held_out_prompts_no_final_stages_and_no_compare() -> None:
    spec = base()
    spec["prompts"] = {"train": "s3://prompts/train/"}
    st = stages_of(spec)
    assert list(st) == ["r1-generate", "r1-judge", "r1-train", "r2-generate", "r2-judge", "r2-train"]
    assert st["r2-judge"].spec.judge.compare is None
    assert st["r1-generate"].spec.data.eval is None


def test_policies_references_and_layout_full_fine_tune() -> None:
    st = stages_of(base(sft={"data": {"train": "s3://sft/"}}))
    sft = st["sft"].spec
    assert (sft.task, sft.model.uri, sft.output.uri, sft.checkpoint.uri) == (
        "sft", "s3://models/base/", O + "sft/model/", O + "sft/ckpt/")
    g1, j1, t1 = st["r1-generate"].spec, st["r1-judge"].spec, st["r1-train"].spec
    assert g1.model.uri == O + "sft/model/" and g1.output.uri == O + "round-1/generations/"
    assert (g1.data.train, g1.data.eval) == ("s3://prompts/train/", "s3://prompts/heldout/")
    assert j1.judge.generations == O + "round-1/generations/" and j1.output.uri == O + "round-1/judge/"
    assert j1.judge.cache_uri == O + "judge-cache/" and j1.judge.compare is None  # P_0 has nothing to beat
    assert t1.model.uri == O + "sft/model/" and t1.model.reference_uri == O + "sft/model/"
    assert t1.data.train == O + "round-1/judge/pairs/" and t1.output.uri == O + "round-1/model/"
    assert t1.checkpoint.uri == O + "round-1/ckpt/" and t1.checkpoint.every_steps == 5
    t2 = st["r2-train"].spec
    assert (t2.model.uri, t2.model.reference_uri) == (O + "round-1/model/", O + "round-1/model/")
    assert st["r2-generate"].spec.model.uri == O + "round-1/model/"
    # Win rates: judge 2 measures P_1 (round 2's samples) against P_0 (round 1's samples).
    assert st["r2-judge"].spec.judge.compare == {
        "vsInitial": [O + "round-2/generations/", O + "round-1/generations/"],
        "vsPrevious": [O + "round-2/generations/", O + "round-1/generations/"]}
    fg, fj = st["final-generate"].spec, st["final-judge"].spec
    assert fg.model.uri == O + "round-2/model/" and fg.output.uri == O + "final/generations/"
    assert fg.data.eval == "s3://prompts/heldout/"
    assert fj.judge.generations is None and fj.judge.compare == {
        "vsInitial": [O + "final/generations/", O + "round-1/generations/"],
        "vsPrevious": [O + "final/generations/", O + "round-2/generations/"]}


def test_reference_initial_keeps_p0_as_reference() -> None:
    st = stages_of(base(rounds=3, reference="initial"))
    assert [st[f"r{r}-train"].spec.model.reference_uri for r in (1, 2, 3)] == ["s3://models/base/"] * 3
    assert st["r3-train"].spec.model.uri == O + "round-2/model/"


def test_lora_merges_on_export_and_the_next_stage_loads_merged() -> None:
    st = stages_of(base(model={"uri": "s3://models/base/", "lora": {"rank": 8}}, sft={"data": {"train": "s3://sft-rows/"}}))
    sft, g1, t1 = st["sft"].spec, st["r1-generate"].spec, st["r1-train"].spec
    assert sft.model.lora is not None and sft.model.lora.merge_on_export
    assert g1.model.uri == O + "sft/model/merged/" and g1.model.lora is None  # sampling loads full weights
    assert t1.model.uri == O + "sft/model/merged/" and t1.model.lora is not None and t1.model.lora.rank == 8
    assert t1.model.lora.merge_on_export and t1.model.reference_uri is None  # reference: adapter off
    assert st["r2-generate"].spec.model.uri == O + "round-1/model/merged/"
    assert st["final-generate"].spec.model.uri == O + "round-2/model/merged/"


def test_cluster_fields_and_training_are_copied_to_every_stage() -> None:
    spec = base(training={"beta": 0.3, "learningRate": 1e-4}, maxLength=96, maxPromptLength=40,
                image="repo/trainer:1", runPolicy={"maxRestarts": 7}, metrics={"port": 0},
                s3={"endpointUrl": "http://s3:8333"})
    for s in stages_of(spec).values():
        assert s.spec.workers == 2 and s.spec.image == "repo/trainer:1"
        assert s.spec.env_from == [{"secretRef": {"name": "s3"}}] and s.spec.run_policy.max_restarts == 7
        assert s.spec.metrics.port == 0 and s.spec.s3.endpoint_url == "http://s3:8333"
        assert s.wire_spec()["task"] == s.task
    t = stages_of(spec)["r1-train"].spec
    assert (t.training.beta, t.training.learning_rate, t.data.max_length, t.data.max_prompt_length) == (
        0.3, 1e-4, 96, 40)
    assert t.data.eval == t.data.train and t.data.eval_max_rows  # reward accuracy on the round's pairs


def test_sft_lengths_follow_the_pipeline_unless_set_in_sft_data() -> None:
    st = stages_of(base(maxLength=64, sft={"data": {"train": "s3://sft-rows/"}}))
    assert st["sft"].spec.data.max_length == 64
    st = stages_of(base(maxLength=64, sft={"data": {"train": "s3://sft-rows/", "maxLength": 80}}))
    assert st["sft"].spec.data.max_length == 80


def test_judge_settings_reach_every_judge_stage_and_a_custom_cache() -> None:
    judge = {"kind": "rewardModel", "rewardModel": {"uri": "s3://rm-models/"}, "pairs": {"strategy": "allAboveMargin",
             "minMargin": 0.5}, "cacheUri": "s3://cache/"}
    st = stages_of(base(judge=judge))
    for n in ("r1-judge", "r2-judge", "final-judge"):
        j = st[n].spec.judge
        assert j.kind == "rewardModel" and j.reward_model.uri == "s3://rm-models/" and j.cache_uri == "s3://cache/"
        assert j.pairs.strategy == "allAboveMargin" and j.pairs.min_margin == 0.5


@pytest.mark.parametrize(("over", "field"), [
    ({"generate": {"samplesPerPrompt": 1}}, "spec.generate.samplesPerPrompt"),
    ({"generate": {"heldOutSamples": 0}}, "spec.generate.heldOutSamples"),
    ({"judge": {"kind": "llm", "llm": {"url": "judge:8000", "model": "m"}}}, "spec.judge.llm.url"),
    ({"judge": {"kind": "llm"}}, "spec.judge"),
    ({"judge": {"kind": "llm", "llm": {"url": "http://j/v1", "model": "m"}, "compare": {}}}, "spec.judge"),
    ({"model": {"uri": "m", "lora": {"rank": 4}}, "reference": "initial"}, "spec.reference"),
    ({"model": {"uri": "m", "referenceUri": "r"}}, "spec.model.referenceUri"),
    ({"rounds": 0}, "spec.rounds"),
    ({"output": ""}, "spec.output"),
])
def test_cross_field_problems_name_the_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_pipeline("p", base(**over))
    assert err.value.field.startswith(field), err.value


def test_a_stage_refusal_names_the_pipeline_field_and_stage() -> None:
    with pytest.raises(SpecError) as err:
        parse_pipeline("p", base(env=[{"name": "KUBEDPO_X", "value": "1"}]))
    assert err.value.field.startswith("spec.env"), err.value


def test_pipeline_name_leaves_room_for_the_longest_stage_name() -> None:
    longest = "x" * PIPELINE_MAX_NAME
    spec = base(rounds=100)
    stages = parse_pipeline(longest, spec)[1]
    assert max(len(s.job_name) for s in stages) <= MAX_NAME
    with pytest.raises(SpecError, match=f"at most {PIPELINE_MAX_NAME}") as err:
        parse_pipeline(longest + "x", spec)
    assert err.value.field == "metadata.name"
    with pytest.raises(SpecError):
        parse_pipeline("Bad_Name", spec)


def test_example_manifest_is_valid() -> None:
    doc = yaml.safe_load((REPO / "examples" / "iterative-pipeline.yaml").read_text())
    assert doc["kind"] == "DPOPipeline"
    spec, stages = parse_pipeline(doc["metadata"]["name"], doc["spec"])
    assert spec.rounds == 3 and len(stages) == 1 + 3 * 3 + 2


def results_2_rounds() -> dict[str, dict[str, Any]]:
    return {
        "r1-generate": {"prompts": 64, "heldOutPrompts": 32, "responses": 256},
        "r1-judge": {"prompts": 64, "pairs": 50, "ties": 10, "unparseable": 3, "refusals": 1, "inconsistent": 2},
        "r1-train": {"step": 20, "loss": 0.4, "evalRewardAccuracy": 0.9},
        "r2-generate": {"prompts": 64},
        "r2-judge": {"prompts": 64, "pairs": 40, "ties": 24, "unparseable": 0, "refusals": 0,
                     "winRates": {"vsInitial": 0.7, "vsPrevious": 0.7}},
    }


def test_round_results_from_stage_results() -> None:
    spec = parse_pipeline_spec(base())
    res = results_2_rounds()
    rr = round_results(spec, res)
    assert len(rr) == 1  # round 2 has not trained yet
    r1 = rr[0]
    assert (r1.round, r1.prompts, r1.pairs, r1.ties, r1.unparseable, r1.inconsistent) == (1, 64, 50, 10, 4, 2)
    assert r1.reward_accuracy == 0.9 and r1.model_uri == O + "round-1/model/"
    assert (r1.win_rate_vs_initial, r1.win_rate_vs_previous) == (0.7, 0.7)  # measured by judge 2
    res["r2-train"] = {"step": 20, "evalRewardAccuracy": 0.95}
    rr = round_results(spec, res)
    assert rr[1].win_rate_vs_initial is None  # not measured until the final judge ran
    res["final-judge"] = {"winRates": {"vsInitial": 0.8, "vsPrevious": 0.6}}
    rr = round_results(spec, res)
    assert (rr[1].win_rate_vs_initial, rr[1].win_rate_vs_previous, rr[1].pairs) == (0.8, 0.6, 40)
    wire = rr[1].to_wire()
    assert wire["winRateVsInitial"] == 0.8 and wire["rewardAccuracy"] == 0.95


def test_round_results_ignore_values_of_the_wrong_type() -> None:
    spec = parse_pipeline_spec(base())
    res = {"r1-judge": {"pairs": "many", "ties": True, "winRates": "x"}, "r1-train": {},
           "r2-judge": {"winRates": {"vsInitial": "0.5"}}}
    r1 = round_results(spec, copy.deepcopy(res))[0]
    assert (r1.pairs, r1.ties, r1.unparseable, r1.win_rate_vs_initial, r1.prompts) == (None,) * 5


def test_stage_progress_units() -> None:
    p = stage_progress("generate", {"step": 3, "totalSteps": 10, "eta": "1m05s", "loss": 0.1})
    assert p is not None and (p.done, p.total, p.unit, p.eta) == (3, 10, "prompts", "1m05s")
    assert stage_progress("dpo", {"step": 2}).unit == "steps"  # type: ignore[union-attr]
    assert stage_progress("judge", None) is None


@pytest.mark.parametrize("field", ["output", "prompts.train", "judge.llm.url", "model.uri"])
def test_credentials_in_a_pipeline_uri_are_refused(field: str) -> None:
    spec = base()
    leaky = "https://user:secret@host/x/"
    section, _, key = field.partition(".")
    if key == "llm.url":
        spec["judge"]["llm"]["url"] = leaky
    elif key:
        spec[section][key] = leaky
    else:
        spec[section] = leaky
    with pytest.raises(SpecError, match="credentials") as err:
        parse_pipeline("p", spec)
    assert err.value.field == f"spec.{field}"
