"""Precomputed reference log-probs that survive restarts, epochs and iterative rounds.

`training.referenceLogps: precompute` runs the reference once over the train and eval rows. The
table (stable row id -> chosen, rejected log-prob) is kept under
`<referenceCacheUri or checkpoint.uri/reference-cache>/<split>-<key>/`:

- the key hashes what the numbers depend on: the reference model's files (S3 ETags or local
  mtimes, with sizes), the tokenizer's, the data shards' (uri, size, version), the truncation
  and format settings, and the reference's precision. Change any of them and a fresh table is
  built; keep them (a restarted attempt, a second epoch, round 2 of iterative DPO with a fixed
  reference and a shared `referenceCacheUri`) and the rows are read back, not recomputed;
- rows are keyed by their stable id ("<shard uri>:<line>"), not by rank position, so any number
  of ranks (a different one after a restart too) reads and extends the same table;
- each rank writes what it computed every `FLUSH_ROWS` rows as its own part object (unique
  names, so ranks and attempts never overwrite each other): a killed precompute resumes from
  the parts already written; when every row is present, rank 0 writes one `table.json.gz` and
  removes the parts.

The forward uses packing (and the shared prompt) when `training.packing` is set.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from . import storage
from .config import TrainerConfig
from .data.collate import collate
from .data.packing import pack, rows_from_batch, split_by_budget
from .data.stream import PreferenceStream
from .data.tokenize import TokenizedRow
from .errors import InputError
from .packed_forward import packed_forward, row_tokens
from .precision import resolve_precision
from .reference import Reference

log = logging.getLogger(__name__)

CACHE_VERSION = 1
FLUSH_ROWS = 4096
TABLE = "table.json.gz"
Table = dict[str, tuple[float, float]]


def cache_root(cfg: TrainerConfig) -> str | None:
    if cfg.training.reference_cache_uri:
        return cfg.training.reference_cache_uri
    return storage.join(cfg.checkpoint.uri, "reference-cache") if cfg.checkpoint.uri else None


def _fingerprint(uri: str) -> list[Any]:
    """Files and versions of a model, tokenizer or data location (a hub id is its own name)."""
    try:
        found = storage.versions(uri)
    except InputError:
        found = []
    base = uri.rstrip("/")
    return [[v[0].removeprefix(base), v[1], v[2]] for v in found] or [uri]


def cache_key(cfg: TrainerConfig, split_uri: str) -> dict[str, Any]:
    """Everything the reference log-probs of `split_uri`'s rows depend on (JSON, hashed for the name)."""
    m, d, t = cfg.model, cfg.data, cfg.training
    reference = m.uri if m.lora else (m.reference_uri or m.uri)
    return {
        "version": CACHE_VERSION,
        "reference": {"uri": reference, "files": _fingerprint(reference)},
        "tokenizer": {"uri": m.tokenizer_uri or m.uri, "files": _fingerprint(m.tokenizer_uri or m.uri)},
        "data": {"uri": split_uri, "files": _fingerprint(split_uri)},
        "tokenization": {"format": d.format, "maxLength": d.max_length, "maxPromptLength": d.max_prompt_length,
                         "truncationSide": d.truncation_side},
        "precision": {"dtype": m.dtype, "precision": resolve_precision(t.precision, "cuda" if torch.cuda.is_available() else "cpu")},
    }


