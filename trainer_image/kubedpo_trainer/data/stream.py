"""A sharded, shuffled, prefetched stream of preference batches that resumes exactly.

Order: each epoch shuffles the shard order (seed + epoch); rows are read shard by shard and
the g-th row of the epoch (all ranks) goes to rank g % world. Round-robin of rows, not of
shards, works for any shard count: one shard and eight ranks, or 3 shards on 2 ranks. Each
rank shuffles its rows through a bounded buffer (seeded by seed, epoch and rank), so memory
is `shuffleBuffer` raw rows plus `prefetch` collated batches, whatever the data set's size.

Exact resume: the position (epoch, shard, row and byte offset inside it, batches yielded,
buffer RNG state) is snapshotted after every batch, and `state_dict()` returns the snapshot of
the last batch the *trainer consumed*, not of those the prefetch thread read ahead. The
buffer is stored as references `[shard, row, seek row, seek byte]`; loading re-reads just
those rows (plain JSONL from the byte where they start, gzip/Parquet by skipping), so the
JSON stays small and nothing is re-read from the data set's start.

Equal batch counts (or DDP hangs): every rank yields exactly floor(floor(rows / world) / B)
batches per epoch (`batches_per_epoch`), the same number on every rank because each rank has
at least floor(rows / world) rows; rows past that are not trained this epoch (drop_last; a
new shuffle next epoch drops others). A rank that lost rows to onBadRecord=skip fills its
last batch with weight-0 copies whose row ids start with "pad:": they change neither the
loss nor the gradient, and exactly-once accounting ignores them.

Why no DataLoader worker processes: the exact position must live in one process (worker
processes each hold part of it and resume only approximately), and tokenizing a batch takes
milliseconds; one prefetch thread hides it behind the accelerator's step.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

from .. import storage
from ..batch import Batch
from ..config import DataConfig
from ..errors import InputError
from .collate import collate
from .formats import SUFFIXES, BadRecord, count_rows, parse_row, read_rows, row_label
from .tokenize import DataStats, TokenizedRow, bos_prefix, tokenize_row

STATE_VERSION = 2


class Item(NamedTuple):
    """A raw row in the shuffle buffer; `ref` = (shard, row, seek row, seek byte or -1) re-reads it."""

    ref: tuple[int, int, int, int]
    row_id: str
    raw: Any


@dataclass
class Position:
    """Where this rank's stream is; advanced by the reader, snapshotted after every batch."""

    epoch: int = 0
    shard: int = 0  # index into this epoch's shard order
    row: int = 0  # next row index inside that shard
    byte: int | None = 0  # byte offset of `row` (plain JSONL); None: rows must be skipped
    global_row: int = 0  # rows of the epoch (all ranks) read so far
    batches: int = 0  # batches this rank yielded this epoch
    buffer: list[Item] = field(default_factory=list)
    last: list[Item] = field(default_factory=list)  # rows of the last batch: source of padding
    rng: list[Any] | None = None  # random.Random state of the buffer

    def copy(self) -> Position:
        return replace(self, buffer=list(self.buffer), last=list(self.last))

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["buffer"] = [list(i.ref) for i in self.buffer]
        d["last"] = [list(i.ref) for i in self.last]
        return d


@dataclass
class Group:
    """`gradientAccumulationSteps` batches forming one optimizer step."""

    batches: list[Batch]
    wait_seconds: float  # time the training thread waited for them: kubedpo_data_wait_seconds


