"""The non-DPO tasks a trainer pod can run: SFT, generate and judge (iterative DPO's stages).

A DPOPipeline runs each stage as an ordinary DPOJob whose `task` says which one, so every stage
gets the same admission checks, gang restarts, checkpoints, metrics and kubectl view as
training. A plain DPOJob leaves `task` at `dpo` and is exactly what it was. The sections here
are part of the one schema (CRD, operator and trainer), so they stay pure: no ML libraries.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base_schema import Schema
from .uris import ModelUri, StorageUri, StorageUriItem

Task = Literal["dpo", "sft", "generate", "judge"]
TASKS: tuple[Task, ...] = ("dpo", "sft", "generate", "judge")

# Where each task writes under output.uri (docs/iterative-dpo.md "Storage layout").
GENERATIONS_TRAIN = "train/"       # generate: K samples per training prompt
GENERATIONS_HELDOUT = "heldout/"   # generate: heldOutSamples per held-out prompt
JUDGE_PAIRS = "pairs/"             # judge: preference rows {prompt, chosen, rejected, margin, id}
JUDGE_RATIONALES = "rationales/"   # judge: {id, chosen, rejected, scores, rationale} beside them
JUDGE_SUMMARY = "kubedpo_judge_summary.json"
GENERATE_SUMMARY = "kubedpo_generate_summary.json"
# Rank 0 writes its task's result (a small JSON object) here; the operator copies it from the
# pod's termination message into the DPOJob's status.result (the pipeline reads it from there).
RESULT_FILE_ENV = "KUBEDPO_RESULT_FILE"
RESULT_MAX_BYTES = 4096  # Kubernetes truncates a termination message at 4096 bytes


class GenerateConfig(Schema):
    """Sampling from the current policy (task generate). data.train holds the prompts."""

    samples_per_prompt: int = Field(4, ge=1, le=64, description="K responses sampled per training prompt.")
    held_out_samples: int = Field(
        1, ge=0, le=64, description="Responses per held-out prompt (data.eval), used to measure win rates.")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Longest response, in tokens.")
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens "
                         "whose probability reaches topP.")
    top_k: int = Field(0, ge=0, description="Keep only the topK most likely tokens; 0 disables.")
    held_out_temperature: float | None = Field(
        None, ge=0, le=10, description="Temperature of the held-out responses; default: temperature.")
    batch_size: int = Field(8, ge=1, le=4096, description="Prompts per generate call on one rank "
                            "(left-padded, with a KV cache).")
    prompts_per_shard: int = Field(
        256, ge=1, description="Prompts per output shard: the unit of work, of resume (a finished shard "
        "is never recomputed) and of sharding across ranks.")
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many training prompts.")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: model.generate (works with every trainer image). vllm: "
        "reserved for a faster engine; refused with a clear error (exit 2) in this build, whether or not "
        "the image has vllm (no tested vLLM path yet).")
    seed: int = Field(0, description="Sampling seed: unit u (the u-th output shard of promptsPerShard "
                      "prompts) samples with seed + u (held-out units: seed + 2^20 + u), so the samples do not "
                      "depend on the number of ranks or on restarts.")


class SecretKeyRef(Schema):
    name: str = Field(..., min_length=1, max_length=253, description="Secret in the job's namespace.")
    key: str = Field(..., min_length=1, max_length=253, description="Key of the Secret holding the value.")


class LLMJudgeConfig(Schema):
    """An LLM behind an OpenAI-compatible chat-completions endpoint."""

    url: str = Field(..., min_length=1, description="Base URL of the API, e.g. http://judge.ns:8000/v1 "
                     "(the client POSTs to <url>/chat/completions).")
    model: str = Field(..., min_length=1, description="Model name sent in each request.")
    api_key_secret: SecretKeyRef | None = Field(
        None, description="Secret key holding the API key; it reaches the pod as an env variable from a "
        "secretKeyRef, never through the config, status or logs.")
    mode: Literal["pairwise", "pointwise"] = Field(
        "pairwise", description="pairwise: the judge picks the better of two responses (every pair of the "
        "K); pointwise: the judge scores each response on its own (K requests per prompt).")
    template: str | None = Field(
        None, description="Prompt template. pairwise: {prompt}, {response_a}, {response_b}; the answer must "
        "end with [[A]], [[B]] or [[tie]]. pointwise: {prompt}, {response}; the answer must contain "
        "[[score]] with score 1-10. Default: kubedpo's templates (docs/iterative-dpo.md).")
    system_prompt: str | None = Field(None, description="System message sent before the template.")
    both_orders: bool = Field(
        True, description="pairwise: ask in both orders and keep only verdicts that agree (position-bias "
        "control); disagreements are counted as inconsistent, never turned into pairs.")
    temperature: float = Field(0.0, ge=0, le=2, description="Judge sampling temperature.")
    max_tokens: int = Field(512, ge=1, le=32768, description="Longest judge answer.")
    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight per rank.")
    timeout_seconds: float = Field(60.0, gt=0, le=3600, description="Per-request timeout.")
    max_retries: int = Field(
        6, ge=0, le=100, description="Retries of one request on 429, 5xx, timeouts and connection errors "
        "(exponential backoff, honouring Retry-After). A request still failing then fails the stage.")


class RewardModelJudgeConfig(Schema):
    """A sequence-classification model (one logit) scoring each response on the workers."""

    uri: ModelUri = Field(..., description="Reward model folder (save_pretrained of an "
                     "AutoModelForSequenceClassification with num_labels=1): s3://, local path or hf://org/name.")
    batch_size: int = Field(16, ge=1, le=4096, description="Responses scored per forward pass.")
    max_length: int = Field(2048, ge=8, description="Tokens of prompt + response scored; longer are cut "
                            "at the left of the prompt (counted).")


class PairsConfig(Schema):
    strategy: Literal["bestVsWorst", "allAboveMargin"] = Field(
        "bestVsWorst", description="bestVsWorst: one pair per prompt, the highest against the lowest score; "
        "allAboveMargin: every pair of responses whose scores differ by more than minMargin.")
    min_margin: float = Field(
        0.0, ge=0, description="Minimum score difference for a pair. Equal scores (ties) never make a pair.")


class JudgeConfig(Schema):
    """Ranking the generated responses (task judge) and measuring win rates."""

    kind: Literal["llm", "rewardModel"] = Field(..., description="llm or rewardModel.")
    llm: LLMJudgeConfig | None = Field(None, description="Required with kind llm.")
    reward_model: RewardModelJudgeConfig | None = Field(None, description="Required with kind rewardModel.")
    generations: StorageUri | None = Field(
        None, description="Prefix written by a generate task (its output.uri); its train/ responses are "
        "ranked into pairs.")
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="How scores become preference pairs.")
    compare: dict[str, list[StorageUriItem]] | None = Field(
        None, description="Win rates to measure: name -> [candidate prefix, baseline prefix], each a "
        "generate task's output.uri; their held-out responses for the same prompts are judged pairwise "
        "(both orders) and the candidate's win rate is reported under the name.")
    cache_uri: StorageUri | None = Field(
        None, description="Where judgements are cached (s3:// or local), keyed by prompt, responses and "
        "judge config, so a restarted or repeated stage never pays twice. Default: <output.uri>/judge-cache/.")

    @model_validator(mode="after")
    def _kind_section(self) -> JudgeConfig:
        if self.kind == "llm" and self.llm is None:
            raise ValueError("llm: required with kind llm")
        if self.kind == "rewardModel" and self.reward_model is None:
            raise ValueError("rewardModel: required with kind rewardModel")
        if not self.generations and not self.compare:
            raise ValueError("generations: a judge task needs generations to rank or compare pairs to judge")
        return self
