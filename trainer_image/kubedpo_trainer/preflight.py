"""Every URI of the config checked at start, before any download and before step 1.

Without this, a missing `data.eval` prefix surfaced at the first evaluation and an output bucket
that does not exist after the whole run, the GPU hours spent. Each rank checks (a handful of
LIST/HEAD requests; no collective is needed, so every pod exits 2 on its own, naming the field):

| what | fields | check |
|---|---|---|
| read: models | model.uri, referenceUri (when a reference is loaded), tokenizerUri, judge.rewardModel.uri | S3: an object under the prefix; local: the path exists; hf:// is not checked (no hub call at start) |
| read: data | data.train, data.eval, judge.generations, judge.compare | at least one data shard (data.shards' rules: an odd suffix is refused here too) or, for generations, any object |
| write | output.uri, checkpoint.uri, data.indexUri, training.referenceCacheUri (precompute only), judge.cacheUri | S3: the bucket exists (HeadBucket; a bucket the credentials may not see is access denied, exit 2 too); local: the folder can be created and written |

All problems are reported together, one per field, as an InputError (exit 2, never retried):
the fix is in the manifest, not in a restart.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from . import storage
from .config import LossType, TrainerConfig
from .errors import InputError
from .uris import is_hub

log = logging.getLogger(__name__)


def _read_model(uri: str) -> str | None:
    if is_hub(uri):
        return None  # the hub is asked only when the model loads (HF_HUB_OFFLINE etc. apply there)
    if storage.is_s3(uri):
        return None if storage.exists(uri) else "no objects under this prefix (a model folder is expected)"
    local = Path(uri.removeprefix("file://"))
    return None if local.exists() else f"no such folder {local.resolve()} (a Hugging Face hub model is " \
                                       "written hf://org/name)"


def _read_data(uri: str) -> str | None:
    from .data.shards import list_shards  # here: the data package imports torch, a judge task needs none

    list_shards(uri)  # raises InputError naming the URI: nothing there, or an unsupported object
    return None


def _read_any(uri: str) -> str | None:
    return None if storage.exists(uri) else "no such prefix or file"


def _write(uri: str) -> str | None:
    if storage.is_s3(uri):
        bucket = uri.removeprefix("s3://").split("/", 1)[0]
        return None if storage.bucket_exists(uri) else f"the bucket {bucket!r} does not exist"
    folder = Path(uri.removeprefix("file://"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the folder {folder.resolve()}: {err.strerror}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder.resolve()} is not writable"
    return None


def _checks(cfg: TrainerConfig) -> Iterator[tuple[str, str | None, str]]:
    """(field, uri, kind) of every URI this task will use; kind is read-model, read-data, read-any or write."""
    m, d, t = cfg.model, cfg.data, cfg.training
    if cfg.task == "judge":
        j = cfg.judge
        assert j is not None  # the schema requires it with task judge
        yield "judge.generations", j.generations, "read-any"
        for name, prefixes in (j.compare or {}).items():
            for i, p in enumerate(prefixes):
                yield f"judge.compare.{name}[{i}]", p, "read-any"
        if j.reward_model is not None:
            yield "judge.rewardModel.uri", j.reward_model.uri, "read-model"
        yield "judge.cacheUri", j.cache_uri, "write"
        yield "output.uri", cfg.output.uri, "write"
        return
    yield "model.uri", m.uri, "read-model"
    uses_reference = cfg.task == "dpo" and m.lora is None and t.loss != LossType.simpo.value
    if uses_reference:
        yield "model.referenceUri", m.reference_uri, "read-model"
    yield "model.tokenizerUri", m.tokenizer_uri, "read-model"
    yield "data.train", d.train, "read-data"
    yield "data.eval", d.eval, "read-data"
    yield "output.uri", cfg.output.uri, "write"
    if cfg.task == "generate":
        return
    yield "checkpoint.uri", cfg.checkpoint.uri, "write"
    yield "data.indexUri", d.index_uri, "write"
    if t.reference_logps == "precompute":
        yield "training.referenceCacheUri", t.reference_cache_uri, "write"


_CHECK = {"read-model": _read_model, "read-data": _read_data, "read-any": _read_any, "write": _write}


def problems(cfg: TrainerConfig) -> list[str]:
    """One line per unusable URI, `field: uri: why`; empty when every URI is usable."""
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    for field, uri, kind in _checks(cfg):
        if not uri or (uri, kind) in seen:
            continue
        seen.add((uri, kind))
        try:
            why = _CHECK[kind](uri)
        except InputError as err:  # storage's own message already names the URI
            out.append(f"{field}: {err}")
            continue
        if why:
            out.append(f"{field}: {uri}: {why}")
    return out


def check(cfg: TrainerConfig) -> None:
    """Raise InputError (exit 2) listing every unusable URI; S3 must be configured first.

    A store that cannot be reached after retries is a StorageError (exit 1, a gang restart), as
    anywhere else: a restart may find it back, a missing bucket it will not.
    """
    found = problems(cfg)
    if found:
        raise InputError("checked at start, before any download or training step: " + "; ".join(found))
    log.info("preflight: every URI of the config is usable")
