"""Write the final model to `output.uri`: what a user loads after the run.

Layout (DESIGN.md "Storage layout"):
  full fine-tune:  config.json, model.safetensors, tokenizer files, kubedpo_summary.json
  LoRA:            adapter_config.json, adapter_model.safetensors, tokenizer files,
                   merged/ (full merged weights, only with lora.mergeOnExport), kubedpo_summary.json

`kubedpo_summary.json` is the output's completion marker: it is removed first and written last,
after every other file is uploaded, so a reader that sees it sees a whole model.
Files are staged in a local folder and uploaded with `storage.upload_dir`, so local and S3
outputs take the same path.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from . import scratch, storage
from .config import TrainerConfig
from .model_kinds import is_peft

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

SUMMARY = "kubedpo_summary.json"


@contextlib.contextmanager
def _use_cache_for_inference(model: nn.Module) -> Iterator[None]:
    """Training turns the KV cache off (gradient checkpointing); users generate with it on."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = True
    try:
        yield
    finally:
        if config is not None:
            config.use_cache = old


def save_full(model: PreTrainedModel, out: Path, state_dict: dict[str, Any] | None = None) -> None:
    with _use_cache_for_inference(model):
        model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)


def save_adapter(model: PeftModel, out: Path, base_uri: str, state_dict: dict[str, Any] | None = None) -> None:
    """adapter_model.safetensors + adapter_config.json naming the base by its URI, not a cache path."""
    for conf in model.peft_config.values():
        conf.base_model_name_or_path = base_uri
    model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)


def save_merged(model: PeftModel, out: Path) -> None:
    """Base weights with the adapter folded in, loadable with AutoModelForCausalLM alone.

    Merges a copy so the caller's model keeps its adapter (costs one model of memory, briefly).
    """
    merged = copy.deepcopy(model).merge_and_unload()
    with _use_cache_for_inference(merged):
        merged.save_pretrained(str(out), safe_serialization=True)
    del merged


def export_final(
    model: nn.Module,
    tokenizer: Any,
    cfg: TrainerConfig,
    summary: dict[str, Any],
    unwrap: Callable[[nn.Module], nn.Module] | None = None,
    out_uri: str | None = None,
    state_dict: dict[str, Any] | None = None,
) -> str:
    """Write model (or adapter), tokenizer and summary to `out_uri` (default `output.uri`).

    `unwrap` strips an accelerate/DDP wrapper first (pass `accelerator.unwrap_model`); call on
    one rank only. `state_dict`: the full weights gathered beforehand (FSDP:
    `accelerator.get_state_dict`, a collective every rank runs); default `model.state_dict()`.
    Returns the output URI.
    """
    if unwrap is not None:
        model = unwrap(model)
    out_uri = out_uri or cfg.output.uri
    marker = storage.join(out_uri, SUMMARY)
    retries_before = storage.retry_count()
    storage.delete(marker)  # a stale summary from an earlier attempt must not vouch for a half-written output
    with tempfile.TemporaryDirectory(prefix=f"kubedpo-export-{scratch.owner_tag()}-") as tmp:  # see scratch.py
        staging = Path(tmp)
        if is_peft(model):
            save_adapter(model, staging, cfg.model.uri, state_dict)
            lora = cfg.model.lora
            if lora is not None and lora.merge_on_export:
                save_merged(model, staging / "merged")
                tokenizer.save_pretrained(str(staging / "merged"))
        else:
            from transformers import PreTrainedModel

            if not isinstance(model, PreTrainedModel):
                raise TypeError(f"cannot export a {type(model).__name__}: neither a peft nor a transformers model")
            save_full(model, staging, state_dict)
        tokenizer.save_pretrained(str(staging))
        storage.upload_dir(staging, out_uri)
    if isinstance(summary.get("storage"), dict):  # the export's own retries (this rank's) count too
        during = storage.retry_count() - retries_before
        summary = {**summary, "storage": {**summary["storage"],
                                          "s3_retries": summary["storage"].get("s3_retries", 0) + during}}
    storage.write_bytes(marker, json.dumps(summary, indent=2, default=str).encode())
    return out_uri
