"""The training half of the DPOJob spec: the single schema for the CRD, the operator and the trainer.

Field names are camelCase on the wire (Kubernetes style, as in the manifests) and snake_case in
Python. Every field has a description because the CRD generator copies them into the
openAPIV3Schema, which is what `kubectl explain dpojob.spec.training.beta` prints.
Unknown fields are rejected (`extra="forbid"`) so that a typo never silently becomes a default.
"""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .base_schema import Schema
from .errors import ConfigError
from .stage_config import TASKS, GenerateConfig, JudgeConfig, Task
from .uris import ModelUri, StorageUri

__all__ = ["ModelUri", "Schema", "StorageUri"]  # re-exported: every spec model derives from Schema; the
# operator's own URI fields (DPOPipeline) use the same URI types


class LossType(StrEnum):
    """DPO loss variants; each is one pure function in `kubedpo_trainer.losses`."""

    sigmoid = "sigmoid"
    ipo = "ipo"
    hinge = "hinge"
    robust = "robust"
    offset = "offset"
    simpo = "simpo"
    sigmoid_norm = "sigmoid_norm"
    exo_pair = "exo_pair"
    nca_pair = "nca_pair"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"


class LoraConfig(Schema):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r of the adapter matrices.")
    alpha: int = Field(32, gt=0, description="LoRA scaling alpha (an integer, as in peft); the update is scaled by "
                       "alpha/rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt (e.g. q_proj, v_proj). Empty means every linear layer "
        "except the output head ('all-linear').",
    )
    merge_on_export: bool = Field(
        False,
        description="Also write merged full weights to output.uri/merged/ besides the adapter.",
    )


class ModelConfig(Schema):
    uri: ModelUri = Field(
        ...,
        description="Policy model: a Hugging Face save_pretrained folder as s3://bucket/prefix/ or a local "
        "path, or a hub model as hf://org/name (only hf:// reaches the hub: a bare org/name is a local path).",
    )
    reference_uri: ModelUri | None = Field(
        None,
        description="Frozen reference model; defaults to model.uri. Ignored with LoRA, where the "
        "reference is the base model with the adapter disabled (no second copy in memory).",
    )
    tokenizer_uri: ModelUri | None = Field(None, description="Tokenizer folder; defaults to model.uri.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the frozen weights: the reference model and LoRA's base (trained weights "
        "follow training.precision). auto: LoRA's base in bfloat16 under precision bf16-mixed or bf16; "
        "a full fine-tune's reference like the policy's master weights (float32 unless precision is "
        "bf16), so policy and reference agree exactly at step 0. bfloat16 halves the reference's memory.",
    )
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter (peft) instead of all weights.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model folder.")


class DataConfig(Schema):
    train: StorageUri = Field(
        ...,
        description="Training preference rows: an s3:// prefix, a local folder or a single file of "
        "JSONL, JSONL.gz or Parquet shards in TRL's preference formats.",
    )
    eval: StorageUri | None = Field(None, description="Held-out preference rows, same formats as train.")
    format: Literal["auto", "standard", "conversational", "implicit"] = Field(
        "auto",
        description="Row format. standard: {prompt, chosen, rejected} strings; conversational: "
        "message lists rendered with the tokenizer's chat template; implicit: {chosen, rejected} "
        "sharing a prompt prefix. auto: decided per row.",
    )
    max_length: int = Field(1024, ge=8, description="Maximum tokens of prompt + response per sequence.")
    max_prompt_length: int | None = Field(
        512, ge=1, description="Maximum prompt tokens; longer prompts are truncated (and counted)."
    )
    truncation_side: Literal["left", "right"] = Field(
        "left",
        description="Which end of a too-long prompt is dropped. left keeps the end of the prompt, "
        "next to the response (TRL's keep_end). Responses are always cut at the right.",
    )
    shuffle_buffer: int = Field(
        1000, ge=1, description="Rows of the window shuffled together after the block shuffle (the "
        "global order's fine shuffle; only its permutation is held in memory)."
    )
    block_rows: int = Field(
        256, ge=1, description="Rows per block of the global order's coarse shuffle (blocks of "
        "consecutive rows of one shard are permuted each epoch)."
    )
    seed: int = Field(42, description="Seed of the block permutation and the window shuffle.")
    index_uri: StorageUri | None = Field(
        None, description="Prefix of the shard index (rows and row offsets, built once per data "
        "version). Default: <checkpoint.uri>/data-index/, or a node-local cache without a checkpoint URI."
    )
    on_data_change: Literal["fail", "newEpoch"] = Field(
        "fail", description="A shard changed (new ETag or size), added or removed since the checkpoint: "
        "fail (exit 2 naming it) or newEpoch (start the next epoch on the new data, logged)."
    )
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail",
        description="fail: stop with an error naming file and line; skip: drop the row and count it "
        "in kubedpo_bad_records_total.",
    )
    eval_max_rows: int | None = Field(None, ge=1, description="Evaluate on at most this many eval rows.")


