"""The DPOJob resource: spec = the trainer's config sections + cluster fields, and the status.

`DPOJobSpec` subclasses the trainer's `TrainerConfig`, so the training half of the schema (and its
cross-field rules) has exactly one definition, shared by the CRD generator, the operator's
validation and the trainer's config loader. Kubernetes-native sub-objects (env, resources,
tolerations, affinity, volumes...) are dicts here, marked with the core/v1 definition they are
(`_core`): the CRD generator embeds Kubernetes' own schema for them, and `spec_rules` checks them
against that schema plus the API server's semantic rules, so a spec the operator accepts yields
children the API server accepts.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar, get_args

from pydantic import Field, ValidationError, model_validator

from kubedpo_trainer.config import Schema, TrainerConfig, format_validation_error

from . import spec_rules
from .conditions import MESSAGE_MAX, REASON_MAX, REASON_PATTERN, TYPE_MAX, TYPE_PATTERN
from .k8s_openapi import CORE
from .k8s_rules import DNS1035_LABEL, INT32_MAX

SpecT = TypeVar("SpecT", bound=Schema)

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
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"


def _core(definition: str, many: bool = False) -> dict[str, Any]:
    """Field marker: the CRD generator embeds core/v1's schema of `definition` (a list of them if many)."""
    return {"x-kubedpo-core": CORE + definition, **({"x-kubedpo-many": True} if many else {})}


