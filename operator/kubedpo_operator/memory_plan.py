"""Per-GPU memory of a DPOJob, estimated from the model's config.json: pure arithmetic, no torch.

Shared by `kubedpo plan`, `kubedpo validate` and the operator (a warning condition, never a
failure: an estimate can be wrong). Components, per device, in bytes:

  weights      trainable parameters in their storage dtype (fp32 masters under bf16-mixed), plus
               a LoRA run's frozen base (bf16 under bf16-mixed), plus the bf16 copies autocast
               caches during forward/backward (DDP bf16-mixed) or the layers FSDP2 gathers
  gradients    one per trainable parameter, in the storage dtype; DDP adds its reduction buckets
  optimizer    AdamW's two moments per trainable parameter, fp32 (bf16 under pure bf16)
  reference    a full-fine-tune live reference (frozen, model.dtype: auto = the masters' dtype);
               0 with LoRA (the base with
               the adapter off), with simpo, and after a precompute pass
  activations  what autograd keeps for backward over 2 x batchSize sequences of maxLength tokens:
               per layer and token about 10h + 3kv + 4I values (Llama-style attention + SwiGLU;
               only the layer input with gradientCheckpointing, plus one layer being recomputed;
               LoRA with dropout adds each adapted linear's dropped-out input and its mask),
               plus the logits (2B, L, V) kept for backward and their gradient (or the live
               reference's logits, alive at the same time), plus one fp32 chunk of the log-softmax

The peak is weights + reference + optimizer + max(activations, gradients): gradients are
allocated while activations are freed during backward, so both are never fully alive at once.
FSDP divides weights, gradients, optimizer state and reference by the world size; cpuOffload
moves them to host memory. Checked against measured peak memory on CPU for tiny models
(tests/operator/test_memory_plan.py); not yet measured on a GPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

GiB = 1024**3
HEADROOM = 0.90  # of the device's memory: CUDA context, NCCL buffers, allocator fragmentation
LOGSOFTMAX_CHUNK_ELEMENTS = 2**25  # kubedpo_trainer.logprobs.DEFAULT_CHUNK_ELEMENTS (fp32)

# nodeSelector nvidia.com/gpu.product values whose memory the name does not spell out.
KNOWN_GPUS_GIB: dict[str, float] = {"H200": 141, "B200": 180, "GH200": 96, "A10G": 24, "L4": 24, "L40S": 48,
                                    "T4": 16, "V100": 16, "A100": 40, "H100": 80}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from config.json (Llama/Mistral/Qwen naming)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> ModelShape:
        try:
            heads = int(cfg["num_attention_heads"])
            return cls(vocab=int(cfg["vocab_size"]), hidden=int(cfg["hidden_size"]),
                       intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]),
                       heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                       tied=bool(cfg.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: not a decoder config this estimate knows: missing or bad {err}") from None

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of one decoder layer."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.layer_linears.values()) + 2 * self.hidden  # + 2 RMSNorms

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    def lora_params(self, rank: int, targets: list[str] | None) -> int:
        """r x (in + out) per adapted linear; no targets = every linear of every layer."""
        chosen = {k: v for k, v in self.layer_linears.items() if not targets or k in targets}
        return self.layers * sum(rank * (a + b) for a, b in chosen.values())


@dataclass(frozen=True)
class Setup:
    """The settings of a DPOJob that decide its memory."""

    batch_size: int
    max_length: int
    precision: str  # bf16-mixed | fp32 | bf16
    frozen_dtype: str  # model.dtype: auto | float32 | bfloat16 | float16 (reference, LoRA base)
    strategy: str  # ddp | fsdp
    world: int
    gradient_checkpointing: bool
    reference: str  # live | precompute | none
    lora_rank: int | None
    lora_targets: list[str] | None
    lora_dropout: float
    cpu_offload: bool
    reshard_after_forward: bool


def precision_of(training: Any, on_gpu: bool) -> str:
    """`training.precision`, with auto resolved as the trainer does: bf16-mixed on (bf16) GPUs,
    fp32 on CPU."""
    precision = str(getattr(training, "precision", "auto"))
    if precision == "auto":
        return "bf16-mixed" if on_gpu else "fp32"
    return precision


def setup_of(spec: Any) -> Setup:
    """The Setup of a DPOJobSpec (or TrainerConfig + world size 1)."""
    t = spec.training
    lora = spec.model.lora
    reference = "none" if t.loss == "simpo" else ("precompute" if t.reference_logps == "precompute" else "live")
    world = getattr(spec, "workers", 1) * max(1, getattr(spec, "gpus_per_worker", 1))
    return Setup(batch_size=t.batch_size, max_length=spec.data.max_length,
                 precision=precision_of(t, getattr(spec, "gpus_per_worker", 0) > 0),
                 frozen_dtype=spec.model.dtype, strategy=t.distributed.strategy, world=world,
                 gradient_checkpointing=t.gradient_checkpointing, reference=reference,
                 lora_rank=lora.rank if lora else None, lora_targets=lora.target_modules if lora else None,
                 lora_dropout=lora.dropout if lora else 0.0,
                 cpu_offload=t.distributed.cpu_offload, reshard_after_forward=t.distributed.reshard_after_forward)


def estimate(shape: ModelShape, s: Setup) -> dict[str, int]:
    """Bytes per device for each component, and `peak`."""
    compute = 4 if s.precision == "fp32" else 2  # bytes of a value in forward/backward
    store = 2 if s.precision == "bf16" else 4  # bytes of a trainable parameter and its gradient
    lora = s.lora_rank is not None
    trainable = shape.lora_params(s.lora_rank or 0, s.lora_targets) if lora else shape.params
    # Frozen weights (model.dtype): auto = LoRA's base in bf16 unless fp32; a reference like the masters.
    explicit = {"float32": 4, "bfloat16": 2, "float16": 2}.get(s.frozen_dtype)
    base_bytes = explicit or (4 if s.precision == "fp32" else 2)
    ref_bytes = explicit or store
    frozen_base = shape.params * base_bytes if lora else 0
    shard = s.world if s.strategy == "fsdp" else 1
    offload = s.strategy == "fsdp" and s.cpu_offload

    weights = 0 if offload else (trainable * store + frozen_base) // shard
    if s.strategy == "fsdp":  # gathered for compute: two layers (one prefetched) + the embedding/head unit
        gathered = shape.params if not s.reshard_after_forward else 2 * shape.layer_params
        weights += (gathered + shape.vocab * shape.hidden * (1 if shape.tied else 2)) * compute
    elif s.precision == "bf16-mixed" and not lora:
        weights += trainable * 2  # autocast's cached bf16 copies of the fp32 weights
    grads = 0 if offload else trainable * store // shard
    if s.strategy == "ddp" and s.world > 1:
        grads *= 2  # DDP's reduction buckets hold a second copy of the gradients
    optimizer = 0 if offload else trainable * 2 * store // shard
    reference = shape.params * ref_bytes // shard if (s.reference == "live" and not lora) else 0

    tokens = 2 * s.batch_size * s.max_length  # chosen + rejected rows of one micro-batch
    per_token = 10 * shape.hidden + 3 * shape.kv_dim + 4 * shape.intermediate
    if lora and s.lora_dropout > 0:  # each adapted linear keeps its dropped-out input and a 1-byte mask
        inputs = sum(a for k, (a, _) in shape.layer_linears.items() if not s.lora_targets or k in s.lora_targets)
        per_token += inputs + inputs // compute
    if s.gradient_checkpointing:
        layer_acts = tokens * (shape.layers * shape.hidden + per_token) * compute
    else:
        layer_acts = tokens * shape.layers * per_token * compute
    logits = tokens * shape.vocab * compute
    chunk = min(tokens * shape.vocab, LOGSOFTMAX_CHUNK_ELEMENTS) * 4
    activations = layer_acts + tokens * 3 * shape.hidden * compute + 2 * logits + chunk
    peak = weights + reference + optimizer + max(activations, grads)
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "reference": reference,
            "activations": activations, "peak": peak}


def gpu_memory_from_spec(spec: Any) -> float | None:
    """GiB of one GPU, from nodeSelector nvidia.com/gpu.product (e.g. NVIDIA-H100-80GB-HBM3)."""
    product = (getattr(spec, "node_selector", None) or {}).get("nvidia.com/gpu.product", "")
    if not product:
        return None
    m = re.search(r"(\d+)\s*GB", product, re.IGNORECASE)
    if m:
        return float(m.group(1))
    for name, gib in sorted(KNOWN_GPUS_GIB.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in product.lower():
            return gib
    return None


def largest_batch(shape: ModelShape, s: Setup, budget: float) -> int:
    """Largest batchSize (pairs per device) whose peak fits `budget` bytes; 0 if none."""
    best, b = 0, 1
    while b <= 4096 and estimate(shape, replace(s, batch_size=b))["peak"] <= budget:
        best, b = b, b * 2
    lo, hi = best, (b if best else 1)
    while best and hi - lo > 1:  # between the last fitting power of two and the first that did not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate(shape, replace(s, batch_size=mid))["peak"] <= budget else (lo, mid)
    return lo


def advice(shape: ModelShape, s: Setup, budget: float) -> list[str]:
    """Settings that would make the job fit, cheapest first (each alone, with its peak)."""
    options = [
        ("training.gradientCheckpointing: true", replace(s, gradient_checkpointing=True), not s.gradient_checkpointing),
        ("training.distributed.strategy: fsdp", replace(s, strategy="fsdp"), s.strategy != "fsdp" and s.world > 1),
        ("training.distributed.strategy: fsdp + training.gradientCheckpointing: true",
         replace(s, strategy="fsdp", gradient_checkpointing=True), s.world > 1 and not s.gradient_checkpointing),
        ("training.referenceLogps: precompute", replace(s, reference="precompute"), s.reference == "live"),
        ("training.distributed.cpuOffload: true", replace(s, strategy="fsdp", cpu_offload=True),
         s.strategy == "fsdp" and not s.cpu_offload),
        ("model.lora: {rank: 16}", replace(s, lora_rank=16, lora_targets=None, lora_dropout=0.05),
         s.lora_rank is None),
    ]
    out = []
    for text, alt, applies in options:
        if not applies:
            continue
        b = largest_batch(shape, replace(alt, batch_size=1), budget)
        if b >= 1:
            keep = f"batchSize {min(b, s.batch_size)}" + (f" (fits up to {b})" if b > s.batch_size else "")
            out.append(f"{text}: fits with {keep}, peak {fmt(estimate(shape, replace(alt, batch_size=min(b, s.batch_size)))['peak'])}")
    return out


def fmt(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class Plan:
    components: dict[str, int]
    gpu_memory_gib: float | None
    fits: bool | None
    largest_batch: int | None
    advice: list[str]
    setup: Setup
    params: int
    trainable: int

    def render(self) -> str:
        s = self.setup
        lines = [f"model: {self.params / 1e9:.2f}B parameters, {self.trainable / 1e9:.3f}B trainable"
                 f"{' (LoRA)' if s.lora_rank else ''}",
                 f"setup: {s.strategy} over {s.world} GPUs, precision {s.precision}, batchSize {s.batch_size} x "
                 f"maxLength {s.max_length}, gradientCheckpointing {str(s.gradient_checkpointing).lower()}, "
                 f"reference {s.reference}{', cpuOffload' if s.cpu_offload else ''}",
                 "per GPU:"]
        for k in ("weights", "gradients", "optimizer", "reference", "activations"):
            lines.append(f"  {k:<12} {fmt(self.components[k]):>10}")
        lines.append(f"  {'peak':<12} {fmt(self.components['peak']):>10}   (weights + reference + optimizer + "
                     "max(activations, gradients))")
        if self.gpu_memory_gib is None:
            lines.append("GPU memory: unknown (set nodeSelector nvidia.com/gpu.product or pass --gpu-memory GiB)")
            return "\n".join(lines)
        budget = self.gpu_memory_gib * HEADROOM
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"GPU: {self.gpu_memory_gib:g} GiB ({budget:.1f} GiB usable at {HEADROOM:.0%}): {verdict}; "
                     f"largest batchSize that fits: {self.largest_batch}")
        if not self.fits:
            lines.append("to fit, change one of:" if self.advice else "nothing single setting makes it fit: more GPUs")
            lines += [f"  {a}" for a in self.advice]
        return "\n".join(lines)

    def warning(self) -> str | None:
        """One line for a condition/event when the estimate exceeds the GPU; None when it fits."""
        if self.fits is not False:
            return None
        fix = f"; {self.advice[0]}" if self.advice else ""
        return (f"estimated peak {fmt(self.components['peak'])} per GPU exceeds {self.gpu_memory_gib:g} GiB "
                f"(largest batchSize that fits: {self.largest_batch}){fix}")


def make_plan(spec: Any, config_json: Mapping[str, Any], gpu_memory_gib: float | None = None,
              source: str = "config.json") -> Plan:
    shape = ModelShape.from_config(config_json, source)
    s = setup_of(spec)
    gib = gpu_memory_gib if gpu_memory_gib is not None else gpu_memory_from_spec(spec)
    comps = estimate(shape, s)
    trainable = shape.lora_params(s.lora_rank, s.lora_targets) if s.lora_rank else shape.params
    if gib is None:
        return Plan(comps, None, None, None, [], s, shape.params, trainable)
    budget = gib * GiB * HEADROOM
    fits = comps["peak"] <= budget
    return Plan(comps, gib, fits, largest_batch(shape, s, budget), [] if fits else advice(shape, s, budget), s,
                shape.params, trainable)
