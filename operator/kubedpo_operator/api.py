"""The DPOJob resource: spec = the trainer's config sections + cluster fields, and the status.

`DPOJobSpec` subclasses the trainer's `TrainerConfig`, so the training half of the schema (and its
cross-field rules) has exactly one definition, shared by the CRD generator, the operator's
validation and the trainer's config loader. Kubernetes-native sub-objects (env, resources,
tolerations, affinity) are typed loosely: the API server and kubelet validate them, and copying
the whole core/v1 schema into our CRD would only make it stale.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, ValidationError, model_validator

from kubedpo_trainer.config import Schema, TrainerConfig, format_validation_error

GROUP = "kubedpo.io"
VERSION = "v1alpha1"
KIND = "DPOJob"
PLURAL = "dpojobs"
SINGULAR = "dpojob"
SHORT_NAME = "dpoj"
API_VERSION = f"{GROUP}/{VERSION}"

# Fields of DPOJobSpec that are the trainer's config; the rest are cluster fields.
TRAINER_SECTIONS = tuple(TrainerConfig.model_fields)

Phase = Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
PHASES: tuple[Phase, ...] = get_args(Phase)
FINISHED_PHASES = ("Succeeded", "Failed")
MAX_NAME = 52  # 63 (DNS label) - len("-<attempt up to 3 digits>-<index up to 5>")


class SpecError(ValueError):
    """A DPOJob spec that the CRD schema accepted but the operator cannot run; names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RunPolicy(Schema):
    max_restarts: int = Field(
        3, ge=0, description="Gang restarts after a failed attempt (preemptions and disruptions are free)."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job when it has run this long in total (all attempts)."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the DPOJob (and its children) this long after it finished."
    )
    suspend: bool = Field(False, description="Suspend the running attempt (pods are deleted); false resumes.")
    queue_name: str | None = Field(
        None,
        description="Kueue LocalQueue: the Job is labelled kueue.x-k8s.io/queue-name and created "
        "suspended, so Kueue admits the whole gang at once.",
    )


class DPOJobSpec(TrainerConfig):
    """What a user writes under `spec:`: the training run plus where and how to run it."""

    workers: int = Field(1, ge=1, le=1024, description="Pods in the gang (torch.distributed nodes).")
    gpus_per_worker: int = Field(
        0, ge=0, le=64, description="nvidia.com/gpu per pod; also the trainer processes per pod (min 1)."
    )
    resources: dict[str, Any] | None = Field(
        None, description="Container resources (requests/limits) of each worker, as in a Pod."
    )
    image: str | None = Field(None, description="Trainer image; defaults to the operator's configured image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Pull policy of the trainer image."
    )
    node_selector: dict[str, str] | None = Field(None, description="Node labels the workers must match.")
    tolerations: list[dict[str, Any]] | None = Field(None, description="Pod tolerations of each worker.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity of each worker.")
    priority_class_name: str | None = Field(None, description="PriorityClass of the worker pods.")
    service_account_name: str | None = Field(
        None, description="ServiceAccount of the workers (e.g. for cloud identity to S3)."
    )
    env: list[dict[str, Any]] | None = Field(
        None, description="Extra container env (e.g. AWS_* from secretKeyRef); never copied to config or status."
    )
    env_from: list[dict[str, Any]] | None = Field(
        None, description="Container envFrom (e.g. a Secret with S3 credentials)."
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Restarts, deadlines, queueing.")

    @model_validator(mode="after")
    def _cluster_rules(self) -> DPOJobSpec:
        limits = (self.resources or {}).get("limits") or {}
        gpu = limits.get("nvidia.com/gpu")
        if gpu is not None and str(gpu) != str(self.gpus_per_worker):
            raise ValueError(
                "resources.limits: nvidia.com/gpu must be omitted or equal gpusPerWorker "
                f"({gpu} != {self.gpus_per_worker})"
            )
        for i, e in enumerate(self.env or []):
            if not isinstance(e.get("name"), str) or not e["name"]:
                raise ValueError(f"env[{i}].name: required")
        return self

    def trainer_config(self) -> TrainerConfig:
        """The resolved TrainerConfig (what goes into the ConfigMap): no cluster fields, no env."""
        return TrainerConfig.model_validate(self.model_dump(include=set(TRAINER_SECTIONS)))


def parse_spec(spec: Any) -> DPOJobSpec:
    """Validate a manifest's spec; raise SpecError naming the first offending field."""
    if not isinstance(spec, dict):
        raise SpecError("spec", "expected a mapping")
    try:
        return DPOJobSpec.model_validate(spec)
    except ValidationError as err:
        # "spec: training.beta: msg"; model validators report "<root>" and put the field first.
        first = format_validation_error(err, source="spec").splitlines()[0]
        _, field, msg = (first.split(": ", 2) + ["", ""])[:3]
        if field == "<root>" and ": " in msg:
            field, msg = msg.split(": ", 1)
        field = "spec" if field == "<root>" else f"spec.{field}"
        raise SpecError(field, msg) from None


def check_name(name: str) -> None:
    """Pod hostnames are `<name>-<attempt>-<index>` and must stay a 63-character DNS label."""
    if len(name) > MAX_NAME:
        raise SpecError("metadata.name", f"at most {MAX_NAME} characters (pod hostnames derive from it)")


# --- status -----------------------------------------------------------------------------------


class Condition(Schema):
    type: str = Field(..., description="Condition type, e.g. Running, Succeeded, Failed.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason of the last transition.")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")


class Progress(Schema):
    step: int | None = Field(None, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps planned.")
    epoch: float | None = Field(None, description="Fractional epoch.")
    loss: float | None = Field(None, description="Last logged DPO loss.")
    reward_accuracy: float | None = Field(None, description="Fraction of pairs with chosen reward > rejected.")
    reward_margin: float | None = Field(None, description="Mean chosen - rejected reward.")
    tokens_per_second: float | None = Field(None, description="Training throughput of the gang.")
    eta: str | None = Field(None, description="Estimated time left, e.g. 1h02m.")
    updated_at: str | None = Field(None, description="When these numbers were read from rank 0.")


class CheckpointRef(Schema):
    uri: str | None = Field(None, description="Where the newest complete checkpoint is.")
    step: int | None = Field(None, description="Its optimizer step.")


class DPOJobStatus(Schema):
    phase: Phase | None = Field(None, description="Pending, Running, Restarting, Suspended, "
                                           "Succeeded or Failed.")
    conditions: list[Condition] | None = Field(None, description="Kubernetes-style conditions.")
    attempt: int | None = Field(None, description="Index of the current gang attempt (0-based).")
    restarts: int | None = Field(None, description="Gang restarts counted against runPolicy.maxRestarts.")
    preemptions: int | None = Field(None, description="Restarts after preemption (not counted).")
    start_time: str | None = Field(None, description="When the first attempt was created.")
    completion_time: str | None = Field(None, description="When the job finished.")
    progress: Progress | None = Field(None, description="Training progress read from rank 0's metrics.")
    last_checkpoint: CheckpointRef | None = Field(None, description="Newest checkpoint reported by rank 0.")
    output_uri: str | None = Field(None, description="Where the final model is (set on success).")
    observed_generation: int | None = Field(None, description="metadata.generation last acted upon.")
    message: str | None = Field(None, description="Why the job is in its phase.")
