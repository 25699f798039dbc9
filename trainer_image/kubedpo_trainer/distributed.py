"""FSDP2 from the DPOJob (`training.distributed`): accelerate's plugin, the sharded reference, loading.

Why through accelerate rather than calling `fully_shard` ourselves: the loop already speaks
accelerate (accumulate/no_sync, clip, autocast, gathering for export), and accelerate's FSDP2
path is the one its users' config files select, so spec and config file run the same code.

Memory-efficient loading is *rank-0 load + broadcast*: rank 0 reads the weights; every other
rank builds the model from config.json with its parameters on the meta device (`meta_model`:
transformers 5 no longer skips reading on non-zero ranks by itself), and accelerate's
`fsdp2_prepare_model` shards the (meta) model and broadcasts rank 0's full tensors, one at a
time, into each rank's shard. The reference is loaded and sharded before the policy is read, so
the whole job holds at most one full copy at any time (on rank 0's node).

The reference model is a second FSDP2 module (frozen, eval mode): each rank holds 1/world of
it and gathers one layer at a time in its forward, the same as the policy.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import DistributedType
from torch import nn

from .config import TrainerConfig
from .precision import resolve_precision

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def precision_of(cfg: TrainerConfig) -> str:
    """`training.precision` resolved for this machine (auto: bf16-mixed on bf16 GPUs, else fp32)."""
    return resolve_precision(cfg.training.precision, "cuda" if torch.cuda.is_available() else "cpu")


def wants_fsdp(cfg: TrainerConfig) -> bool:
    return cfg.training.distributed.strategy == "fsdp"


def mixed_precision_policy(cfg: TrainerConfig) -> Any:
    """bf16-mixed: bf16 gathers and compute, gradients reduced in fp32, fp32 master shards.

    Reducing in bf16 (accelerate's default for mixed_precision bf16) loses the low bits of
    gradients summed over many ranks; fp32 reduce-scatter costs 2x the gradient traffic only.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision_of(cfg) == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def fsdp_plugin(cfg: TrainerConfig) -> Any:
    """accelerate's FSDP2 plugin for `training.distributed.strategy: fsdp`, else None (DDP, or
    whatever accelerate's own config file/env asks for)."""
    if not wants_fsdp(cfg):
        return None
    from accelerate import FullyShardedDataParallelPlugin

    d = cfg.training.distributed
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",  # one fully_shard per decoder layer (_no_split_modules)
        reshard_after_forward=d.reshard_after_forward,
        cpu_offload=d.cpu_offload,
        activation_checkpointing=cfg.training.gradient_checkpointing,
        cpu_ram_efficient_loading=d.memory_efficient_loading,
        state_dict_type="SHARDED_STATE_DICT",
        mixed_precision_policy=mixed_precision_policy(cfg),
    )


def settle_loading_env(cfg: TrainerConfig, fsdp_granted: bool) -> None:
    """Tell transformers whether to read weights on local rank 0 only (it reads this env pair, not
    the plugin; accelerate sets both as soon as a plugin is passed). Where accelerate did not
    grant FSDP (CPU), there is no broadcast: every rank must read the weights itself."""
    if not wants_fsdp(cfg):
        return
    efficient = fsdp_granted and cfg.training.distributed.memory_efficient_loading
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true" if efficient else "false"


def skips_weight_read(acc: Any) -> bool:
    """True on every rank but rank 0 when FSDP loads memory-efficiently: accelerate broadcasts rank
    0's tensors into each shard, so this rank builds the model with parameters on the meta device
    and never reads the weights (transformers 5 reads them on every rank, env or not)."""
    if acc is None or getattr(acc, "distributed_type", None) != DistributedType.FSDP:
        return False
    plugin = getattr(acc.state, "fsdp_plugin", None)
    return bool(plugin is not None and plugin.cpu_ram_efficient_loading and not acc.is_main_process)


