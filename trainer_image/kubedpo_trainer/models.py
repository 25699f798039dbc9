"""Load the tokenizer, the policy and its reference: full fine-tune or LoRA, one interface.

Where a model comes from (`model.uri`):
  - `s3://bucket/prefix/` or a local folder: a save_pretrained folder, made local through
    `storage.download_dir` into a per-URI cache (one download per node, not per rank);
  - `hf://org/name`: a hub id handed to `from_pretrained`. Only this form reaches the hub: a bare
    `org/name` is a local path, so a mistyped `models/nope` fails naming the folder it tried
    instead of asking the hub (docs/design-notes.md); local and S3 folders load with
    `local_files_only`, so nothing is fetched for them either.

The reference is what DPO measures the policy against, and must never move:
  - full fine-tune: a second, frozen copy (requires_grad False, eval mode) from
    `model.referenceUri` or `model.uri`;
  - LoRA: NO second copy. The reference is the policy's own base weights with the adapter
    disabled (peft's `disable_adapter()`); base weights are frozen by peft, so this is exact.
  - reference-free losses (simpo): no reference at all.
`PolicyAndReference.reference_context()` hides the difference: the loop computes reference
log-probs the same way in every case.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import storage
from .batch import Batch
from .config import LossType, TrainerConfig
from .distributed import meta_model, skips_weight_read
from .errors import InputError
from .model_kinds import follow_module, is_peft
from .precision import PrecisionPlan, plan_precision
from .uris import hub_id, is_hub

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .forward import ForwardOutput

log = logging.getLogger(__name__)

_DOWNLOADED = ".kubedpo-download-complete"


# --- where the files are ----------------------------------------------------------------------


def cache_root() -> Path:
    """Model download cache; KUBEDPO_CACHE_DIR points it at a node-local volume (e.g. emptyDir)."""
    return Path(os.environ.get("KUBEDPO_CACHE_DIR") or Path(tempfile.gettempdir()) / "kubedpo-cache")


def resolve_model_source(uri: str, accelerator: Any = None) -> str:
    """A string `from_pretrained` accepts: a local folder or a hub id.

    s3:// folders are downloaded once per node: the local main process downloads while the
    other local ranks wait (accelerate's `local_main_process_first`), then all read the cache.
    """
    if is_hub(uri):
        return hub_id(uri)
    if not storage.is_s3(uri):
        local = Path(uri.removeprefix("file://"))
        if local.exists():
            return str(local)
        raise InputError(f"model uri {uri}: no such folder {local.resolve()} (a Hugging Face hub model is "
                         "written hf://org/name)")
    target = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:20]
    ctx = accelerator.local_main_process_first() if accelerator is not None else contextlib.nullcontext()
    with ctx:
        if not (target / _DOWNLOADED).exists():
            path = storage.download_dir(uri, target)
            (Path(path) / _DOWNLOADED).touch()
            target = Path(path)
    return str(target)


# --- loading ----------------------------------------------------------------------------------


def load_tokenizer(source: TrainerConfig | str, accelerator: Any = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer from `model.tokenizerUri` (or `model.uri`), or from a URI string.

    A tokenizer without a pad token (Llama, Mistral) gets its EOS as pad: padding positions are
    masked out of every loss, so the choice only has to be a valid id.
    """
    from transformers import AutoTokenizer

    if isinstance(source, TrainerConfig):
        uri = source.model.tokenizer_uri or source.model.uri
        trust_remote_code = source.model.trust_remote_code
    else:
        uri = source
    path = resolve_model_source(uri, accelerator)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            local_files_only=not is_hub(uri))
    except (OSError, ValueError) as err:
        raise InputError(f"tokenizer {uri}: cannot load: {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(uri: str, cfg: TrainerConfig, device: torch.device, accelerator: Any,
                     dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    path = resolve_model_source(uri, accelerator)
    try:
        model: PreTrainedModel
        if skips_weight_read(accelerator):  # FSDP: rank 0's weights arrive by broadcast
            model = meta_model(path, dtype, cfg.model.trust_remote_code, local_files_only=not is_hub(uri))
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, local_files_only=not is_hub(uri)
            )
    except (OSError, ValueError) as err:
        raise InputError(f"model {uri}: cannot load: {err}") from None
    if cfg.training.disable_dropout:
        disable_dropout(model)
    if any(p.is_meta for p in model.parameters()):
        return model  # FSDP memory-efficient loading: this rank gets its shards by broadcast
    module: nn.Module = model  # PreTrainedModel.to's functools.wraps signature confuses type checkers
    module.to(device)  # in place, as for every nn.Module
    return model


def lora_config(cfg: TrainerConfig) -> LoraConfig:
    """peft LoraConfig from `model.lora`; no targetModules means every linear layer but the head."""
    from peft import LoraConfig

    lora = cfg.model.lora
    assert lora is not None
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )


