"""Which checkpoint a resuming gang loads, fetched once per node and only the files each rank reads.

Before, every rank downloaded the whole newest checkpoint (all ranks' files) into a temp folder of
its own: with 8 ranks a node fetched the model and optimizer state 8 times, and under FSDP every
rank fetched every rank's shards. Now the local ranks of a node share one folder (named after
their launcher, so a run killed before it could remove the folder leaves one that `scratch`
removes at the next start) and fetch per file, under a lock, what they read:

- every rank: trainer state, scheduler, all ranks' data positions, its own RNG state;
- DDP: the full weights and optimizer state (each rank holds them whole), fetched by the first
  local rank to ask, the others wait for the file's lock and read the same bytes;
- FSDP: `sharded/.metadata` and only the `.distcp` files holding pieces of the rank's shards
  (DCP's planner says which, `sharded_checkpoint.shard_files_needed`).

Each rank verifies the SHA-256 of the files it fetched, so ranks may see different damage: they
agree on the newest step every rank verified (the smallest choice, asked again until equal).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from . import scratch
from .sharded_checkpoint import shard_files_needed

log = logging.getLogger(__name__)


def folder(checkpoint_uri: str) -> Path:
    """Where this rank fetches checkpoint files: shared by the node's ranks when there are several."""
    key = hashlib.sha256(checkpoint_uri.encode()).hexdigest()[:12]
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        return scratch.node_shared("resume", key)
    return scratch.make("resume")


def agreed(uri: str | None, target: Path, needs: ckpt.Needs,
           gather: Callable[[int], list[int]]) -> ckpt.Verified | None:
    """The newest checkpoint every rank verified (`gather` collects one int from every rank)."""
    cap: int | None = None
    while True:
        found = ckpt.newest_verified(uri, target, needs, at_most=cap)
        steps = gather(found.step if found is not None else -1)
        if min(steps) == max(steps):
            return found
        cap = min(steps)
        log.warning("ranks verified different checkpoints (steps %s): all resume from step %d", steps, cap)
        if cap < 0:
            return None


def release(target: Path, local_main: bool) -> None:
    """After every rank has loaded (the caller's barrier): the node's first rank removes the folder."""
    if local_main:
        shutil.rmtree(target, ignore_errors=True)


def fsdp_needs(policy: Any, optimizer: Any) -> ckpt.Needs:
    """FSDP: of a checkpoint's sharded/ folder, .metadata and the DCP files of this rank's pieces."""
    needed = shard_files_needed(policy, optimizer)
    meta = f"{ckpt.SHARDED_DIR}/.metadata"

    def needs(found: ckpt.Verified) -> set[str]:
        found.fetch({meta})
        return {meta} | {f"{ckpt.SHARDED_DIR}/{name}" for name in needed(found.local / ckpt.SHARDED_DIR)}

    return needs
