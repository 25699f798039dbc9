"""Model and optimizer state under FSDP as a torch.distributed.checkpoint (DCP) folder.

Why DCP: every rank writes only its own shards (`__<rank>_0.distcp`; rank 0 adds `.metadata`,
which records each tensor's global shape and where its pieces are), so nothing is gathered to
one rank and a 70B checkpoint costs each rank 1/world of it. On load, DCP reads the pieces that
overlap this rank's shards, whatever the world size that wrote them: state saved by N ranks
loads on M (resharding on load). The parameters' and AdamW moments' fully qualified names are
the keys, so the files do not depend on the optimizer's parameter order either.

Each rank may write into its own local folder (the checkpoint writer stages per rank): the
folders' union, uploaded under one prefix, is the checkpoint. These two functions are the only
DCP code; the checkpoint layout (`checkpoint.py`) names the folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .errors import InputError

# Frozen parameters (a LoRA base, never changed) are left out: they come from model.uri again.
_OPTIONS: dict[str, Any] = {"ignore_frozen_params": True}


def save_sharded(model: nn.Module, optimizer: Any, path: Path) -> None:
    """Collective: every rank calls it at the same step and writes its shards into `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(**_OPTIONS))
    dcp.save({"model": model_sd, "optimizer": optim_sd},
             storage_writer=dcp.FileSystemWriter(str(path), overwrite=True),
             # Entries every rank holds alike (step counts, unsharded tensors) go to rank 0's file, not
             # spread over all files: a resuming rank then needs its own file and rank 0's, not all.
             planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))


def load_sharded(model: nn.Module, optimizer: Any, path: Path) -> None:
    """Collective: fill this rank's shards of model and optimizer from the DCP folder at `path`.

    A key the model expects but the checkpoint lacks is an error (DCP's default planner), and
    so is a shape that differs: the message names the folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if not (path / ".metadata").exists():
        raise InputError(f"{path}: no .metadata: not a complete sharded (DCP) checkpoint")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(**_OPTIONS))
    state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}  # DCP loads into it in place
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
    except (RuntimeError, ValueError, KeyError) as err:
        raise InputError(f"{path}: sharded checkpoint does not match the model: {err}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(**_OPTIONS))


def shard_files_needed(model: nn.Module, optimizer: Any) -> Callable[[Path], set[str]]:
    """For a DCP folder, the files holding pieces of this rank's shards (names relative to it).

    Why not every file: each rank wrote its own `__<r>_0.distcp`, so with the same world size a
    rank needs 1/world of the bytes, and after a change of world size only the few files its new
    shards overlap. DCP's own planner decides it from `.metadata` alone (each piece's file, offset
    and length), exactly as `load_sharded` will read. The state dict is taken once, when a sharded
    checkpoint is first considered (every rank considers the newest first, as the load would take
    it), and the planning per folder is local: no collective, so ranks may plan different
    checkpoints while they agree on one.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    state: dict[str, Any] = {}

    def needed(path: Path) -> set[str]:
        if not state:  # first asked: taking the optimizer's state dict initialises its state (a step
            # counter), which only a load may do: a fresh run must not pay it
            model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(**_OPTIONS))
            state.update(model=model_sd, optimizer=optim_sd)
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        planner = DefaultLoadPlanner()
        planner.set_up_planner(state, metadata, is_coordinator=False)
        storage = metadata.storage_data or {}
        return {storage[item.storage_index].relative_path for item in planner.create_local_plan().items}

    return needed
