"""The DPOPipeline resource: SFT, then rounds of generate -> judge -> train, from one manifest.

A DPOPipeline owns one DPOJob per stage (`<name>-sft`, `<name>-r1-generate`, `<name>-r1-judge`,
`<name>-r1-train`, ..., `<name>-final-generate`, `<name>-final-judge`), created one after the
other. Each stage is an ordinary DPOJob with its `task` set, so it gets the same admission
checks, gang restarts, checkpoints and metrics as any training run, and `kubectl get dpoj`
shows it. Why a new kind that owns DPOJobs rather than stages inside DPOJob:
docs/design-notes.md "Iterative DPO".

The stage list and each stage's DPOJob spec are pure functions of this spec
(`pipeline_plan`), shared by the operator and the local runner (`kubedpo pipeline run`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kubedpo_trainer.config import (
    DataConfig,
    MetricsConfig,
    ModelConfig,
    S3Config,
    Schema,
    StorageUri,
    TrainingConfig,
)
from kubedpo_trainer.stage_config import GenerateConfig, JudgeConfig

from .api import CONDITIONS_LIST, MAX_NAME, ClusterFields, Condition, validate_spec
from .spec_rules import CREDENTIALS_MESSAGE, has_credentials

PIPELINE_KIND = "DPOPipeline"
PIPELINE_PLURAL = "dpopipelines"
PIPELINE_SINGULAR = "dpopipeline"
PIPELINE_SHORT_NAME = "dpop"
# Stage DPOJobs are `<name>-<stage>`; the longest stage is "final-generate" (15 characters with its
# dash; "-r100-generate" has 14), and a DPOJob's name is at most MAX_NAME (52) characters.
LONGEST_STAGE_SUFFIX = "-final-generate"
PIPELINE_MAX_NAME = MAX_NAME - len(LONGEST_STAGE_SUFFIX)

PipelinePhase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
Stage = Literal["sft", "generate", "judge", "train", "evaluate", "done"]


class PromptsConfig(Schema):
    train: StorageUri = Field(..., description="Prompts of the generate stages: rows with a `prompt` "
                       "(string or chat messages), as JSONL/JSONL.gz/Parquet shards; preference rows work too "
                       "(their prompt is used).")
    held_out: StorageUri | None = Field(
        None, description="Held-out prompts: each round's policy answers them and the judge compares the "
        "answers with the initial policy's and the previous round's (status.results[].winRate*).")
    format: Literal["auto", "standard", "conversational"] = Field(
        "auto", description="standard: prompt strings; conversational: message lists rendered with the "
        "tokenizer's chat template. auto: decided per row.")


class SftStage(Schema):
    data: DataConfig = Field(..., description="SFT rows: {prompt, completion}, {messages} (the last "
                             "assistant message is the target) or preference rows (the chosen response is "
                             "the target). Prompt tokens are masked out of the loss.")
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="Optimizer settings of the SFT stage (the DPO loss fields "
        "are ignored).")


class PipelineJudge(JudgeConfig):
    """The judge section without the stage wiring: the pipeline fills generations and compare."""

    @model_validator(mode="before")
    @classmethod
    def _wiring_is_the_pipelines(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("generations", "compare"):
                if key in data:
                    raise ValueError(f"{key}: set by the pipeline for each round; remove it")
            data = {**data, "generations": "<set by the pipeline>"}
        return data


class PipelineCheckpoints(Schema):
    every_steps: int | None = Field(None, ge=1, description="Checkpoint the SFT and train stages every N steps.")
    every_minutes: float | None = Field(None, gt=0, description="Checkpoint at least this often.")
    keep_last: int = Field(2, ge=1, description="Complete checkpoints kept per stage.")


class DPOPipelineSpec(ClusterFields):
    """What a user writes under `spec:` of a DPOPipeline."""

    model: ModelConfig = Field(..., description="The starting policy (and the first reference). With `sft`, "
                               "the SFT stage starts from it and its output becomes policy and reference.")
    prompts: PromptsConfig = Field(..., description="Where the prompts of the generate stages stream from.")
    sft: SftStage | None = Field(None, description="Optional supervised fine-tuning before the first round.")
    rounds: int = Field(1, ge=1, le=100, description="Rounds of generate -> judge -> train.")
    reference: Literal["previous", "initial"] = Field(
        "previous", description="Reference of round r: previous = round r-1's output (iterative DPO); "
        "initial = the starting policy (after SFT) in every round.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Sampling of each round.")
    judge: PipelineJudge = Field(..., description="Who ranks the responses: an LLM or a reward model.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="DPO settings of each round.")
    max_length: int = Field(1024, ge=8, description="Maximum tokens of prompt + response in SFT and DPO.")
    max_prompt_length: int | None = Field(512, ge=1, description="Maximum prompt tokens (left-truncated).")
    checkpoint: PipelineCheckpoints = Field(default_factory=PipelineCheckpoints,
                                            description="Checkpoints of the training stages.")
    output: StorageUri = Field(..., description="Root prefix of everything the pipeline writes "
                        "(s3:// or local): <output>/sft/, <output>/round-<r>/{generations,judge,model,ckpt}/, "
                        "<output>/final/, <output>/judge-cache/.")
    s3: S3Config = Field(default_factory=S3Config, description="S3 endpoint and retries.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig,
                                   description="Prometheus endpoint of every stage's rank 0.")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> DPOPipelineSpec:
        """What each field allows alone but the pipeline cannot run; the first problem, naming its field."""
        problems = pipeline_problems(self)
        if problems:
            raise ValueError(problems[0])
        return self


def pipeline_problems(spec: DPOPipelineSpec) -> list[str]:
    """'field: message' for every cross-field problem of a pipeline spec."""
    out = []
    if spec.generate.samples_per_prompt < 2:
        out.append("generate.samplesPerPrompt: at least 2: the judge makes pairs from a prompt's responses")
    if spec.prompts.held_out and spec.generate.held_out_samples < 1:
        out.append("generate.heldOutSamples: at least 1 with prompts.heldOut (win rates compare these answers)")
    if spec.model.lora is not None and spec.reference == "initial" and spec.rounds > 1:
        out.append("reference: initial needs a full fine-tune: with model.lora each round trains an adapter "
                   "on the previous round's merged model, whose reference is that model (use previous)")
    llm = spec.judge.llm
    if spec.judge.kind == "llm" and llm is not None and not llm.url.startswith(("http://", "https://")):
        out.append(f"judge.llm.url: {llm.url!r} must start with http:// or https:// (the API's base URL, "
                   "e.g. http://judge.ns:8000/v1)")
    uris = {"output": spec.output, "prompts.train": spec.prompts.train, "prompts.heldOut": spec.prompts.held_out,
            "judge.llm.url": llm.url if llm else None, "judge.cacheUri": spec.judge.cache_uri,
            "judge.rewardModel.uri": spec.judge.reward_model.uri if spec.judge.reward_model else None,
            "sft.data.train": spec.sft.data.train if spec.sft else None,
            "sft.data.eval": spec.sft.data.eval if spec.sft else None}
    out += [f"{field}: {CREDENTIALS_MESSAGE}" for field, uri in uris.items() if has_credentials(uri)]
    if spec.model.reference_uri:
        out.append("model.referenceUri: set by the pipeline for each round (see spec.reference); remove it")
    return out


class RoundResult(Schema):
    round: int = Field(..., description="Round number (1-based).")
    prompts: int | None = Field(None, description="Prompts sampled in this round.")
    pairs: int | None = Field(None, description="Preference pairs the judge produced.")
    ties: int | None = Field(None, description="Prompts whose responses the judge could not separate.")
    unparseable: int | None = Field(None, description="Judge answers that could not be parsed (or refusals).")
    inconsistent: int | None = Field(None, description="Pairwise verdicts that changed with the order.")
    reward_accuracy: float | None = Field(None, description="Implicit-reward accuracy of the trained round "
                                          "on (up to 256 of) its own pairs: how well it fit the judge's "
                                          "preferences; the held-out measure is the win rate.")
    win_rate_vs_initial: float | None = Field(
        None, description="Judge's win rate of this round's policy over the initial policy on held-out "
        "prompts (ties count half).")
    win_rate_vs_previous: float | None = Field(None, description="Same, against the previous round's policy.")
    model_uri: str | None = Field(None, description="Where this round's model is.")


class StageProgress(Schema):
    done: int | None = Field(None, description="Units done (steps, prompts or judgements).")
    total: int | None = Field(None, description="Units planned.")
    unit: str | None = Field(None, description="steps, prompts or judgements.")
    eta: str | None = Field(None, description="Estimated time left in this stage.")


class DPOPipelineStatus(Schema):
    phase: PipelinePhase | None = Field(None, description="Pending, Running, Suspended, Succeeded or Failed.")
    stage: Stage | None = Field(None, description="sft, generate, judge, train, evaluate or done.")
    round: int | None = Field(None, description="Current round (0 during SFT).")
    rounds: int | None = Field(None, description="Rounds planned.")
    round_of: str | None = Field(None, description="round/rounds as text, for kubectl get (e.g. 1/2).")
    current_job: str | None = Field(None, description="The DPOJob running the current stage.")
    stage_progress: StageProgress | None = Field(None, description="Progress of the current stage.")
    results: list[RoundResult] | None = Field(None, description="One entry per finished round.")
    output_uri: str | None = Field(None, description="The final policy (set on success).")
    conditions: list[Condition] | None = Field(None, description="Kubernetes-style conditions, one per type.",
                                               json_schema_extra=CONDITIONS_LIST)
    start_time: str | None = Field(None, description="When the first stage was created.")
    completion_time: str | None = Field(None, description="When the pipeline finished.")
    observed_generation: int | None = Field(None, description="metadata.generation last acted upon.")
    message: str | None = Field(None, description="Why the pipeline is in its phase.")


def parse_pipeline_spec(spec: Any) -> DPOPipelineSpec:
    """Validate a DPOPipeline's spec; raise SpecError naming the first offending field."""
    return validate_spec(DPOPipelineSpec, spec)
