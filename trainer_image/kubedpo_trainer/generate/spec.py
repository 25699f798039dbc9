"""What the parts of an output were sampled with, so a restart never mixes two specs.

A finished part is skipped on restart. That is only right if the restart would have written
the same part: same policy, tokenizer, prompts, truncation, precision and sampling settings
(batchSize included: it decides which prompts share a batch and so the random draws).
Rank 0 records those fields in `output.uri/_kubedpo_generate_spec.json` before the first part
and compares them on every later attempt; a difference is an InputError (exit 2) naming the
fields, not a silent mix of old and new samples. (Name starting with `_`: data listings skip
it.) The policy is identified by its URI: a pipeline writes every round's model to a new one.
"""

from __future__ import annotations

import json
from typing import Any

from .. import storage
from ..config import TrainerConfig
from ..errors import InputError

SPEC_FILE = "_kubedpo_generate_spec.json"


def output_spec(cfg: TrainerConfig) -> dict[str, Any]:
    """The fields a part's bytes depend on, camelCase paths as in the manifest (not onBadRecord:
    a part written under fail holds no bad row, so it is what skip would have written)."""
    wire = cfg.to_wire()
    d = wire["data"]
    return {
        "model.uri": cfg.model.uri,
        "model.tokenizerUri": cfg.model.tokenizer_uri,
        "model.dtype": cfg.model.dtype,
        "training.precision": cfg.training.precision,
        **{f"data.{k}": d.get(k) for k in ("train", "eval", "evalMaxRows", "maxPromptLength", "truncationSide")},
        **{f"generate.{k}": v for k, v in sorted(wire["generate"].items())},
    }


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_spec(cfg: TrainerConfig) -> None:
    """Record this attempt's spec, or refuse one that differs from the recorded one."""
    uri = storage.join(cfg.output.uri, SPEC_FILE)
    mine = output_spec(cfg)
    if storage.exists(uri):
        theirs = json.loads(storage.read_bytes(uri))
        diff = differences(theirs, mine)
        if diff:
            raise InputError(f"{cfg.output.uri}: holds generations of another spec ({'; '.join(diff)}); "
                             "finished parts would be mixed with new ones. Use a new output.uri, or delete "
                             "this one to start over")
        return
    storage.write_bytes(uri, json.dumps(mine, indent=2, sort_keys=True).encode())
