"""What a training checkpoint holds and how a resume puts it back, side by side.

The two must agree file by file (a file written but never read is lost state, one read but
never written fails every resume), so they live in one module:

- every rank: its RNG state and its data position (`data.stream` state);
- rank 0, DDP: the trainable weights and the optimizer state (replicated, so written once);
- every rank, FSDP: its own shards of weights and optimizer state (`sharded/`, DCP);
- rank 0: the scheduler and the trainer state (step, world size, total steps).

A resume may run on another world size: DDP weights are whole, DCP reshards, and the data
stream continues exactly when the global batch is unchanged (it refuses otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import checkpoint as ckpt
from .data.stream import PreferenceStream
from .errors import InputError
from .sharded_checkpoint import load_sharded, save_sharded


@dataclass
class LoopState:
    """The live objects a checkpoint saves and a resume restores."""

    policy: torch.nn.Module  # as prepared by accelerate (FSDP: sharded)
    model: torch.nn.Module  # the same, unwrapped
    optimizer: Any
    scheduler: Any
    stream: PreferenceStream
    fsdp: bool


def snapshot(state: LoopState, step: int, rank: int, world: int, total_steps: int) -> ckpt.Snapshot:
    files: dict[str, Any] = {
        ckpt.rng_file(rank): ckpt.torch_file(ckpt.rng_state()),
        ckpt.data_file(rank): ckpt.json_file(state.stream.state_dict()),
    }
    # FSDP: every rank writes its own shards of weights and optimizer state (DCP, a collective
    # run by the writer on this thread); nothing is gathered.
    if state.fsdp:
        policy, optimizer = state.policy, state.optimizer
        files[ckpt.SHARDED_DIR] = lambda p: save_sharded(policy, optimizer, p)
    if rank == 0:
        if not state.fsdp:
            weights = ckpt.trainable_state(state.model)
            files[ckpt.weights_file(state.model)] = lambda p: ckpt.save_trainable_state(weights, p)
            files[ckpt.OPTIMIZER] = ckpt.torch_file(state.optimizer.state_dict())
        files[ckpt.SCHEDULER] = ckpt.torch_file(state.scheduler.state_dict())
        files[ckpt.TRAINER_STATE] = ckpt.json_file({"step": step, "world_size": world, "total_steps": total_steps})
    return ckpt.Snapshot(step, rank, files)


def restore(state: LoopState, found: ckpt.Verified, rank: int) -> int:
    """Load a verified checkpoint into the live objects; returns its step."""
    uri, local = found.uri, found.local
    trainer_state = ckpt.load_json(local / ckpt.TRAINER_STATE)
    old_world = trainer_state["world_size"]
    if state.fsdp:  # each rank reads the pieces of its own shards, whoever wrote them
        if not found.has(ckpt.SHARDED_DIR):
            raise InputError(f"{uri}: no {ckpt.SHARDED_DIR}/: written without FSDP, resume it without FSDP")
        load_sharded(state.policy, state.optimizer, local / ckpt.SHARDED_DIR)
    else:
        if found.has(ckpt.SHARDED_DIR):
            raise InputError(f"{uri}: {ckpt.SHARDED_DIR}/ but no {ckpt.OPTIMIZER}: written under FSDP, "
                             "resume it under FSDP")
        ckpt.load_trainable_state(state.model, local / ckpt.weights_file(state.model))
        state.optimizer.load_state_dict(ckpt.load_torch(local / ckpt.OPTIMIZER))
    state.scheduler.load_state_dict(ckpt.load_torch(local / ckpt.SCHEDULER))
    if (local / ckpt.rng_file(rank)).exists():  # a rank new to this world size has none
        ckpt.set_rng_state(ckpt.load_torch(local / ckpt.rng_file(rank)))
    # Every old rank's data state: with another world size, counters move to rank 0.
    state.stream.load_state_dict([ckpt.load_json(local / ckpt.data_file(r)) for r in range(old_world)])
    return found.step
