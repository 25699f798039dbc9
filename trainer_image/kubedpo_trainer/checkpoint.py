"""Checkpoints that are either complete or ignored, uploaded off the training loop's path.

Layout of one checkpoint (DESIGN.md):
    <checkpoint.uri>/step-000500/
        model.safetensors | adapter_model.safetensors   trainable weights (LoRA: the adapter only), rank 0
        optimizer.pt                                    rank 0
        sharded/                                        instead of the two above under FSDP: every rank's
                                                        shards of both (sharded_checkpoint.py, DCP)
        scheduler.pt, trainer_state.json                rank 0
        rng-rank<r>.pt, data-rank<r>.json              every rank (its RNG and exact stream position)
        rank-<r>.done                                  rank r's files are all uploaded: their sizes and SHA-256
        COMPLETE                                       written last, by rank 0, after every rank-<r>.done:
                                                       the manifest of every file (checkpoint_manifest.py)

Why markers instead of a collective barrier: uploads run in a background thread per rank, and
a barrier from a background thread would interleave with the loop's own collectives. Rank 0's
uploader instead waits until every rank's marker is visible, then writes COMPLETE. A checkpoint
without COMPLETE (a pod killed mid-upload) is never resumed from, and one whose files no longer
match COMPLETE's sizes and SHA-256 (truncated, deleted, overwritten) is skipped with a warning for
the newest one that does (`newest_verified`). State files load with `torch.load(weights_only=True)`:
whoever can write the checkpoint prefix must not be able to run code in the trainer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import checkpoint_manifest as manifest
from . import storage
from .config import CHECKPOINT_STEP_PREFIX, checkpoint_step_name
from .errors import InputError, StorageError
from .model_kinds import is_peft

log = logging.getLogger(__name__)

# --- the layout: every name in a checkpoint, for the writer and the reader alike -------------

COMPLETE = "COMPLETE"
SHARDED_DIR = "sharded"  # under FSDP: model + optimizer shards as a torch.distributed.checkpoint folder
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
TRAINER_STATE = "trainer_state.json"
_STEP_RE = re.compile(rf"{re.escape(CHECKPOINT_STEP_PREFIX)}(\d+)/{COMPLETE}$")
_ANY_STEP_RE = re.compile(rf"{re.escape(CHECKPOINT_STEP_PREFIX)}(\d+)/")


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def data_file(rank: int) -> str:
    return f"data-rank{rank}.json"


def done_marker(rank: int) -> str:
    return f"rank-{rank}.done"


def step_dir(uri: str, step: int) -> str:
    return storage.join(uri, checkpoint_step_name(step))


# --- the formats: a writer for the Snapshot and the matching reader --------------------------


def torch_file(obj: Any) -> Callable[[Path], None]:
    return lambda path: torch.save(obj, path)


def json_file(obj: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(obj))

    return write


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _steps(uri: str, pattern: re.Pattern[str]) -> list[int]:
    try:
        objects = storage.list_objects(uri)
    except InputError:
        return []  # no prefix yet: no checkpoints
    found = (pattern.search(o.uri) for o in objects)
    return sorted({int(m.group(1)) for m in found if m})


def complete_steps(uri: str) -> list[int]:
    """Steps under `uri` that have a COMPLETE marker, ascending."""
    return _steps(uri, _STEP_RE)


def all_steps(uri: str) -> list[int]:
    """Every step with any object under `uri`, complete or not."""
    return _steps(uri, _ANY_STEP_RE)


def latest_complete(uri: str | None) -> int | None:
    if not uri:
        return None
    steps = complete_steps(uri)
    return steps[-1] if steps else None


# --- choosing what to resume from -------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """A complete checkpoint whose listing matches its COMPLETE manifest; files are fetched to
    `local` on demand (`fetch`), each verified against the manifest as it arrives."""

    step: int
    uri: str
    local: Path
    files: manifest.Files | None  # None: written before manifests (not verifiable, used as is)

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds `name` (a file, or a folder such as `sharded`)."""
        if self.files is None:
            return (self.local / name).exists()
        return name in self.files or any(f.startswith(name + "/") for f in self.files)

    def fetch(self, names: set[str]) -> None:
        """Make `names` available under `local`, downloading each at most once per folder.

        The local ranks of a node share `local`: per file, the first to take its lock downloads it to
        a temporary name, checks size and SHA-256 against COMPLETE, then renames it, so a file under
        its own name is always a verified one and the others only wait for the lock. A download that
        fails verification is deleted and raises Damaged. Local checkpoints are read in place.
        """
        if self.files is None:
            return  # downloaded whole by newest_verified (nothing to check against)
        for name in sorted(names):
            target = self.local / name
            if not storage.is_s3(self.uri):
                manifest.check_local(self.local, self.files, only={name})
                continue
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(self.local / f".{name.replace('/', '_')}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if target.exists():
                    continue
                part = target.with_name(f".{target.name}.{os.getpid()}.part")
                storage.download_file(storage.join(self.uri, name), part)
                try:
                    manifest.check_local(part.parent, {part.name: self.files[name]})
                except manifest.Damaged as err:
                    part.unlink(missing_ok=True)
                    raise manifest.Damaged(str(err).replace(part.name, name, 1)) from None
                part.replace(target)


Needs = Callable[[Verified], set[str]]


def newest_verified(uri: str | None, scratch: Path, needs: Needs | None = None,
                    at_most: int | None = None) -> Verified | None:
    """The newest complete checkpoint under `uri` (at most step `at_most`) that passes verification.

    Every file of the manifest must be listed with its recorded size (no bytes read); the files
    this rank `needs` (default: all) are fetched into `scratch` and their SHA-256 checked. A
    damaged checkpoint is skipped with a warning naming it and what is wrong, so a restart resumes
    from the next older one instead of failing on every attempt. None: no checkpoint at all.
    Every complete checkpoint damaged is an InputError listing them (never a silent fresh start
    that would throw the run's progress away). Ranks that fetch different files may see different
    damage: the caller agrees on one step across ranks (`at_most` is how it asks again).
    """
    if not uri:
        return None
    skipped: list[str] = []
    for step in reversed(complete_steps(uri)):
        if at_most is not None and step > at_most:
            continue
        d = step_dir(uri, step)
        local = scratch / checkpoint_step_name(step) if storage.is_s3(d) else Path(d.removeprefix("file://"))
        try:
            files = manifest.parse_complete(storage.read_bytes(storage.join(d, COMPLETE)), COMPLETE)
            if files is None:
                log.warning("checkpoint %s has no manifest (written by an older trainer): not verified", d)
                local = storage.download_dir(d, local)
            else:
                manifest.check_listing(d, files)
            found = Verified(step, d, local, files)
            found.fetch(needs(found) if needs is not None and files is not None else set(files or ()))
        except manifest.Damaged as err:
            log.warning("checkpoint %s fails verification, skipped: %s", d, err)
            skipped.append(f"{d}: {err}")
            continue
        if skipped:
            log.warning("resuming from %s, the newest checkpoint that passes verification", d)
        return found
    if skipped:
        raise InputError(f"{uri}: no checkpoint passes verification ({'; '.join(skipped)}); "
                         "delete the damaged ones to start over")
    return None


def rank_needs(rank: int, sharded: Callable[[Verified], set[str]] | None = None) -> Needs:
    """What one rank reads at resume: every file but other ranks' RNG states; under FSDP, of the
    `sharded/` folder only what `sharded` says (DCP's metadata and the shard files of its pieces)."""
    def needs(found: Verified) -> set[str]:
        files = set(found.files or ())
        out = {f for f in files if not f.startswith((SHARDED_DIR + "/", "rng-rank"))}
        out |= {rng_file(rank)} & files
        if any(f.startswith(SHARDED_DIR + "/") for f in files):
            out |= sharded(found) if sharded is not None else {f for f in files if f.startswith(SHARDED_DIR + "/")}
        return out

    return needs


def load_torch(path: Path) -> Any:
    """A torch.save'd state (optimizer, scheduler, RNG): tensors and plain containers only.

    weights_only=True: unpickling arbitrary objects would let whoever can write the checkpoint
    prefix run code here.
    """
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle's errors are many; all mean "not loadable safely"
        raise InputError(f"{path.name}: not loadable as plain tensors and containers "
                         f"(torch.load weights_only=True): {err}") from None


# --- model weights: the trainable part only ------------------------------------------------


def weights_file(model: torch.nn.Module) -> str:
    return "adapter_model.safetensors" if is_peft(model) else "model.safetensors"


def trainable_state(model: torch.nn.Module, full: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """LoRA: the adapter weights alone (MBs, not the GBs of a frozen base). Full: every weight.

    `full`: the model's state dict already gathered (FSDP: `accelerator.get_state_dict`), instead
    of `model.state_dict()`, which would hold only this rank's shards.
    Tied weights (embeddings/head) are stored once: safetensors refuses shared storage.
    """
    if is_peft(model):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, state_dict=full)
    else:
        state = model.state_dict() if full is None else full
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_trainable_state(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file(state, str(path))


def load_trainable_state(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    real_missing = [k for k in missing if k not in tied]
    if real_missing or unexpected:
        raise InputError(f"{path}: checkpoint does not match the model: missing {real_missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


# --- RNG ------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    # numpy's state holds an ndarray: stored as a list of ints so weights_only=True loads it.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing ----------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What one rank contributes to a checkpoint, already copied off the GPU."""

    step: int
    rank: int
    files: dict[str, Callable[[Path], None]]  # file name -> writer into that path


class CheckpointWriter:
    """Saves locally on the loop's thread, uploads and marks COMPLETE on a background thread.

    One upload in flight at a time: a second save waits for the first, so a slow store slows
    checkpointing down but never piles up copies on local disk.
    """

    def __init__(
        self,
        uri: str,
        rank: int,
        world_size: int,
        keep_last: int,
        staging: Path,
        background: bool = True,
        marker_timeout_s: float = 600.0,
        on_complete: Callable[[int], None] | None = None,
    ) -> None:
        self.uri, self.rank, self.world_size, self.keep_last = uri, rank, world_size, keep_last
        self.staging = staging / f"rank{rank}"
        self.background = background
        self.marker_timeout_s = marker_timeout_s
        self.on_complete = on_complete  # rank 0, once COMPLETE is written: only then may anyone resume from it
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, snap: Snapshot, wait: bool = False) -> float:
        """Write `snap` locally, start its upload; returns seconds the caller was blocked."""
        t0 = time.perf_counter()
        self.wait()
        local = self.staging / checkpoint_step_name(snap.step)
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        for name, write in snap.files.items():
            write(local / name)
        if self.background and not wait:
            self._thread = threading.Thread(
                target=self._upload_guarded, args=(snap.step, local), name="ckpt-upload", daemon=True
            )
            self._thread.start()
        else:
            self._upload(snap.step, local)
        return time.perf_counter() - t0

    def wait(self) -> None:
        """Block until the upload in flight is done; re-raise its failure on the loop's thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise StorageError(f"checkpoint upload to {self.uri} failed: {err}") from err

    def _upload_guarded(self, step: int, local: Path) -> None:
        try:
            self._upload(step, local)
        except BaseException as err:  # surfaced by wait() on the training thread
            self._error = err

    def _upload(self, step: int, local: Path) -> None:
        dest = step_dir(self.uri, step)
        mine = manifest.digest_dir(local)  # hashed here, on the upload thread: the loop never waits
        storage.upload_dir(local, dest)
        storage.write_bytes(storage.join(dest, done_marker(self.rank)), json.dumps(mine).encode())
        if self.rank == 0:
            files = manifest.merge([mine, *self._await_ranks(dest)])
            storage.write_bytes(storage.join(dest, COMPLETE), manifest.complete_record(step, files))
            log.info("checkpoint complete: %s", dest)
            if self.on_complete is not None:
                self.on_complete(step)
            self._prune()
        shutil.rmtree(local, ignore_errors=True)

    def _await_ranks(self, dest: str) -> list[manifest.Files]:
        """Every other rank's file digests, read from its marker once it is there."""
        deadline = time.monotonic() + self.marker_timeout_s
        parts = []
        for r in range(1, self.world_size):
            marker = storage.join(dest, done_marker(r))
            while not storage.exists(marker):
                if time.monotonic() > deadline:
                    raise StorageError(f"{dest}: rank {r} never finished uploading its part")
                time.sleep(0.1)
            parts.append(json.loads(storage.read_bytes(marker)))
        return parts

    def _prune(self) -> None:
        """Keep the newest keepLast complete checkpoints; drop older ones and dead partial uploads
        (a step dir without COMPLETE older than the newest complete one can never complete)."""
        complete = complete_steps(self.uri)
        keep = set(complete[-self.keep_last :])
        for step in all_steps(self.uri):
            if step not in keep and step < complete[-1]:
                storage.delete_prefix(step_dir(self.uri, step))
