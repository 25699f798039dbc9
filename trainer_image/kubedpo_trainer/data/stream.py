"""A stream of preference batches in a global order, each rank reading only its own rows.

Interface (what the loop and other features build on):
- `PreferenceStream(cfg, uri, tokenizer, rank, world, batch_size, accumulation=...)` for
  training; `for_eval(...)` for evaluation (file order, round-robin of rows over ranks).
- `batches(until_step, accumulation, start_step)` yields one `Group` per optimizer step:
  `accumulation` collated micro-batches of `batch_size` pairs each, tokenized ahead on a
  thread. `rows_for_step(epoch, step)` gives the raw rows of one global batch for this
  rank without tokenizing (for features that regroup rows, e.g. packing by tokens).
- `state_dict()` / `load_state_dict()` hold the exact position: epoch, global batches
  consumed in it, the global batch size, the seed and each shard's (URI, size, ETag).

Order (see order.py): a seeded block permutation plus a seeded window shuffle, independent
of the number of ranks; global batch i is the next G = batchSize x accumulation x world rows;
rank r takes its slice. Rows are located with the shard index (index.py) and fetched with
bounded ranged GETs, adjacent rows coalesced, a few requests in parallel; so bytes read per
rank per epoch are about dataset / world, and the first step needs only the index manifest
and the first batch's rows. Compressed JSONL is decoded by block from its start (index.py);
Parquet is read by row group (a rank reads every row group holding one of its rows).

Exact resume, also with another world size: the position is one number (global batches of
the epoch consumed) plus the epoch and seed; it continues exactly whenever G is unchanged
(2 ranks x batch 4 x accumulation 1 = 1 rank x batch 4 x accumulation 2 = 1 x 8 x 1). Any
other combination is refused (InputError, exit 2) rather than training rows twice or never.

Bad rows (onBadRecord=skip) become weight-0 copies of a good row of the same micro-batch
(row ids "pad:..."), so every rank's batches stay full and equal in number; they change
neither loss nor gradient, and exactly-once accounting ignores them.

Memory: the block table (rows / blockRows entries), one window permutation, the prefetch
queue, and bounded LRU caches of index blocks, decoded compressed blocks and Parquet row
groups; never a whole shard, never the whole index.

Why no DataLoader worker processes: the exact position must live in one process, and
tokenizing a batch takes milliseconds; one prefetch thread (plus a small pool for GETs)
hides it behind the accelerator's step.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..batch import Batch
from ..config import DataConfig
from ..errors import InputError
from .collate import collate
from .formats import BadRecord, parse_row
from .index import IndexStore, ShardIndex
from .order import GlobalOrder, slice_positions
from .rows import RowFetcher
from .sft import collate_sft, tokenize_sft_row
from .shards import list_shards
from .tokenize import DataStats, TokenizedRow, bos_prefix, tokenize_row

log = logging.getLogger(__name__)

STATE_VERSION = 3
RowKind = Literal["preference", "sft"]


def default_index_uri() -> str:
    """Node-local index cache (KUBEDPO_CACHE_DIR, as the model cache) when no prefix is configured."""
    base = os.environ.get("KUBEDPO_CACHE_DIR") or str(Path(tempfile.gettempdir()) / "kubedpo-cache")
    return str(Path(base) / "data-index")


@dataclass
class Group:
    """`gradientAccumulationSteps` batches forming one optimizer step."""

    batches: list[Batch]
    wait_seconds: float  # time the training thread waited for them: kubedpo_data_wait_seconds


@dataclass(frozen=True)
class RawRow:
    """One row of the global order as read: its id (`file:line`) and the parsed JSON (or BadRecord)."""

    position: int
    row_id: str
    raw: Any


class PreferenceStream:
    """The rows of `uri` for rank `rank` of `world`, as micro-batches of `batch_size` pairs."""

    def __init__(self, cfg: DataConfig, uri: str, tokenizer: Any, rank: int, world: int, batch_size: int,
                 shuffle: bool = True, prefetch: int = 4, accumulation: int = 1, index_uri: str | None = None,
                 barrier: Callable[[], None] = lambda: None, rows: RowKind = "preference") -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.cfg, self.uri, self.tokenizer = cfg, uri, tokenizer
        self.rank, self.world, self.batch_size, self.accumulation = rank, world, batch_size, accumulation
        self.shuffle, self.prefetch = shuffle, prefetch
        self.rows = rows  # preference pairs (dpo) or prompt+target rows (sft: data/sft.py)
        self.shards = list_shards(uri)
        self.index = IndexStore(index_uri or cfg.index_uri or default_index_uri(),
                                max_blocks=2 * (cfg.shuffle_buffer // cfg.block_rows) + 64)
        self._barrier = barrier
        self._entries: list[ShardIndex] | None = None
        self._order: GlobalOrder | None = None
        self._fetcher: RowFetcher | None = None
        self._epoch, self._steps = 0, 0  # position of the last consumed global batch
        self._consumed_stats = DataStats().totals()
        self._bos = bos_prefix(tokenizer)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def for_eval(cls, cfg: DataConfig, uri: str, tokenizer: Any, rank: int, world: int,
                 batch_size: int, rows: RowKind = "preference") -> PreferenceStream:
        return cls(cfg, uri, tokenizer, rank, world, batch_size, shuffle=False, rows=rows)

    # --- index and sizes --------------------------------------------------------------------

    def _ready(self) -> tuple[GlobalOrder, RowFetcher]:
        """Index (built in parallel over ranks on first use, then read) and the order over it."""
        if self._order is None or self._fetcher is None:
            self._entries = self.index.ensure(self.shards, self.rank, self.world, self._barrier)
            self._order = GlobalOrder([e.rows for e in self._entries], self.cfg.block_rows,
                                      self.cfg.shuffle_buffer, self.cfg.seed, self.shuffle)
            self._fetcher = RowFetcher(self._entries, self.index, self.cfg.block_rows)
        return self._order, self._fetcher

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world

    def rows_per_epoch(self) -> int:
        """Rows of all shards (bad ones included), from the index."""
        return self._ready()[0].total

    def steps_per_epoch(self) -> int:
        """Global batches per epoch: floor(rows / global batch size)."""
        return self.rows_per_epoch() // self.global_batch

    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch on every rank (equal on all ranks by construction)."""
        return self.steps_per_epoch() * self.accumulation

    @property
    def epoch(self) -> int:
        return self._epoch

    def epoch_progress(self) -> float:
        return self._epoch + self._steps / max(self.steps_per_epoch(), 1)

    # --- state ------------------------------------------------------------------------------

    @property
    def stats(self) -> DataStats:
        """Totals up to the last batch the trainer consumed (rows read ahead are not counted yet)."""
        return DataStats.from_totals(self._consumed_stats)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the last consumed global batch (data_state of a checkpoint)."""
        order, _ = self._ready()
        return {"version": STATE_VERSION, "rank": self.rank, "world": self.world, "batch_size": self.batch_size,
                "accumulation": self.accumulation, "global_batch": self.global_batch, "seed": self.cfg.seed,
                "block_rows": self.cfg.block_rows, "window": self.cfg.shuffle_buffer,
                "shards": [s.key() for s in self.shards], "epoch": self._epoch, "steps": self._steps,
                "fingerprint": order.fingerprint(self._epoch), "stats": dict(self._consumed_stats)}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue exactly after the global batch `state` was taken at; InputError if impossible.

        `state` is this rank's data state or every rank's of the checkpoint (needed when the
        world size changed: the counters of all old ranks are then carried by rank 0).
        """
        states = state if isinstance(state, list) else [state]
        s = states[0]
        if s.get("version") != STATE_VERSION:
            raise InputError(f"{self.uri}: data state version {s.get('version')} is not {STATE_VERSION} "
                             "(written by another trainer version); exact resume is impossible")
        self._check_layout(s)
        epoch, steps = int(s["epoch"]), int(s["steps"])
        changed = self._changed_shards(s["shards"])
        if changed:
            if self.cfg.on_data_change == "fail":
                raise InputError(f"{changed[0]}; exact resume is impossible (data changed since the checkpoint). "
                                 "Restore the data, or set data.onDataChange: newEpoch to start the next epoch "
                                 "on the new data" + (f" ({len(changed) - 1} more changes)" if len(changed) > 1 else ""))
            log.warning("data changed since the checkpoint (%s); data.onDataChange=newEpoch: starting epoch %d "
                        "on the new data", "; ".join(changed[:3]), epoch + 1)
            epoch, steps = epoch + 1, 0
        elif s.get("fingerprint") != self._ready()[0].fingerprint(epoch):
            raise InputError(f"{self.uri}: the epoch's order differs from the checkpoint's (another numpy or "
                             "trainer version?); exact resume is impossible")
        self._epoch, self._steps = epoch, steps
        if len(states) == 1 or s.get("world") == self.world:
            mine = next((x for x in states if x.get("rank") == self.rank), s)
            self._consumed_stats = {**DataStats().totals(), **mine.get("stats", {})}
        else:  # a new world size: rank 0 carries the old ranks' totals, so sums over ranks stay true
            totals = DataStats().totals()
            if self.rank == 0:
                for x in states:
                    for k, v in x.get("stats", {}).items():
                        totals[k] = totals.get(k, 0) + v
            self._consumed_stats = totals

    def _check_layout(self, s: dict[str, Any]) -> None:
        mine = {"global_batch": self.global_batch, "seed": self.cfg.seed, "block_rows": self.cfg.block_rows,
                "window": self.cfg.shuffle_buffer}
        theirs = {k: s.get(k) for k in mine}
        if theirs != mine:
            was = f"{s.get('batch_size')} x {s.get('accumulation')} x {s.get('world')}"
            now = f"{self.batch_size} x {self.accumulation} x {self.world}"
            raise InputError(
                f"{self.uri}: the checkpoint's data order was {theirs} (batchSize x gradientAccumulationSteps x "
                f"workers = {was}), this run has {mine} ({now}); exact resume needs the same global batch size, "
                "seed, blockRows and shuffleBuffer (change batchSize or gradientAccumulationSteps with the "
                "number of ranks so that their product stays the same)")

    def _changed_shards(self, saved: list[list[Any]]) -> list[str]:
        """What differs between the checkpoint's shards and the listed ones, each naming the shard."""
        now = {s.uri: (s.size, s.etag) for s in self.shards}
        was = {u: (int(n), e) for u, n, e in saved}
        out = []
        for u, (n, e) in was.items():
            if u not in now:
                out.append(f"{u}: shard removed")
            elif now[u] != (n, e):
                out.append(f"{u}: shard changed in place (size {n} -> {now[u][0]}, ETag {e} -> {now[u][1]})")
        out += [f"{u}: shard added" for u in now if u not in was]
        return out

    # --- rows -------------------------------------------------------------------------------

    def read_positions(self, epoch: int, positions: range | list[int]) -> list[RawRow]:
        """Raw rows at these epoch positions, fetched with ranged reads (in the given order)."""
        order, fetcher = self._ready()
        located = [order.locate(epoch, p) for p in positions]
        raws = fetcher.fetch(located)
        return [RawRow(p, rid, raw) for p, (rid, raw) in zip(positions, raws, strict=True)]

    def rows_for_step(self, epoch: int, step: int) -> list[RawRow]:
        """This rank's raw rows of global batch `step` of `epoch`: its slice, micro-batch by micro-batch."""
        return [r for m in range(self.accumulation) for r in self.read_positions(
            epoch, slice_positions(step, m, self.rank, self.world, self.batch_size, self.accumulation))]

    def _tokenize(self, row: RawRow, stats: DataStats, row_id: str | None = None) -> TokenizedRow | None:
        """The tokenized row, or None when it is bad and onBadRecord=skip (counted)."""
        try:
            if self.rows == "sft":
                return tokenize_sft_row(row.raw, row_id or row.row_id, self.tokenizer, self.cfg, stats, self._bos)
            parsed = parse_row(row.raw, self.cfg.format)
            return tokenize_row(parsed, row_id or row.row_id, self.tokenizer, self.cfg, stats, self._bos)
        except BadRecord as err:
            if self.cfg.on_bad_record == "fail":
                raise InputError(f"{row.row_id}: {err} (data.onBadRecord=fail; set skip to drop such rows)") from None
            stats.add(bad_records=1)
            return None

    def _micro_batch(self, rows: list[RawRow], epoch: int, stats: DataStats) -> Batch:
        toks = [(r, self._tokenize(r, stats)) for r in rows]
        good = [t for _, t in toks if t is not None]
        source = [r for r, t in toks if t is not None]
        pads = []
        for i in range(len(rows) - len(good)):
            source = source or self._any_good_row(epoch, rows[-1].position)
            r = source[i % len(source)]
            tok = self._tokenize(r, DataStats(), f"pad:{r.row_id}")
            assert tok is not None  # it tokenized before
            pads.append(replace(tok, margin=0.0, weight=0.0))
        return self._collate(good + pads)

    def _collate(self, rows: list[TokenizedRow]) -> Any:
        """(2B, T) pair batch (collate.py), or (B, T) for SFT rows (data/sft.py)."""
        return collate_sft(rows, self._pad_id) if self.rows == "sft" else collate(rows, self._pad_id)

    def _any_good_row(self, epoch: int, after: int) -> list[RawRow]:
        """A usable row to pad an all-bad micro-batch with: the next good one of the epoch's order."""
        total = self._ready()[0].total
        for k in range(1, total + 1):
            row = self.read_positions(epoch, [(after + k) % total])[0]
            if self._tokenize(row, DataStats()) is not None:
                return [row]
        raise InputError(f"{self.uri}: no usable rows at all (every row is bad)")

    # --- what the loop calls ----------------------------------------------------------------

    def _train_groups(self, epoch: int, step: int, stats: DataStats) -> Iterator[tuple[list[Batch], int, int, dict[str, int]]]:
        """(micro-batches of one global batch, epoch and steps after it, stats after it), forever."""
        per_epoch = self.steps_per_epoch()
        if per_epoch < 1:
            raise InputError(f"{self.uri}: {self.rows_per_epoch()} rows are too few for one global batch of "
                             f"{self.global_batch} (batchSize {self.batch_size} x accumulation "
                             f"{self.accumulation} x {self.world} ranks)")
        while True:
            while step < per_epoch:
                micro = [self._micro_batch(self.read_positions(epoch, slice_positions(
                    step, m, self.rank, self.world, self.batch_size, self.accumulation)), epoch, stats)
                    for m in range(self.accumulation)]
                step += 1
                yield micro, epoch, step, stats.totals()
            epoch, step = epoch + 1, 0

    def batches(self, until_step: int, accumulation: int, start_step: int = 0) -> Iterator[Group]:
        """Optimizer-step groups from `start_step` to `until_step`, read and tokenized ahead on a thread.

        Starts at the last consumed global batch (a fresh stream, a loaded state, or where a
        previous `batches()` call stopped), so calling it again never skips prefetched batches.
        """
        if accumulation != self.accumulation:
            raise ValueError(f"accumulation {accumulation} differs from the stream's {self.accumulation}")
        self._ready()
        q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        epoch, step, stats = self._epoch, self._steps, DataStats.from_totals(self._consumed_stats)
        if step >= self.steps_per_epoch():
            epoch, step = epoch + 1, 0

        def put(item: tuple[str, Any]) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in self._train_groups(epoch, step, stats):
                    if not put(("group", item)):
                        return
            except BaseException as err:  # re-raised on the training thread
                put(("error", err))

        thread = threading.Thread(target=produce, name="kubedpo-data-prefetch", daemon=True)
        thread.start()
        try:
            for _ in range(start_step, until_step):
                t0 = time.perf_counter()
                kind, item = q.get()
                if kind == "error":
                    raise item
                micro, self._epoch, self._steps, self._consumed_stats = item
                yield Group(micro, time.perf_counter() - t0)
        finally:
            stop.set()
            thread.join(timeout=1.0)  # it stops at its next put; never wait on a slow read

    def eval_batches(self, device: Any = None) -> Iterator[Batch]:
        """Every eval row of this rank once, in file order (row g goes to rank g % world), last
        partial batch kept.

        Ranks may yield different counts (evaluate() reduces sums, not per-batch collectives).
        `data.evalMaxRows` caps the rows over all ranks. Tensors stay on CPU (`device` is
        accepted for symmetry; the forward moves them).
        """
        total = self.rows_per_epoch()
        if self.cfg.eval_max_rows is not None:
            total = min(total, self.cfg.eval_max_rows)
        mine = range(self.rank, total, self.world)
        stats = DataStats()
        for i in range(0, len(mine), self.batch_size):
            rows = self.read_positions(0, mine[i:i + self.batch_size])
            good = [t for t in (self._tokenize(r, stats) for r in rows) if t is not None]
            if good:
                yield self._collate(good)