class SpecError(ValueError):
    """A DPOJob spec that the CRD schema accepted but the operator cannot run; names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RunPolicy(Schema):
    max_restarts: int = Field(
        3, ge=0, le=1000, description="Gang restarts after a failed attempt (preemptions and disruptions are free)."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=INT32_MAX, description="Fail the job when it has run this long in total (all attempts)."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=INT32_MAX, description="Delete the DPOJob (and its children) this long after it finished."
    )
    suspend: bool = Field(False, description="Suspend the running attempt (pods are deleted); false resumes.")
    queue_name: str | None = Field(
        None,
        max_length=63,
        pattern=LABEL_VALUE_PATTERN,
        description="Kueue LocalQueue: the Job is labelled kueue.x-k8s.io/queue-name and created "
        "suspended, so Kueue admits the whole gang at once.",
    )


class PodOverrides(Schema):
    labels: dict[str, str] | None = Field(
        None, description="Extra labels of the worker pods (e.g. Kueue topology, cost centre); "
        "kubedpo.io/ and app.kubernetes.io/ keys are the operator's.")
    annotations: dict[str, str] | None = Field(None, description="Extra annotations of the worker pods.")
    volumes: list[dict[str, Any]] | None = Field(
        None, max_length=64, json_schema_extra=_core("Volume", many=True),
        description="Extra pod volumes (e.g. a model-cache PVC). hostPath only where the operator's "
        "settings allow its path.")
    volume_mounts: list[dict[str, Any]] | None = Field(
        None, max_length=64, json_schema_extra=_core("VolumeMount", many=True),
        description="Mounts of those volumes into the trainer container.")
    image_pull_secrets: list[dict[str, Any]] | None = Field(
        None, max_length=16, json_schema_extra=_core("LocalObjectReference", many=True),
        description="Secrets to pull a private trainer image.")
    add_capabilities: list[str] | None = Field(
        None, max_length=16, description="Linux capabilities added to the trainer (e.g. IPC_LOCK for RDMA); "
        "only those the operator's settings allow.")


class ClusterFields(Schema):
    """Where and how the pods run: shared by DPOJob and DPOPipeline (whose stages are DPOJobs)."""

    workers: int = Field(1, ge=1, le=1024, description="Pods in the gang (torch.distributed nodes).")
    gpus_per_worker: int = Field(
        0, ge=0, le=64, description="nvidia.com/gpu per pod; also the trainer processes per pod (min 1)."
    )
    resources: dict[str, Any] | None = Field(
        None, json_schema_extra=_core("ResourceRequirements"),
        description="Container resources (requests/limits) of each worker, as in a Pod; extended "
        "resources such as rdma/hca go here too.",
    )
    image: str | None = Field(None, description="Trainer image; defaults to the operator's configured image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Pull policy of the trainer image."
    )
    node_selector: dict[str, str] | None = Field(None, description="Node labels the workers must match.")
    tolerations: list[dict[str, Any]] | None = Field(
        None, json_schema_extra=_core("Toleration", many=True), description="Pod tolerations of each worker.")
    affinity: dict[str, Any] | None = Field(
        None, json_schema_extra=_core("Affinity"), description="Pod affinity of each worker.")
    priority_class_name: str | None = Field(None, description="PriorityClass of the worker pods.")
    service_account_name: str | None = Field(
        None, description="ServiceAccount of the workers (e.g. for cloud identity to S3)."
    )
    env: list[dict[str, Any]] | None = Field(
        None, max_length=256, json_schema_extra=_core("EnvVar", many=True),
        description="Extra container env (e.g. AWS_* from secretKeyRef); never copied to config or status. "
        f"Reserved: {', '.join(spec_rules.RESERVED_ENV)} and KUBEDPO_*.",
    )
    env_from: list[dict[str, Any]] | None = Field(
        None, max_length=64, json_schema_extra=_core("EnvFromSource", many=True),
        description="Container envFrom (e.g. a Secret with S3 credentials).",
    )
    pod: PodOverrides | None = Field(
        None, description="Extra pod settings real GPU clusters need (labels, volumes, pull secrets, "
        "capabilities), each checked like the rest.",
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Restarts, deadlines, queueing.")

    @model_validator(mode="after")
    def _cluster_rules(self) -> ClusterFields:
        problems = spec_rules.spec_problems(self)
        if problems:
            field, message = problems[0]
            raise ValueError(f"{field}: {message}")
        return self


# The trainer's sections first, then the cluster fields (the CRD lists properties in this order).
CLUSTER_FIELDS = tuple(ClusterFields.model_fields)


class DPOJobSpec(ClusterFields, TrainerConfig):
    """What a user writes under `spec:`: the training run plus where and how to run it."""

    def trainer_config(self) -> TrainerConfig:
        """The resolved TrainerConfig (what goes into the ConfigMap): no cluster fields, no env."""
        return TrainerConfig.model_validate(self.model_dump(include=set(TRAINER_SECTIONS)))


def parse_spec(spec: Any) -> DPOJobSpec:
    """Validate a manifest's spec; raise SpecError naming the first offending field."""
    return validate_spec(DPOJobSpec, spec)


def validate_spec(model: type[SpecT], spec: Any) -> SpecT:
    """`model.model_validate(spec)`, with the first error as a SpecError naming its field."""
    if not isinstance(spec, dict):
        raise SpecError("spec", "expected a mapping")
    try:
        return model.model_validate(spec)
    except ValidationError as err:
        # "spec: training.beta: msg"; model validators report "<root>" and put the field first.
        first = format_validation_error(err, source="spec").splitlines()[0]
        _, field, msg = (first.split(": ", 2) + ["", ""])[:3]
        if field == "<root>" and ": " in msg:
            field, msg = msg.split(": ", 1)
        field = "spec" if field == "<root>" else field if field.startswith("spec") else f"spec.{field}"
        raise SpecError(field, msg) from None


def check_name(name: Any) -> None:
    """The Service is `<name>-<attempt>` and pod hostnames `<name>-<attempt>-<index>`: DNS-1035 labels."""
    if not isinstance(name, str) or not DNS1035_LABEL.match(name):
        raise SpecError("metadata.name", f"{name!r} must be a DNS-1035 label (lower-case letters, digits "
                        "and '-', starting with a letter): it names the Service and the pods' hostnames")
    if len(name) > MAX_NAME:
        raise SpecError("metadata.name", f"at most {MAX_NAME} characters (pod hostnames derive from it)")


