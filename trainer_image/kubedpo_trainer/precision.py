"""Which dtypes the weights, the optimizer state and the compute use (`training.precision`).

Why fp32 master weights: bf16 keeps 8 bits of mantissa, so an update smaller than about 1/256
of a weight's magnitude rounds back to the same bf16 value. At DPO's usual learning rate
(5e-7) almost every AdamW update is that small: 10 steps on a bf16 tensor change about 1 % of
its elements, the same steps on fp32 weights change over 99 %. So:

  bf16-mixed  trainable parameters and AdamW state in fp32; forward and backward under bf16
              autocast (matmuls in bf16, norms, softmax and the loss in fp32). LoRA's frozen
              base is stored in bf16 (it never takes an update, and policy and reference share
              it). Under FSDP2 this maps to MixedPrecisionPolicy(param_dtype=bf16,
              reduce_dtype=fp32).
  fp32        everything in fp32, no autocast.
  bf16        everything in bf16 (half the weight and optimizer memory); updates below bf16's
              resolution are lost. Only when asked for, and it warns.
  auto        bf16-mixed on CUDA devices with bf16, fp32 elsewhere. On CPU bf16 autocast is
              usually slower than fp32 (no bf16 matrix units on most CPUs) and CPU runs are
              tests and demos whose numbers should be exact; GPUs are where bf16 pays.

`model.dtype` only sets the dtype of the *frozen* weights; trainable ones follow the precision.
Under `auto` a full fine-tune's reference model is stored like the policy's master weights, so
that at step 0 both compute the same function under the same autocast and every implicit reward
is exactly 0 (measured on the tiny model: a bf16-stored reference differs from the fp32-master
policy by ~3e-3 nats per sequence, because the residual stream is then added in bf16).
`model.dtype: bfloat16` halves the reference's memory at that cost; with
`referenceLogps: precompute` the reference is freed before training, so fp32 costs nothing then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

log = logging.getLogger(__name__)

Precision = Literal["bf16-mixed", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16-mixed", "fp32", "bf16")

PURE_BF16_WARNING = (
    "training.precision: bf16 keeps the trained weights and AdamW state in bfloat16: any update "
    "smaller than about 1/256 of a weight (most updates at DPO learning rates such as 5e-7) rounds "
    "away and is lost, so the model barely moves. Use bf16-mixed (fp32 master weights, bf16 compute; "
    "the default on GPUs) unless memory forces this."
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PrecisionPlan:
    """The dtypes of one run, resolved for its device."""

    name: Precision
    trainable_dtype: torch.dtype  # policy weights that train (and so the AdamW state)
    reference_dtype: torch.dtype  # a full fine-tune's separate reference model
    base_dtype: torch.dtype  # LoRA's frozen base weights (policy and reference alike)
    autocast_dtype: torch.dtype | None  # compute dtype under autocast; None: no autocast

    @property
    def accelerate_mixed_precision(self) -> str:
        """accelerate's `mixed_precision`: it wraps the prepared policy's forward in autocast."""
        return "bf16" if self.autocast_dtype is torch.bfloat16 else "no"

    @property
    def upcast_lora_adapters(self) -> bool:
        """peft's `autocast_adapter_dtype`: fp32 adapters on a bf16 base, except in pure bf16."""
        return self.trainable_dtype is torch.float32


def bf16_device(device: torch.device | str) -> bool:
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(name: str, device: torch.device | str) -> Precision:
    """`auto` -> bf16-mixed on bf16-capable CUDA devices, fp32 elsewhere; other names as given."""
    if name == "auto":
        return "bf16-mixed" if bf16_device(device) else "fp32"
    if name not in ("bf16-mixed", "fp32", "bf16"):
        raise ValueError(f"training.precision: unknown value {name!r}; expected one of {', '.join(PRECISIONS)}")
    return name  # type: ignore[return-value]


def plan_precision(precision: str, model_dtype: str, device: torch.device | str) -> PrecisionPlan:
    """Dtypes for `training.precision` and `model.dtype` (the frozen weights' dtype) on `device`."""
    name = resolve_precision(precision, device)
    if name == "bf16":
        log.warning("%s", PURE_BF16_WARNING)
        return PrecisionPlan(name, torch.bfloat16, torch.bfloat16, torch.bfloat16, None)
    if name == "fp32":
        frozen = torch.float32 if model_dtype == "auto" else _DTYPES[model_dtype]
        return PrecisionPlan(name, torch.float32, frozen, frozen, None)
    if model_dtype == "auto":
        return PrecisionPlan(name, torch.float32, torch.float32, torch.bfloat16, torch.bfloat16)
    frozen = _DTYPES[model_dtype]
    return PrecisionPlan(name, torch.float32, frozen, frozen, torch.bfloat16)