class PreferenceStream:
    """The rows of `uri` for rank `rank` of `world`, as batches of `batch_size` pairs."""

    def __init__(self, cfg: DataConfig, uri: str, tokenizer: Any, rank: int, world: int, batch_size: int,
                 shuffle: bool = True, prefetch: int = 4) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.cfg, self.uri, self.tokenizer = cfg, uri, tokenizer
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.shuffle, self.prefetch = shuffle, prefetch
        self.shards = [o.uri for o in storage.list_objects(uri, SUFFIXES)]
        self.peak_buffered = 0  # most raw rows the shuffle buffer ever held (memory bound check)
        self._consumed = Position()
        self._consumed_stats = DataStats().totals()
        self._rows: int | None = None
        self._bos = bos_prefix(tokenizer)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def for_eval(cls, cfg: DataConfig, uri: str, tokenizer: Any, rank: int, world: int,
                 batch_size: int) -> PreferenceStream:
        return cls(cfg, uri, tokenizer, rank, world, batch_size, shuffle=False)

    # --- sizes ------------------------------------------------------------------------------

    def rows_per_epoch(self) -> int:
        """Rows of all shards (bad ones included): free for Parquet, one streaming pass for JSONL."""
        if self._rows is None:
            self._rows = sum(count_rows(s) for s in self.shards)
        return self._rows

    def batches_per_epoch(self) -> int:
        """The same on every rank: floor(floor(rows / world) / batch_size)."""
        return (self.rows_per_epoch() // self.world) // self.batch_size

    @property
    def epoch(self) -> int:
        return self._consumed.epoch

    def epoch_progress(self) -> float:
        return self._consumed.epoch + self._consumed.batches / max(self.batches_per_epoch(), 1)

    # --- state ------------------------------------------------------------------------------

    @property
    def stats(self) -> DataStats:
        """Totals up to the last batch the trainer consumed (rows read ahead are not counted yet)."""
        return DataStats.from_totals(self._consumed_stats)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the last consumed batch (data_state of a checkpoint)."""
        return {"version": STATE_VERSION, "rank": self.rank, "world": self.world, "batch_size": self.batch_size,
                "seed": self.cfg.seed, "shards": self.shards, "position": self._consumed.to_json(),
                "stats": dict(self._consumed_stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batch `state` was taken at; InputError if that is impossible."""
        if state.get("version") != STATE_VERSION:
            raise InputError(f"{self.uri}: data state version {state.get('version')} is not {STATE_VERSION}")
        if state.get("shards") != self.shards:
            raise InputError(f"{self.uri}: data changed since the checkpoint (the shard list differs); "
                             "exact resume is impossible")
        mine = {"rank": self.rank, "world": self.world, "batch_size": self.batch_size, "seed": self.cfg.seed}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise InputError(f"{self.uri}: the checkpoint's data state was written for {theirs}, this run "
                             f"has {mine}; exact resume needs the same")
        p = dict(state["position"])
        pos = Position(**{**p, "buffer": [], "last": []})
        pos.buffer = self._resolve(pos.epoch, p["buffer"])
        pos.last = self._resolve(pos.epoch, p["last"])
        self._consumed = pos
        self._consumed_stats = {**DataStats().totals(), **state.get("stats", {})}

    def _resolve(self, epoch: int, refs: list[list[int]]) -> list[Item]:
        """Re-read the rows behind buffer references: one pass per shard from its earliest ref."""
        order = self._shard_order(epoch)
        by_shard: dict[int, dict[int, tuple[int, int, int, int]]] = {}
        for r in refs:
            by_shard.setdefault(r[0], {})[r[1]] = (r[0], r[1], r[2], r[3])
        found: dict[tuple[int, int], Item] = {}
        for s, want in by_shard.items():
            uri = order[s]
            first = min(want.values(), key=lambda r: r[1])
            for idx, _, raw in read_rows(uri, first[2], None if first[3] < 0 else first[3]):
                ref = want.pop(idx, None)
                if ref is not None:
                    found[(s, idx)] = Item(ref, row_label(uri, idx), raw)
                if not want:
                    break
            if want:
                raise InputError(f"{uri}: rows {sorted(want)} named by the checkpoint's data state are "
                                 "gone; the data changed")
        return [found[(r[0], r[1])] for r in refs]

    # --- reading ----------------------------------------------------------------------------

    def _shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _my_raw_rows(self, pos: Position, limit: int | None = None) -> Iterator[Item]:
        """This rank's raw rows of the epoch from `pos`, advancing `pos` as rows are read."""
        order = self._shard_order(pos.epoch)
        while pos.shard < len(order):
            uri = order[pos.shard]
            for idx, byte_after, raw in read_rows(uri, pos.row, pos.byte):
                if limit is not None and pos.global_row >= limit:
                    return
                ref = (pos.shard, idx, pos.row, -1 if pos.byte is None else pos.byte)
                g = pos.global_row
                pos.global_row, pos.row = g + 1, idx + 1
                pos.byte = byte_after if byte_after >= 0 else None
                if g % self.world == self.rank:
                    yield Item(ref, row_label(uri, idx), raw)
            pos.shard, pos.row, pos.byte = pos.shard + 1, 0, 0

    def _shuffled(self, pos: Position, limit: int | None = None) -> Iterator[Item]:
        """Bounded shuffle buffer over this rank's rows; its contents and RNG live in `pos`."""
        rng = random.Random(self.cfg.seed + 7919 * pos.epoch + 104_729 * self.rank)
        if pos.rng is not None:
            v, internal, gauss = pos.rng
            rng.setstate((v, tuple(internal), gauss))
        size = self.cfg.shuffle_buffer if self.shuffle else 1
        source = self._my_raw_rows(pos, limit)
        exhausted = False
        while True:
            while not exhausted and len(pos.buffer) < size:
                item = next(source, None)
                if item is None:
                    exhausted = True
                else:
                    pos.buffer.append(item)
            self.peak_buffered = max(self.peak_buffered, len(pos.buffer))
            if not pos.buffer:
                return
            i = rng.randrange(len(pos.buffer))
            pos.buffer[i], pos.buffer[-1] = pos.buffer[-1], pos.buffer[i]
            item = pos.buffer.pop()
            v, internal, gauss = rng.getstate()
            pos.rng = [v, list(internal), gauss]
            yield item

    def _tokenize(self, item: Item, stats: DataStats, row_id: str | None = None) -> TokenizedRow | None:
        """The tokenized row, or None when it is bad and onBadRecord=skip (counted)."""
        try:
            row = parse_row(item.raw, self.cfg.format)
            return tokenize_row(row, row_id or item.row_id, self.tokenizer, self.cfg, stats, self._bos)
        except BadRecord as err:
            if self.cfg.on_bad_record == "fail":
                raise InputError(f"{item.row_id}: {err} (data.onBadRecord=fail; set skip to drop such rows)") from None
            stats.add(bad_records=1)
            return None

    def _train_batches(self, pos: Position, stats: DataStats) -> Iterator[tuple[Batch, Position, dict[str, int]]]:
        """(batch, position after it, stats after it) forever, epoch after epoch, equal counts per rank."""
        nb = self.batches_per_epoch()
        if nb < 1:
            raise InputError(f"{self.uri}: {self.rows_per_epoch()} rows are too few for one batch of "
                             f"{self.batch_size} on each of {self.world} ranks")
        while True:
            rows_iter = self._shuffled(pos)
            while pos.batches < nb:
                rows: list[TokenizedRow] = []
                taken: list[Item] = []
                for item in rows_iter:
                    tok = self._tokenize(item, stats)
                    if tok is not None:
                        rows.append(tok)
                        taken.append(item)
                        if len(rows) == self.batch_size:
                            break
                rows += self._padding(taken or pos.last, self.batch_size - len(rows))
                pos.batches += 1
                pos.last = taken or pos.last
                yield collate(rows, self._pad_id), pos.copy(), stats.totals()
            pos.epoch, pos.shard, pos.row, pos.byte, pos.global_row, pos.batches = pos.epoch + 1, 0, 0, 0, 0, 0
            pos.buffer, pos.last, pos.rng = [], [], None

    def _padding(self, source: list[Item], missing: int) -> list[TokenizedRow]:
        """Weight-0 copies of good rows so every rank yields full, equally many batches."""
        if missing <= 0:
            return []
        if not source:
            raise InputError(f"{self.uri}: rank {self.rank} has no usable rows this epoch")
        out = []
        for i in range(missing):
            item = source[i % len(source)]
            tok = self._tokenize(item, DataStats(), row_id=f"pad:{item.row_id}")
            assert tok is not None  # it tokenized before
            out.append(replace(tok, margin=0.0, weight=0.0))
        return out

    # --- what the loop calls ----------------------------------------------------------------

    def batches(self, until_step: int, accumulation: int, start_step: int = 0) -> Iterator[Group]:
        """Optimizer-step groups from `start_step` to `until_step`, tokenized ahead on a thread.

        Starts at the last consumed batch (a fresh stream, a loaded state, or where a previous
        `batches()` call stopped), so calling it again never skips prefetched batches.
        """
        q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        pos, stats = self._consumed.copy(), DataStats.from_totals(self._consumed_stats)

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
                for item in self._train_batches(pos, stats):
                    if not put(("batch", item)):
                        return
            except BaseException as err:  # re-raised on the training thread
                put(("error", err))

        thread = threading.Thread(target=produce, name="kubedpo-data-prefetch", daemon=True)
        thread.start()
        try:
            for _ in range(start_step, until_step):
                t0 = time.perf_counter()
                group = []
                for _ in range(accumulation):
                    kind, item = q.get()
                    if kind == "error":
                        raise item
                    batch, self._consumed, self._consumed_stats = item
                    group.append(batch)
                yield Group(group, time.perf_counter() - t0)
        finally:
            stop.set()
            thread.join(timeout=1.0)  # it stops at its next put; never wait on a slow read

    def eval_batches(self, device: Any = None) -> Iterator[Batch]:
        """Every eval row of this rank once, in file order, last partial batch kept.

        Ranks may yield different counts (evaluate() reduces sums, not per-batch collectives).
        `data.evalMaxRows` caps the rows over all ranks. Tensors stay on CPU (`device` is
        accepted for symmetry; the forward moves them).
        """
        pos, stats = Position(), DataStats()
        rows: list[TokenizedRow] = []
        for item in self._shuffled(pos, limit=self.cfg.eval_max_rows):
            tok = self._tokenize(item, stats)
            if tok is not None:
                rows.append(tok)
            if len(rows) == self.batch_size:
                yield collate(rows, self._pad_id)
                rows = []
        if rows:
            yield collate(rows, self._pad_id)