class BetaSchedule(Schema):
    kind: Literal["linear", "cosine"] = Field("linear", description="Shape of the beta schedule.")
    final: float = Field(..., gt=0, description="Beta at the last step; training.beta is the start value.")


class PackingConfig(Schema):
    max_tokens: int = Field(
        4096, ge=16,
        description="Token budget of one micro-batch: an optimizer step's pairs (batchSize x "
        "gradientAccumulationSteps per rank) are split into as many micro-batches as this needs.",
    )
    share_prompt: bool = Field(
        True,
        description="Put each prompt in once and let chosen and rejected both attend to it "
        "(prefix sharing): the prompt's compute is paid once per pair. Same results.",
    )
    row_tokens: int | None = Field(
        None, ge=16,
        description="Length of one packed row (sequences never straddle rows). Default: the whole "
        "micro-batch in one row without padding where attention runs pair by pair (an sdpa model on "
        "CPU), else data.maxLength (a dense mask costs row length squared per row).",
    )


class DistributedConfig(Schema):
    """How ranks share the model. Activation checkpointing is training.gradientCheckpointing (both)."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every rank holds the whole model, gradients are all-reduced (fits while weights, "
        "grads and AdamW state fit one GPU: about 16 bytes a parameter). fsdp: FSDP2 shards parameters, "
        "gradients and optimizer state (and the reference model) over all ranks. An accelerate config "
        "(accelerate launch --config_file, ACCELERATE_USE_FSDP) still turns FSDP on for power users.",
    )
    reshard_after_forward: bool = Field(
        True,
        description="fsdp: free the gathered layer weights after forward and gather again for backward "
        "(less memory, one more all-gather per layer). false keeps them until backward (ZeRO-2-like).",
    )
    cpu_offload: bool = Field(
        False,
        description="fsdp: keep parameter shards, gradients and optimizer state in host memory and step "
        "AdamW on the CPU (FSDP2's CPUOffloadPolicy); slower, frees most GPU memory.",
    )
    memory_efficient_loading: bool = Field(
        True,
        description="fsdp: only local rank 0 of each node reads the weights; the others start on the meta "
        "device and receive their shards by broadcast from rank 0 (at most one full copy per node).",
    )

    @model_validator(mode="after")
    def _fsdp_only(self) -> DistributedConfig:
        if self.strategy != "fsdp" and self.cpu_offload:
            raise ValueError("cpuOffload: needs strategy fsdp")
        return self


class TrainingConfig(Schema):
    loss: LossType = Field(
        LossType.sigmoid,
        description="sigmoid (DPO; conservative DPO with labelSmoothing), ipo, hinge (SLiC), robust "
        "(rDPO, uses labelSmoothing), offset (ODPO, per-row margin), simpo (reference-free, "
        "length-normalised), and TRL's sigmoid_norm, exo_pair (needs labelSmoothing > 0), nca_pair, "
        "bco_pair, sppo_hard, apo_zero, apo_down, discopop (uses discopopTau).",
    )
    beta: float = Field(0.1, gt=0, description="Strength of the KL constraint to the reference.")
    beta_schedule: BetaSchedule | None = Field(None, description="Anneal beta from training.beta.")
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Probability that a pair's label is flipped (sigmoid, robust, simpo); the target "
        "distribution's epsilon for exo_pair.",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin gamma.")
    offset_alpha: float = Field(1.0, ge=0, description="ODPO: scale of the per-row margin.")
    discopop_tau: float = Field(
        0.05, gt=0, description="DiscoPOP temperature of the logistic/exponential mix (paper default 0.05)."
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data: Any) -> Any:
        """Old manifests name the removed field; say what replaced it instead of 'extra input'."""
        if isinstance(data, dict) and ("mixedPrecision" in data or "mixed_precision" in data):
            raise ValueError("mixedPrecision: replaced by training.precision (bf16-mixed, fp32 or bf16); "
                             "bf16-mixed keeps fp32 master weights under bf16 autocast")
        return data

    @field_validator("label_smoothing")
    @classmethod
    def _exo_needs_smoothing(cls, v: float, info: ValidationInfo) -> float:
        """exo_pair takes log(labelSmoothing): 0 would make every loss infinite at the first step."""
        if info.data.get("loss") == LossType.exo_pair.value and v <= 0:
            raise ValueError("must be > 0 with loss exo_pair (e.g. 0.001)")
        return v
    learning_rate: float = Field(5e-7, gt=0, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Decay after warmup."
    )
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables.")
    batch_size: int = Field(4, ge=1, description="Preference pairs per device per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the training data; ignored when maxSteps is set.")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Train exactly this many optimizer steps, overriding epochs (as TRL's max_steps): the "
        "data stream starts another epoch whenever one ends before maxSteps.",
    )
    seed: int = Field(42, description="Seed of model init of new parameters, dropout and sampling.")
    precision: Literal["auto", "bf16-mixed", "fp32", "bf16"] = Field(
        "auto",
        description="bf16-mixed: trained weights and AdamW state in float32, forward/backward under "
        "bfloat16 autocast (FSDP2: param_dtype bf16, reduce_dtype fp32). fp32: no autocast. bf16: "
        "weights and optimizer state in bfloat16; updates below bf16's resolution (most at DPO "
        "learning rates) are lost, so it warns. auto: bf16-mixed on GPUs with bfloat16, fp32 on CPU.",
    )
    disable_dropout: bool = Field(
        True,
        description="Zero the model's own dropout (dropout layers and attention dropout) in policy and "
        "reference, as TRL does: DPO compares the policy with the reference on the same tokens, and "
        "dropout noise would bias that comparison. model.lora.dropout still applies to the adapter.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Activation checkpointing: recompute each decoder layer's activations in backward "
        "instead of keeping them (about a third more compute, activations cut to one layer's). Under "
        "distributed.strategy fsdp it is applied per layer by FSDP2.",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Data parallelism across ranks: DDP or FSDP2."
    )
    reference_logps: Literal["live", "precompute"] = Field(
        "live",
        description="live: reference forward every step; precompute: one pass before training "
        "(reference model then freed).",
    )
    reference_cache_uri: StorageUri | None = Field(
        None,
        description="With referenceLogps precompute: where precomputed reference log-probs are kept "
        "(s3:// or local), keyed by reference model, tokenizer, data shard versions and truncation, "
        "written as they are computed, so a restarted attempt, a later epoch or the next iterative "
        "round with the same reference reuses them. Default: <checkpoint.uri>/reference-cache/ "
        "(none without checkpoint.uri: the table then lives in memory for one attempt).",
    )
    packing: PackingConfig | None = Field(
        None,
        description="Padding-free packing: pairs packed into rows with a block-sparse attention "
        "mask under a token budget per micro-batch (same loss and gradients as padded batches). "
        "Unset: padded batches of batchSize pairs.",
    )
    logging_steps: int = Field(10, ge=1, description="Log and export metrics every N steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (and at the end).")
    eval_on_start: bool = Field(False, description="Also evaluate before the first step (the baseline).")


CHECKPOINT_STEP_PREFIX = "step-"


def checkpoint_step_name(step: int) -> str:
    """`step-000500`: one checkpoint's folder under `checkpoint.uri`.

    The rest of the layout is `checkpoint.py`'s; the step name lives here because the operator,
    which may import only config and errors, reports it in status.lastCheckpoint.
    """
    return f"{CHECKPOINT_STEP_PREFIX}{step:06d}"


class CheckpointConfig(Schema):
    uri: StorageUri | None = Field(None, description="Checkpoints go to <uri>/step-<n>/ (s3:// or local).")
    every_steps: int | None = Field(None, ge=1, description="Checkpoint every N optimizer steps.")
    every_minutes: float | None = Field(None, gt=0, description="Checkpoint at least this often.")
    keep_last: int = Field(3, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    preemption_grace_seconds: float = Field(
        25.0, gt=0, le=3600, description="Budget after SIGTERM to finish the step and write a checkpoint."
    )


class OutputConfig(Schema):
    uri: StorageUri = Field(..., description="Final model, tokenizer and kubedpo_summary.json.")


class S3Config(Schema):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, SeaweedFS).")
    region: str | None = Field(None, description="S3 region.")
    max_attempts: int = Field(8, ge=1, description="Attempts per S3 request (botocore standard mode).")


class MetricsConfig(Schema):
    port: int = Field(9400, ge=0, le=65535, description="Prometheus port on rank 0; 0 disables.")


class TrainerConfig(Schema):
    """Everything `kubedpo-trainer --config FILE` needs; the operator writes it into a ConfigMap."""

    task: Task = Field(
        "dpo",
        description=f"What the pods run: {', '.join(TASKS)}. dpo trains on preference pairs (a plain "
        "DPOJob); sft, generate and judge are the stages a DPOPipeline runs as DPOJobs: sft trains "
        "next-token cross-entropy on the responses (prompt tokens masked), generate samples responses "
        "to data.train's prompts into output.uri, judge ranks them into preference pairs.",
    )
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    output: OutputConfig
    s3: S3Config = Field(default_factory=S3Config)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    generate: GenerateConfig | None = Field(None, description="Sampling settings of task generate.")
    judge: JudgeConfig | None = Field(None, description="Judge settings of task judge.")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> TrainerConfig:
        if self.task == "generate" and self.generate is None:
            raise ValueError("generate: required with task generate")
        if self.task == "judge" and self.judge is None:
            raise ValueError("judge: required with task judge")
        t = self.training
        if self.task == "generate" and self.model.lora is not None:
            raise ValueError("model.lora: task generate samples from full weights; point model.uri at the "
                             "merged model (lora.mergeOnExport writes <output>/merged/)")
        if self.task == "sft" and t.packing is not None:
            raise ValueError("training.packing: not supported with task sft (DPO pair packing); remove it")
        if self.task == "sft" and t.reference_logps == "precompute":
            raise ValueError("training.referenceLogps: task sft has no reference model; remove precompute")
        if t.loss == LossType.simpo.value and self.model.reference_uri:
            raise ValueError("training.loss: simpo is reference-free; remove model.referenceUri")
        if t.reference_logps == "precompute" and t.loss == LossType.simpo.value:
            raise ValueError("training.referenceLogps: precompute makes no sense with simpo")
        c = self.checkpoint
        if (c.every_steps or c.every_minutes) and not c.uri:
            raise ValueError("checkpoint.uri: required when checkpoint.everySteps/everyMinutes is set")
        return self


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line per problem, each naming the camelCase field path, e.g. `training.beta: ...`."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config") -> TrainerConfig:
    """Validate a dict (as in a manifest) and raise ConfigError naming the field on failure."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path) -> TrainerConfig:
    """Read YAML or JSON (JSON is YAML, but JSON errors read better from json)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read config: {err.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {err}") from None
    return parse_config(data, source=str(p))


# --- log format: the launcher (ours or `kubedpo run`) and every rank agree through the env ---
# Here rather than in console.py so that the operator's local runner, which may import only
# config and errors, names the same variable and resolves "auto" the same way.

LOG_FORMATS = ("auto", "json", "rich")
LOG_FORMAT_ENV = "KUBEDPO_LOG_FORMAT"


def resolve_log_format(choice: str | None = None, stream: IO[str] | None = None) -> str:
    """'json' or 'rich' from a flag, else the env variable, else 'auto' (rich on a terminal)."""
    value = (choice or os.environ.get(LOG_FORMAT_ENV) or "auto").strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"{LOG_FORMAT_ENV} / --log-format: {value!r} is not one of {', '.join(LOG_FORMATS)}")
    if value != "auto":
        return value
    stream = stream or sys.stdout
    return "rich" if _isatty(stream) and os.environ.get("TERM") != "dumb" else "json"


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False