# --- status -----------------------------------------------------------------------------------


class Condition(Schema):
    """metav1.Condition (the Kubernetes API conventions; conditions.py writes them)."""

    type: str = Field(..., max_length=TYPE_MAX, pattern=TYPE_PATTERN,
                      description="Condition type (at most one condition per type), e.g. Running or Failed.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., min_length=1, max_length=REASON_MAX, pattern=REASON_PATTERN,
                        description="CamelCase reason for the condition's current status (for a False "
                        "state condition: the current phase's reason, e.g. Suspended or WorkerFailed).")
    message: str = Field(..., max_length=MESSAGE_MAX, description="Human-readable details (may be empty).")
    last_transition_time: str = Field(..., description="When status last changed (RFC 3339).",
                                      json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation this condition was "
                                            "computed from; older than metadata.generation means out of date.")


# The API server keeps the list keyed by type (a second condition of one type is refused), and
# server-side apply merges it by type (metav1.Condition's +listType=map +listMapKey=type).
CONDITIONS_LIST: dict[str, Any] = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class Progress(Schema):
    step: int | None = Field(None, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps planned.")
    epoch: float | None = Field(None, description="Fractional epoch.")
    loss: float | None = Field(None, description="Last logged DPO loss.")
    reward_accuracy: float | None = Field(None, description="Fraction of pairs with chosen reward > rejected.")
    reward_margin: float | None = Field(None, description="Mean chosen - rejected reward.")
    tokens_per_second: float | None = Field(
        None, description="Non-padding tokens per second processed by the whole job (all ranks) since the "
        "current attempt started; rank 0 sums the ranks' counts at each logging step.")
    eta: str | None = Field(None, description="Estimated time left, e.g. 1h02m.")
    updated_at: str | None = Field(None, description="When these numbers were read from rank 0.")


class CheckpointRef(Schema):
    uri: str | None = Field(None, description="Where the newest complete checkpoint is.")
    step: int | None = Field(None, description="Its optimizer step.")


class DPOJobStatus(Schema):
    phase: Phase | None = Field(None, description="Pending, Running, Restarting, Suspended, "
                                           "Succeeded or Failed.")
    conditions: list[Condition] | None = Field(
        None, json_schema_extra=CONDITIONS_LIST,
        description="Kubernetes-style conditions, one per type. Created, Running, Suspended, Succeeded and "
        "Failed are always present (the False ones carry the current phase's reason and message); "
        "ProgressAvailable, Retrying, MemoryPlan and ResultAvailable appear when they apply.")
    attempt: int | None = Field(None, description="Index of the current gang attempt (0-based).")
    restarts: int | None = Field(None, description="Gang restarts counted against runPolicy.maxRestarts.")
    preemptions: int | None = Field(None, description="Restarts after preemption (not counted).")
    start_time: str | None = Field(None, description="When the first attempt was created.")
    completion_time: str | None = Field(None, description="When the job finished.")
    progress: Progress | None = Field(None, description="Training progress read from rank 0's metrics.")
    last_checkpoint: CheckpointRef | None = Field(None, description="Newest checkpoint reported by rank 0.")
    output_uri: str | None = Field(None, description="Where the final model is (set on success).")
    result: dict[str, Any] | None = Field(
        None, description="What the task reported on success (rank 0's termination message): counts, "
        "rates and URIs, e.g. pairs and winRates of a judge stage; at most 4096 bytes, finite numbers only.")
    current_job: str | None = Field(None, description="The current attempt's Job, once kubedpo created it "
                                    "(a Job missing after that was deleted outside kubedpo: a failed attempt).")
    observed_generation: int | None = Field(None, description="metadata.generation last acted upon.")
    message: str | None = Field(None, description="Why the job is in its phase.")
