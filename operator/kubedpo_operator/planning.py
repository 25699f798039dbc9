"""The memory plan of a DPOJob at the edges: read config.json, estimate, say it (CLI, condition).

An estimate that says "does not fit" is a warning everywhere (kubedpo validate, the operator's
MemoryPlan condition and a Warning event), never a failure: estimates can be wrong, and a user
may know better. `kubedpo plan` prints the whole breakdown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .conditions import set_condition
from .memory_plan import Plan, make_plan
from .model_source import ModelConfigUnavailable, read_config_json

CONDITION = "MemoryPlan"


def plan_spec(spec: Any, gpu_memory_gib: float | None = None, config_path: str | None = None,
              timeout_s: float = 10.0) -> Plan:
    """Raises ModelConfigUnavailable when config.json cannot be read, ValueError when unusable.

    `config_path`: a config.json to use instead of the one at model.uri."""
    if config_path is not None:
        source = config_path
        try:
            data = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ModelConfigUnavailable(f"{config_path}: cannot read: {err}") from None
    else:
        source = f"{spec.model.uri.rstrip('/')}/config.json"
        data = read_config_json(spec.model.uri, spec.s3.endpoint_url, spec.s3.region, timeout_s)
    return make_plan(spec, data, gpu_memory_gib, source=source)


def plan_warning(spec: Any, gpu_memory_gib: float | None = None, timeout_s: float = 10.0) -> tuple[str, str]:
    """(status, message) for the MemoryPlan condition: True fits, False does not, Unknown otherwise."""
    try:
        plan = plan_spec(spec, gpu_memory_gib, timeout_s=timeout_s)
    except (ModelConfigUnavailable, ValueError) as err:
        return "Unknown", f"no estimate: {err}"
    if plan.fits is None:
        return "Unknown", f"estimated peak {plan.components['peak'] / 2**30:.1f} GiB per GPU; GPU memory unknown"
    warning = plan.warning()
    if warning:
        return "False", warning
    return "True", (f"estimated peak {plan.components['peak'] / 2**30:.1f} GiB per GPU fits "
                    f"{plan.gpu_memory_gib:g} GiB (largest batchSize {plan.largest_batch})")


def memory_condition(spec: Any, now: str, timeout_s: float, generation: int | None = None
                     ) -> dict[str, Any] | None:
    """The MemoryPlan condition of a GPU job; None for CPU jobs or when disabled (timeout 0).

    `generation`: the metadata.generation of the spec estimated (the condition's observedGeneration)."""
    if timeout_s <= 0 or not spec.gpus_per_worker:
        return None
    status, message = plan_warning(spec, timeout_s=timeout_s)
    reason = {"True": "Fits", "False": "MayNotFit", "Unknown": "NotEstimated"}[status]
    return set_condition(None, CONDITION, status, reason, message, now, generation)[0]