def key_folder(root: str, split: str, key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return storage.join(root, f"{split}-{digest}")


def load_table(folder: str) -> Table:
    """Every row written so far: the final table, or the parts a (killed) precompute left."""
    if not storage.exists(folder):
        return {}
    table: Table = {}
    for obj in storage.list_objects(folder + "/", (".json.gz",)):
        rows = json.loads(gzip.decompress(storage.read_bytes(obj.uri)))
        table.update({k: (float(v[0]), float(v[1])) for k, v in rows.items()})
    return table


def _write(uri: str, rows: Table) -> None:
    storage.write_bytes(uri, gzip.compress(json.dumps(rows, separators=(",", ":")).encode(), 3))


class _PartWriter:
    """This process's new rows, written every FLUSH_ROWS rows as parts/<unique>-<n>.json.gz."""

    def __init__(self, folder: str | None) -> None:
        self.folder, self.token, self.n = folder, uuid.uuid4().hex[:12], 0
        self.pending: Table = {}
        self.written: Table = {}

    def add(self, rows: Table) -> None:
        self.pending.update(rows)
        if len(self.pending) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.folder:
            _write(storage.join(self.folder, "parts", f"{self.token}-{self.n:05d}.json.gz"), self.pending)
            self.n += 1
        self.written.update(self.pending)
        self.pending = {}


def _chunks(cfg: TrainerConfig, rows: list[TokenizedRow]) -> Iterator[list[TokenizedRow]]:
    pk = cfg.training.packing
    if pk is None:
        b = cfg.training.batch_size
        yield from (rows[i:i + b] for i in range(0, len(rows), b))
        return
    for chunk in split_by_budget(rows, pk.max_tokens, pk.share_prompt):
        yield [rows[i] for i in chunk]


def _forward(cfg: TrainerConfig, acc: Accelerator, models: Any, chunk: list[TokenizedRow], pad: int) -> Table:
    """One reference forward over one micro-batch of rows."""
    pk = cfg.training.packing
    with acc.autocast():
        if pk is None:
            ref = models.reference_logps(collate(chunk, pad))
        else:
            with models.reference_context() as model:
                length = row_tokens(model, pk.row_tokens, pk.max_tokens, cfg.data.max_length)
                ref = packed_forward(model, pack(chunk, pad, pk.share_prompt, length))
    return {r.row_id: (c, j) for r, c, j in zip(chunk, ref.chosen_logps.tolist(), ref.rejected_logps.tolist(),
                                                strict=True)}


def _pending_chunks(cfg: TrainerConfig, rows: Iterator[TokenizedRow], cached: Table,
                    counts: dict[str, int]) -> Iterator[list[TokenizedRow]]:
    """This rank's rows the cache lacks, as forward-sized micro-batches (a token budget under packing)."""
    budget = cfg.training.packing.max_tokens if cfg.training.packing else None
    pending: list[TokenizedRow] = []
    tokens = 0
    for row in rows:
        if row.row_id in cached:
            counts["reused"] += 1
            continue
        pending.append(row)
        tokens += 2 * len(row.prompt_ids) + len(row.chosen_ids) + len(row.rejected_ids)
        if (tokens >= budget) if budget else len(pending) >= cfg.training.batch_size:
            yield from _chunks(cfg, pending)
            pending, tokens = [], 0
    if pending:
        yield from _chunks(cfg, pending)


def _in_lockstep(acc: Accelerator, chunks: Iterator[list[TokenizedRow]]) -> Iterator[tuple[list[TokenizedRow], bool]]:
    """(chunk, real) with the same number of forwards on every rank.

    A sharded (FSDP2) reference gathers its weights inside every forward, so a rank that runs one
    forward fewer than its peers (its rows were cached, or its share is smaller) hangs them all. Each
    round the ranks agree whether anyone still has work; one that has none repeats a forward that
    is thrown away (its last chunk, or a one-token dummy row if it never had one). Without FSDP the
    forwards are local and nothing is exchanged."""
    if acc.distributed_type != DistributedType.FSDP:
        yield from ((c, True) for c in chunks)
        return
    last: list[TokenizedRow] | None = None
    while True:
        chunk = next(chunks, None)
        flag = torch.tensor([0.0 if chunk is None else 1.0], device=acc.device)
        if acc.reduce(flag, reduction="sum").item() == 0:
            return
        if chunk is not None:
            last = chunk
            yield chunk, True
        else:
            yield (last or [TokenizedRow("padding", [0], [0], [0], 0.0, 0.0)]), False


def _split_rows(cfg: TrainerConfig, acc: Accelerator, tokenizer: Any, uri: str, split: str) -> Iterator[TokenizedRow]:
    # The train split is precomputed whole: evalMaxRows limits evaluation, not training rows.
    data = cfg.data if split == "eval" else cfg.data.model_copy(update={"eval_max_rows": None})
    stream = PreferenceStream.for_eval(data, uri, tokenizer, acc.process_index, acc.num_processes,
                                       cfg.training.batch_size)
    for batch in stream.eval_batches():
        yield from rows_from_batch(batch)


@torch.no_grad()
def precompute(cfg: TrainerConfig, acc: Accelerator, models: Any, tokenizer: Any) -> Reference:
    """The reference table for every train and eval row: read from the cache, the rest computed."""
    root = cache_root(cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    merged: Table = {}
    for split, uri in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if not uri:
            continue
        folder = key_folder(root, split, cache_key(cfg, uri)) if root else None
        cached = load_table(folder) if folder else {}
        writer = _PartWriter(folder)
        counts = {"reused": 0}
        chunks = _pending_chunks(cfg, _split_rows(cfg, acc, tokenizer, uri, split), cached, counts)
        for chunk, real in _in_lockstep(acc, chunks):
            out = _forward(cfg, acc, models, chunk, pad)
            if real:
                writer.add(out)
        writer.flush()
        totals = gather_object([(counts["reused"], len(writer.written))])
        new: Table = {}
        for part in gather_object([writer.written]):
            new.update(part)
        table = {**cached, **new}
        merged.update(table)
        log.info("reference log-probs for %s: %d rows reused from the cache, %d computed%s", uri,
                 sum(c[0] for c in totals), sum(c[1] for c in totals), f" ({folder})" if folder else "")
        if folder and new and acc.is_main_process:
            _write(storage.join(folder, TABLE), table)  # one object for the next reader
            storage.write_bytes(storage.join(folder, "key.json"), json.dumps(cache_key(cfg, uri), indent=1).encode())
            storage.delete_prefix(storage.join(folder, "parts"))
        acc.wait_for_everyone()
    if not models.is_lora:
        models.release_reference()
    log.info("precomputed reference log-probs for %d rows", len(merged))
    return Reference(models, merged)
