"""A DPOPipeline's stages as data: which DPOJobs, in which order, each with its full spec.

One pure function of the pipeline's spec (`plan_pipeline`) gives the operator and the local
runner (`kubedpo pipeline run`) the same stage list, the same child names and the same DPOJob
specs, so a pipeline run on a laptop writes exactly what it writes on the cluster. Storage
layout under the root O = spec.output (docs/iterative-dpo.md "Storage layout"):

    O/sft/model/ O/sft/ckpt/                          the sft stage (P_0 when present)
    O/round-<r>/generations/ judge/ model/ ckpt/      round r: P_{r-1} samples, judge, train -> P_r
    O/final/generations/ O/final/judge/               P_N's held-out answers and their win rates
    O/judge-cache/                                    every judge stage's cache

`round_results` and `stage_progress` turn the stages' results (the JSON each task writes to
KUBEDPO_RESULT_FILE) and progress into the pipeline's status, also as pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubedpo_trainer.config import CheckpointConfig, DataConfig, ModelConfig, OutputConfig
from kubedpo_trainer.stage_config import JudgeConfig, Task

from .api import CLUSTER_FIELDS, DPOJobSpec, SpecError, check_name, validate_spec
from .pipeline_api import (
    PIPELINE_MAX_NAME,
    DPOPipelineSpec,
    RoundResult,
    Stage,
    StageProgress,
    parse_pipeline_spec,
)

# Per-stage names under the pipeline's name (the child DPOJob is `<pipeline>-<stage name>`).
SFT = "sft"
FINAL = "final"
# Where each stage writes, relative to spec.output.
JUDGE_CACHE = "judge-cache/"
GENERATIONS = "generations/"
JUDGE = "judge/"
MODEL = "model/"
CKPT = "ckpt/"
MERGED = "merged/"  # LoRA: the merged full weights under a training stage's output (mergeOnExport)
# Win-rate names in the judge's compare and result (results[].winRateVsInitial / VsPrevious).
VS_INITIAL = "vsInitial"
VS_PREVIOUS = "vsPrevious"
# A stage's unit of progress, as its task reports kubedpo_step / kubedpo_total_steps.
UNITS: dict[Task, str] = {"sft": "steps", "dpo": "steps", "generate": "prompts", "judge": "prompts"}
# Train stages evaluate the trained policy on (at most this many of) the round's own pairs.
EVAL_PAIRS = 256


@dataclass(frozen=True)
class PlannedStage:
    """One stage: a DPOJob named `job_name` running `spec` (its `task` says what it does).

    `stage` and `round` are what the pipeline's status shows while it runs (round 0 is SFT;
    the final evaluation reports round N); `output_uri` is spec.output.uri.
    """

    name: str
    job_name: str
    stage: Stage
    round: int
    spec: DPOJobSpec

    @property
    def task(self) -> Task:
        return self.spec.task

    @property
    def output_uri(self) -> str:
        return self.spec.output.uri

    def wire_spec(self) -> dict[str, Any]:
        """The child DPOJob's `spec:` as it appears in a manifest (camelCase, no unset optionals)."""
        return self.spec.to_wire()


def check_pipeline_name(name: Any) -> None:
    """Stage DPOJobs are `<name>-r<round>-generate`, whose own limit is MAX_NAME: keep room for it."""
    check_name(name)
    if len(name) > PIPELINE_MAX_NAME:
        raise SpecError("metadata.name", f"at most {PIPELINE_MAX_NAME} characters (its stage DPOJobs are "
                        f"named <name>-final-generate, <name>-r<round>-train, ...)")


def root(spec: DPOPipelineSpec) -> str:
    """spec.output as a prefix ending in '/'."""
    return spec.output.rstrip("/") + "/"


def round_prefix(spec: DPOPipelineSpec, r: int) -> str:
    return f"{root(spec)}round-{r}/"


def policy_after(spec: DPOPipelineSpec, output_uri: str) -> str:
    """The model a training stage leaves for the next: with LoRA its merged full weights."""
    return output_uri + MERGED if spec.model.lora is not None else output_uri


def initial_policy(spec: DPOPipelineSpec) -> str:
    """P_0: the SFT stage's output when there is one, else model.uri."""
    return policy_after(spec, root(spec) + "sft/" + MODEL) if spec.sft else spec.model.uri


def policy(spec: DPOPipelineSpec, r: int) -> str:
    """P_r: the model trained in round r (P_0 for r = 0)."""
    return initial_policy(spec) if r == 0 else policy_after(spec, round_prefix(spec, r) + MODEL)


def generations_uri(spec: DPOPipelineSpec, r: int | None) -> str:
    """Round r's generations (sampled by P_{r-1}); r None: the final generations (P_N)."""
    return (f"{root(spec)}{FINAL}/" if r is None else round_prefix(spec, r)) + GENERATIONS