def meta_model(path: str, dtype: torch.dtype, trust_remote_code: bool,
               local_files_only: bool = False) -> PreTrainedModel:
    """The architecture from config.json with parameters on the meta device (no memory) and
    buffers real: non-persistent buffers (rotary frequencies) are not broadcast by accelerate."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def on_meta(model: nn.Module) -> bool:
    """True on the ranks that skipped reading the weights (memory-efficient loading)."""
    return any(p.is_meta for p in model.parameters())


def shard_reference(acc: Any, model: nn.Module) -> nn.Module:
    """The frozen reference as a second FSDP2 module: 1/world of its weights on each rank.

    No activation checkpointing (it never runs backward); frozen params are not upcast.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    model = fsdp2_prepare_model(acc, model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def local_bytes(model: nn.Module | None) -> int:
    """Bytes of this rank's parameters: a DTensor counts its local shard only."""
    if model is None:
        return 0
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def full_bytes(model: nn.Module | None) -> int:
    """Bytes of the whole (unsharded) model's parameters."""
    if model is None:
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters())


def host_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), for the per-rank loading log."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def checkpointed_layers(model: nn.Module) -> int:
    """Modules wrapped for activation checkpointing by FSDP2's path (torch's CheckpointWrapper;
    fully_shard then swaps in a subclass, so isinstance, not the class name)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return sum(isinstance(m, CheckpointWrapper) for m in model.modules())


def rebind_optimizer(optimizer: Any, model: nn.Module) -> None:
    """Point a fresh optimizer at the model's sharded parameters, in creation order.

    accelerate maps old to new parameters by `data_ptr`, and every meta-device parameter (the
    ranks that skip reading weights) has data_ptr 0: its mapping would give every slot the same
    parameter. The optimizer was built from `requires_grad` parameters in module order and
    holds no state yet, so rebinding by order is exact.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = optimizer.param_groups
    if len(groups) != 1 or len(groups[0]["params"]) != len(params) or optimizer.state:
        raise RuntimeError("rebind_optimizer: expected one fresh parameter group matching the model")
    groups[0]["params"] = params


def log_distributed_type(acc: Accelerator, spec_fsdp: bool = False) -> None:
    """Say which parallelism accelerate chose; warn when FSDP was asked for and not granted.

    accelerate (1.15) turns `ACCELERATE_USE_FSDP`/`accelerate launch --use_fsdp` into FSDP only on
    GPU-type backends: on CPU (gloo) it silently runs DDP (MULTI_CPU) instead.
    """
    kind = acc.distributed_type
    if kind == DistributedType.FSDP:
        log.info("distributed: FSDP%d over %d processes", 2 if acc.is_fsdp2 else 1, acc.num_processes)
    else:
        log.info("distributed: %s over %d processes", kind.value, acc.num_processes)
        if spec_fsdp:
            log.warning("training.distributed.strategy is fsdp but accelerate runs %s: it enables FSDP only on "
                        "GPU-type devices; training continues with replicated weights", kind.value)
        elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            log.warning("FSDP was requested (ACCELERATE_USE_FSDP) but accelerate runs %s: it enables FSDP "
                        "only on GPU-type devices; training continues with replicated weights", kind.value)


def memory_per_rank(acc: Accelerator, policy: nn.Module, reference: nn.Module | None, rss_before: int) -> dict[str, Any]:
    """Per-rank bytes of policy and reference parameters held locally (FSDP: shards) and host
    RSS growth while loading, gathered to every rank: what sharding and rank-0 loading save.
    A collective: every rank calls it once, after the models are prepared."""
    mine = [local_bytes(policy), local_bytes(reference), host_rss_bytes() - rss_before, peak_rss_bytes() - rss_before]
    rows = acc.gather(torch.tensor([mine], dtype=torch.float64, device=acc.device)).tolist()
    keys = ("policy_local_bytes", "reference_local_bytes", "load_rss_growth_bytes", "load_peak_rss_growth_bytes")
    out: dict[str, Any] = {k: [int(r[i]) for r in rows] for i, k in enumerate(keys)}
    out["policy_full_bytes"] = full_bytes(policy)
    out["reference_full_bytes"] = full_bytes(reference)
    log.info("memory per rank: %s", json.dumps(out))
    return out