def load_policy(cfg: TrainerConfig, device: torch.device | str, accelerator: Any = None,
                plan: PrecisionPlan | None = None) -> nn.Module:
    """The model that trains: all weights, or a peft model whose only trainables are lora_*.

    Full fine-tune: loaded in the trainable dtype (fp32 master weights unless precision is bf16).
    LoRA: the frozen base in `model.dtype` (bf16 by default on GPU), the adapter in fp32 (peft's
    `autocast_adapter_dtype` upcasts bf16/fp16 adapters), except under pure bf16.
    """
    device = torch.device(device)
    plan = plan or plan_precision(cfg.training.precision, cfg.model.dtype, device)
    dtype = plan.trainable_dtype if cfg.model.lora is None else plan.base_dtype
    model = _from_pretrained(cfg.model.uri, cfg, device, accelerator, dtype)
    if cfg.training.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and DDP; the KV cache is useless
        # (and wasteful) while training.
        model.config.use_cache = False
        if cfg.training.distributed.strategy != "fsdp":  # FSDP2 wraps each layer itself (distributed.py)
            enable_activation_checkpointing(model)
    if cfg.model.lora is None:
        model.train()
        return model
    from peft import get_peft_model

    if cfg.training.gradient_checkpointing and cfg.training.distributed.strategy != "fsdp":
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(cfg), autocast_adapter_dtype=plan.upcast_lora_adapters)
    peft_model.train()
    return peft_model


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """transformers 5 renamed gradient_checkpointing_enable; accept both (4.56 and 5.x)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_frozen(uri: str, cfg: TrainerConfig, device: torch.device | str, dtype: torch.dtype,
                accelerator: Any = None) -> nn.Module:
    """A causal LM in eval mode with no gradients (task generate's policy): no LoRA, no reference."""
    return freeze(_from_pretrained(uri, cfg, torch.device(device), accelerator, dtype))


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# Float attributes that transformers' attention modules read as their dropout probability in
# train mode (Llama & co. call the functional dropout with `self.attention_dropout`, so there is
# no nn.Dropout module to zero).
_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "dropout_p", "dropout_prob")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Zero every dropout of the model: nn.Dropout layers (what TRL's `disable_dropout_in_model`
    covers) and the functional attention dropout of transformers' attention modules (which TRL's
    helper misses). Called before peft wraps the model, so `model.lora.dropout` still applies."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in _DROPOUT_ATTRS:
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model  # model.config stays as loaded: the exported model keeps the user's settings


def load_reference(cfg: TrainerConfig, device: torch.device | str, accelerator: Any = None,
                   plan: PrecisionPlan | None = None) -> nn.Module | None:
    """A frozen copy for full fine-tune (dtype: `precision.plan_precision`); None with LoRA
    (adapter disabled instead) or simpo."""
    if cfg.model.lora is not None or cfg.training.loss == LossType.simpo.value:
        return None
    plan = plan or plan_precision(cfg.training.precision, cfg.model.dtype, device)
    uri = cfg.model.reference_uri or cfg.model.uri
    return freeze(_from_pretrained(uri, cfg, torch.device(device), accelerator, plan.reference_dtype))


# --- one interface for the loop ---------------------------------------------------------------


@dataclass
class PolicyAndReference:
    """The trainable policy and a way to run the reference, whichever kind it is.

    `policy` may be replaced by the accelerate/DDP wrapper after `accelerator.prepare`;
    `unwrap` gets back the underlying (peft or transformers) model.
    """

    policy: nn.Module
    reference: nn.Module | None = None
    unwrap: Callable[[nn.Module], nn.Module] = field(default=follow_module)

    @property
    def is_lora(self) -> bool:
        return is_peft(self.unwrap(self.policy))

    @property
    def has_reference(self) -> bool:
        return self.reference is not None or self.is_lora

    @contextlib.contextmanager
    def reference_context(self) -> Iterator[nn.Module]:
        """Yield a module whose forward is the reference model's, under no_grad.

        LoRA: the unwrapped policy with its adapter disabled, in eval mode (no dropout), restored
        on exit; the wrapper is bypassed so no DDP hooks or collectives run for this forward.
        """
        if self.reference is not None:
            with torch.no_grad():
                yield self.reference
            return
        model = self.unwrap(self.policy)
        if not is_peft(model):
            raise RuntimeError("this run has no reference model (reference-free loss)")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), model.disable_adapter():
                yield model
        finally:
            model.train(was_training)

    def reference_logps(self, batch: Batch) -> ForwardOutput | None:
        """`forward.concatenated_forward` of the reference on `batch`; None if reference-free."""
        if not self.has_reference:
            return None
        from .forward import concatenated_forward

        with self.reference_context() as ref:
            return concatenated_forward(ref, batch)

    def release_reference(self) -> None:
        """Drop a full-fine-tune reference after its log-probs were precomputed (frees memory)."""
        self.reference = None


def load_models(cfg: TrainerConfig, accelerator: Any = None, device: torch.device | str | None = None,
                plan: PrecisionPlan | None = None,
                prepare_reference: Callable[[nn.Module], nn.Module] | None = None,
                with_reference: bool = True) -> PolicyAndReference:
    """Policy and reference on `accelerator.device` (or `device`, default CPU), in `plan`'s dtypes.

    The reference is loaded first and handed to `prepare_reference` (FSDP: shard it) before the
    policy is read, so a rank never holds two full copies at once.
    """
    dev = torch.device(device if device is not None else (accelerator.device if accelerator else "cpu"))
    plan = plan or plan_precision(cfg.training.precision, cfg.model.dtype, dev)
    reference = load_reference(cfg, dev, accelerator, plan) if with_reference else None
    if reference is not None and prepare_reference is not None:
        reference = prepare_reference(reference)
    policy = load_policy(cfg, dev, accelerator, plan)
    unwrap = accelerator.unwrap_model if accelerator is not None else follow_module
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in policy.parameters())
    log.info("policy %s: %d of %d parameters trainable (%s)", cfg.model.uri, n_train, n_all,
             "LoRA" if cfg.model.lora else "full")
    return PolicyAndReference(policy=policy, reference=reference, unwrap=unwrap)