def parse_pipeline(name: Any, spec: Any) -> tuple[DPOPipelineSpec, list[PlannedStage]]:
    """Validate a DPOPipeline (name, spec and every stage it implies); SpecError names the field."""
    check_pipeline_name(name)
    parsed = parse_pipeline_spec(spec)
    return parsed, plan_pipeline(name, parsed)


def plan_pipeline(name: str, spec: DPOPipelineSpec) -> list[PlannedStage]:
    """Every stage in the order it runs. Raises SpecError naming the pipeline field a stage rejects."""
    stages: list[PlannedStage] = []
    if spec.sft is not None:
        stages.append(_stage(name, SFT, "sft", 0, _sft_spec(spec)))
    for r in range(1, spec.rounds + 1):
        stages.append(_stage(name, f"r{r}-generate", "generate", r, _generate_spec(spec, r)))
        stages.append(_stage(name, f"r{r}-judge", "judge", r, _judge_spec(spec, r)))
        stages.append(_stage(name, f"r{r}-train", "train", r, _train_spec(spec, r)))
    if spec.prompts.held_out:
        stages.append(_stage(name, f"{FINAL}-generate", "evaluate", spec.rounds, _generate_spec(spec, None)))
        stages.append(_stage(name, f"{FINAL}-judge", "evaluate", spec.rounds, _judge_spec(spec, None)))
    return stages


def _stage(pipeline: str, name: str, stage: Stage, r: int, wire: dict[str, Any]) -> PlannedStage:
    try:
        spec = validate_spec(DPOJobSpec, wire)
    except SpecError as err:  # name the pipeline's field, and which stage refused it
        raise SpecError(err.field, f"{err.message} (in stage {name})") from None
    return PlannedStage(name, f"{pipeline}-{name}", stage, r, spec)


