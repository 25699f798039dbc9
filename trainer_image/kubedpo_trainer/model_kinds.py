"""What kind of model a module is (peft adapter or plain transformers), and the wrappers around it.

One definition instead of a `hasattr(model, "peft_config")` per module, typed so that the
checker knows a peft model's methods after the test. peft and transformers are imported for
the types only: the check itself is duck-typed, as accelerate's and peft's own helpers are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeGuard

from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel


def is_peft(model: nn.Module) -> TypeGuard[PeftModel]:
    """A peft model (LoRA adapter over a frozen base): it carries `peft_config`."""
    return hasattr(model, "peft_config")


def follow_module(model: nn.Module) -> nn.Module:
    """Strip DDP-style wrappers (`.module`) when no accelerator's unwrap_model is at hand."""
    while isinstance(inner := getattr(model, "module", None), nn.Module):
        model = inner
    return model