def _cluster(spec: DPOPipelineSpec) -> dict[str, Any]:
    """The cluster fields, copied to every stage."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True, include=set(CLUSTER_FIELDS))


def _common(spec: DPOPipelineSpec, output: str) -> dict[str, Any]:
    return {**_cluster(spec), "output": OutputConfig(uri=output).to_wire(), "s3": spec.s3.to_wire(),
            "metrics": spec.metrics.to_wire()}


def _model(spec: DPOPipelineSpec, uri: str, reference: str | None = None, train: bool = False) -> dict:
    """model.uri = uri; LoRA only on training stages (with mergeOnExport: the next stage loads merged/)."""
    m = spec.model.model_copy(update={"uri": uri, "reference_uri": reference})
    if m.lora is not None:
        m = m.model_copy(update={"lora": m.lora.model_copy(update={"merge_on_export": True}) if train else None})
    return ModelConfig.model_validate(m.model_dump()).to_wire()


def _checkpoint(spec: DPOPipelineSpec, uri: str) -> dict[str, Any]:
    c = spec.checkpoint
    return CheckpointConfig(uri=uri, every_steps=c.every_steps, every_minutes=c.every_minutes,
                            keep_last=c.keep_last).to_wire()


def _sft_spec(spec: DPOPipelineSpec) -> dict[str, Any]:
    assert spec.sft is not None
    out = root(spec) + "sft/"
    data = spec.sft.data
    lengths = {k: getattr(spec, k) for k in ("max_length", "max_prompt_length") if k not in data.model_fields_set}
    return {**_common(spec, out + MODEL), "task": "sft", "model": _model(spec, spec.model.uri, train=True),
            "data": data.model_copy(update=lengths).to_wire(), "training": spec.sft.training.to_wire(),
            "checkpoint": _checkpoint(spec, out + CKPT)}


def _generate_spec(spec: DPOPipelineSpec, r: int | None) -> dict[str, Any]:
    """Round r samples with P_{r-1}; the final stage (r None) answers only the held-out prompts with P_N."""
    p = spec.prompts
    gen = spec.generate
    if r is None:
        # Only the held-out answers are wanted: the held-out prompts stand in as training prompts,
        # capped at one prompt and one sample, so the train/ part is a single tiny shard.
        data = DataConfig(train=p.held_out or "", eval=p.held_out, format=p.format, max_length=spec.max_length,
                          max_prompt_length=spec.max_prompt_length)
        gen = gen.model_copy(update={"samples_per_prompt": 1, "max_prompts": 1})
        model_uri = policy(spec, spec.rounds)
    else:
        data = DataConfig(train=p.train, eval=p.held_out, format=p.format, max_length=spec.max_length,
                          max_prompt_length=spec.max_prompt_length)
        model_uri = policy(spec, r - 1)
    return {**_common(spec, generations_uri(spec, r)), "task": "generate", "model": _model(spec, model_uri),
            "data": data.to_wire(), "generate": gen.to_wire()}


def _compare(spec: DPOPipelineSpec, r: int | None) -> dict[str, list[str]] | None:
    """Round r (r >= 2) measures P_{r-1}: its generations against P_0's (round 1) and P_{r-2}'s."""
    if not spec.prompts.held_out:
        return None
    if r is None:
        cand, prev = generations_uri(spec, None), generations_uri(spec, spec.rounds)
    elif r >= 2:
        cand, prev = generations_uri(spec, r), generations_uri(spec, r - 1)
    else:
        return None
    return {VS_INITIAL: [cand, generations_uri(spec, 1)], VS_PREVIOUS: [cand, prev]}


def _judge_spec(spec: DPOPipelineSpec, r: int | None) -> dict[str, Any]:
    gens = None if r is None else generations_uri(spec, r)
    judge = JudgeConfig.model_validate({
        **spec.judge.model_dump(exclude={"generations", "compare", "cache_uri"}),
        "generations": gens, "compare": _compare(spec, r),
        "cache_uri": spec.judge.cache_uri or root(spec) + JUDGE_CACHE,
    })
    out = (f"{root(spec)}{FINAL}/" if r is None else round_prefix(spec, r)) + JUDGE
    model_uri = policy(spec, spec.rounds if r is None else r - 1)
    # The judge reads judge.generations/compare; data.train names the responses it ranks.
    data = DataConfig(train=(gens or generations_uri(spec, None)) + ("train/" if gens else "heldout/"))
    return {**_common(spec, out), "task": "judge", "model": _model(spec, model_uri),
            "data": data.to_wire(), "judge": judge.to_wire()}


def _train_spec(spec: DPOPipelineSpec, r: int) -> dict[str, Any]:
    pre = round_prefix(spec, r)
    pairs = pre + JUDGE + "pairs/"
    reference: str | None = policy(spec, r - 1) if spec.reference == "previous" else policy(spec, 0)
    if spec.model.lora is not None or spec.training.loss == "simpo":
        reference = None  # LoRA: the base with the adapter off (= P_{r-1}); simpo: reference-free
    data = DataConfig(train=pairs, eval=pairs, eval_max_rows=EVAL_PAIRS, max_length=spec.max_length,
                      max_prompt_length=spec.max_prompt_length)
    return {**_common(spec, pre + MODEL), "task": "dpo",
            "model": _model(spec, policy(spec, r - 1), reference, train=True),
            "data": data.to_wire(), "training": spec.training.to_wire(),
            "checkpoint": _checkpoint(spec, pre + CKPT)}


# --- status from the stages' results ------------------------------------------------------------


def _num(result: Mapping[str, Any] | None, key: str) -> Any:
    if not result:
        return None
    v = result.get(key)
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def _rate(result: Mapping[str, Any] | None, name: str) -> float | None:
    rates = (result or {}).get("winRates")
    v = rates.get(name) if isinstance(rates, Mapping) else None
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def round_results(spec: DPOPipelineSpec, results: Mapping[str, Mapping[str, Any]]) -> list[RoundResult]:
    """status.results: one entry per round whose train stage finished, from the stages' results.

    `results` maps a stage name ("r1-judge", "final-judge", ...) to the result its task wrote.
    Round r's win rates are measured later, by judge r+1 (or the final judge for round N), and
    appear once that stage has finished. Refusals count as unparseable: neither says which
    response is better.
    """
    out = []
    for r in range(1, spec.rounds + 1):
        train = results.get(f"r{r}-train")
        if train is None:
            break
        gen, judge = results.get(f"r{r}-generate"), results.get(f"r{r}-judge")
        rates = results.get(f"r{r + 1}-judge") if r < spec.rounds else results.get(f"{FINAL}-judge")
        unparseable, refusals = _num(judge, "unparseable"), _num(judge, "refusals")
        out.append(RoundResult(
            round=r,
            prompts=_num(gen, "prompts"),
            pairs=_num(judge, "pairs"),
            ties=_num(judge, "ties"),
            unparseable=None if unparseable is None and refusals is None else (unparseable or 0) + (refusals or 0),
            inconsistent=_num(judge, "inconsistent"),
            reward_accuracy=_num(train, "evalRewardAccuracy"),
            win_rate_vs_initial=_rate(rates, VS_INITIAL),
            win_rate_vs_previous=_rate(rates, VS_PREVIOUS),
            model_uri=policy(spec, r),
        ))
    return out


def stage_progress(task: Task, progress: Mapping[str, Any] | None) -> StageProgress | None:
    """A stage DPOJob's status.progress (step, totalSteps, eta) in the stage's own unit."""
    if not progress:
        return None
    done, total = progress.get("step"), progress.get("totalSteps")
    return StageProgress(done=done if isinstance(done, int) else None,
                         total=total if isinstance(total, int) else None,
                         unit=UNITS[task], eta=progress.get("eta") if isinstance(progress.get("eta"), str) else None)


def next_stage(stages: list[PlannedStage], finished: set[str]) -> PlannedStage | None:
    """The first stage not yet finished (stages run strictly one after the other)."""
    return next((s for s in stages if s.name not in finished), None)

