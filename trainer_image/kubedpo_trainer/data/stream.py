"""A sharded, shuffled, prefetched stream of preference batches that resumes exactly.

Order: each epoch shuffles the shard order (seed + epoch); rows are read shard by shard and
the g-th row of the epoch goes to rank g % world (row round-robin works for any number of
shards, including one shard and eight ranks); each rank shuffles its rows through a bounded
buffer. Memory is bounded by `data.shuffleBuffer` rows whatever the dataset size.

Exact resume: the state (epoch, shard, row and byte offset inside it, the buffer's raw rows,
the buffer RNG, batches yielded) is captured after every batch, and `state_dict()` returns the
one of the last batch the *trainer consumed*, not of those the prefetch thread has read ahead.
Storing the buffer's raw rows (at most shuffleBuffer small JSON objects) is what makes resume
exact without re-reading the shards from the start.

Equal batch counts: every rank yields exactly (rows // world) // batchSize batches per epoch
so DDP never waits on a rank that ran dry; the rows past that are not trained this epoch
(HF's drop_last). A rank that lost rows to onBadRecord=skip fills its last batch with weight-0
copies (row ids prefixed "pad:"), which change neither loss nor gradient.

Why no DataLoader worker processes: the exact state must live in one process, and tokenizing a
batch takes milliseconds; one prefetch thread hides it behind the GPU step.
"""

from __future__ import annotations

import copy
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import storage
from ..config import DataConfig
from ..errors import InputError
from .collate import collate
from .formats import SUFFIXES, BadRecord, count_rows, parse_row, read_rows
from .tokenize import DataStats, TokenizedRow, tokenize_row


@dataclass
class Position:
    epoch: int = 0
    shard: int = 0  # index into this epoch's shard order
    row: int = 0  # next row index inside that shard
    byte: int | None = 0  # byte offset of `row` (plain JSONL), None when rows must be skipped
    global_row: int = 0  # rows of the epoch (all ranks) before `row`
    batches: int = 0  # batches this rank yielded this epoch
    buffer: list[list[Any]] = field(default_factory=list)  # [[row_id, raw], ...]
    last: list[list[Any]] = field(default_factory=list)  # rows of the last batch (padding source)
    rng: list[Any] | None = None  # random.Random state of the buffer

    def to_json(self) -> dict[str, Any]:
        d = copy.copy(self.__dict__)
        d["buffer"] = list(self.buffer)
        d["last"] = list(self.last)
        return d


@dataclass
class Group:
    """`gradientAccumulationSteps` batches forming one optimizer step."""

    batches: list[dict[str, Any]]
    wait_seconds: float


def _rng_state(rng: random.Random) -> list[Any]:
    v, internal, gauss = rng.getstate()
    return [v, list(internal), gauss]


def _set_rng(rng: random.Random, state: list[Any]) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class PreferenceStream:
    def __init__(self, cfg: DataConfig, uri: str, tokenizer: Any, rank: int, world: int, batch_size: int,
                 shuffle: bool = True, prefetch: int = 4) -> None:
        self.cfg, self.uri, self.tokenizer = cfg, uri, tokenizer
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.shuffle, self.prefetch = shuffle, prefetch
        self.shards = [o.uri for o in storage.list_objects(uri, SUFFIXES)]
        self._live = DataStats()  # counted as rows are read, prefetched ones included
        self._pos = Position()
        self._consumed: dict[str, Any] = self._pos.to_json()
        self._rows: int | None = None
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def for_eval(cls, cfg: DataConfig, uri: str, tokenizer: Any, rank: int, world: int,
                 batch_size: int) -> PreferenceStream:
        return cls(cfg, uri, tokenizer, rank, world, batch_size, shuffle=False)

    # --- sizes ------------------------------------------------------------------------------

    def rows_per_epoch(self) -> int:
        if self._rows is None:
            self._rows = sum(count_rows(s) for s in self.shards)
        return self._rows

    def batches_per_epoch(self) -> int:
        return (self.rows_per_epoch() // self.world) // self.batch_size

    def epoch_progress(self) -> float:
        nb = max(self.batches_per_epoch(), 1)
        return self._consumed["epoch"] + self._consumed["batches"] / nb

    # --- state ------------------------------------------------------------------------------

    @property
    def stats(self) -> DataStats:
        """Totals up to the last batch the trainer consumed (rows read ahead are not counted yet)."""
        return DataStats(**self._consumed.get("stats", {}))

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "rank": self.rank, "world": self.world, "shards": self.shards,
                "position": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("world") != self.world or state.get("shards") != self.shards:
            raise InputError(f"{self.uri}: data changed since the checkpoint (shards or ranks differ); "
                             "exact resume is impossible")
        position = dict(state["position"])
        stats = position.pop("stats", {})
        self._pos = Position(**position)
        self._live = DataStats(**stats)
        self._consumed = {**self._pos.to_json(), "stats": stats}

    # --- reading ----------------------------------------------------------------------------

    def _shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _my_raw_rows(self, pos: Position) -> Iterator[list[Any]]:
        """This rank's raw rows of the epoch from `pos`, advancing `pos` as they are read."""
        order = self._shard_order(pos.epoch)
        while pos.shard < len(order):
            uri = order[pos.shard]
            for idx, byte_after, raw in read_rows(uri, pos.row, pos.byte):
                g = pos.global_row
                pos.global_row += 1
                pos.row = idx + 1
                pos.byte = byte_after if byte_after >= 0 else None
                if g % self.world == self.rank:
                    yield [f"{uri}:{idx + 1}", raw]
            pos.shard, pos.row, pos.byte = pos.shard + 1, 0, 0

    def _shuffled(self, pos: Position) -> Iterator[list[Any]]:
        """Bounded shuffle buffer over this rank's rows; its contents and RNG live in `pos`."""
        rng = random.Random(self.cfg.seed + 7919 * pos.epoch + 104_729 * self.rank)
        if pos.rng is not None:
            _set_rng(rng, pos.rng)
        size = self.cfg.shuffle_buffer if self.shuffle else 1
        source = self._my_raw_rows(pos)
        exhausted = False
        while True:
            while not exhausted and len(pos.buffer) < size:
                try:
                    pos.buffer.append(next(source))
                except StopIteration:
                    exhausted = True
            if not pos.buffer:
                return
            i = rng.randrange(len(pos.buffer))
            pos.buffer[i], pos.buffer[-1] = pos.buffer[-1], pos.buffer[i]
            item = pos.buffer.pop()
            pos.rng = _rng_state(rng)
            yield item

    def _tokenize(self, row_id: str, raw: Any) -> TokenizedRow | None:
        try:
            return tokenize_row(parse_row(raw, self.cfg.format), row_id, self.tokenizer, self.cfg, self._live)
        except BadRecord as err:
            if self.cfg.on_bad_record == "fail":
                raise InputError(f"{row_id}: {err} (data.onBadRecord=fail; set skip to drop such rows)") from None
            self._live.add(bad_records=1)
            return None

    def _train_batches(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(batch, state after it) forever, epoch after epoch, equal counts on every rank."""
        nb = self.batches_per_epoch()
        if nb < 1:
            raise InputError(f"{self.uri}: {self.rows_per_epoch()} rows are too few for one batch of "
                             f"{self.batch_size} on each of {self.world} ranks")
        pos = self._pos
        while True:
            rows_iter = self._shuffled(pos)
            while pos.batches < nb:
                rows: list[TokenizedRow] = []
                taken: list[list[Any]] = []
                for item in rows_iter:
                    tok = self._tokenize(*item)
                    if tok is not None:
                        rows.append(tok)
                        taken.append(item)
                        if len(rows) == self.batch_size:
                            break
                rows += self._padding(pos, taken, self.batch_size - len(rows))
                pos.batches += 1
                pos.last = taken or pos.last
                yield collate(rows, self._pad_id), {**pos.to_json(), "stats": self._live.totals()}
            pos.epoch, pos.shard, pos.row, pos.byte, pos.global_row, pos.batches = pos.epoch + 1, 0, 0, 0, 0, 0
            pos.buffer, pos.rng = [], None

    def _padding(self, pos: Position, taken: list[list[Any]], missing: int) -> list[TokenizedRow]:
        if missing <= 0:
            return []
        source = taken or pos.last
        if not source:
            raise InputError(f"{self.uri}: rank {self.rank} has no usable rows this epoch")
        out = []
        for i in range(missing):
            row_id, raw = source[i % len(source)]
            tok = tokenize_row(parse_row(raw, self.cfg.format), f"pad:{row_id}", self.tokenizer, self.cfg,
                               DataStats())
            out.append(TokenizedRow(tok.row_id, tok.prompt_ids, tok.chosen_ids, tok.rejected_ids, 0.0, 0.0))
        return out

    # --- what the loop calls ----------------------------------------------------------------

    def batches(self, until_step: int, accumulation: int, start_step: int = 0) -> Iterator[Group]:
        """Optimizer-step groups from `start_step` to `until_step`, tokenized ahead on a thread."""
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for item in self._train_batches():
                    while not stop.is_set():
                        try:
                            q.put(("batch", item), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as err:  # re-raised on the training thread
                q.put(("error", err))

        thread = threading.Thread(target=produce, name="data-prefetch", daemon=True)
        thread.start()
        try:
            for _ in range(start_step, until_step):
                t0 = time.perf_counter()
                group = []
                for _ in range(accumulation):
                    kind, item = q.get()
                    if kind == "error":
                        raise item
                    batch, state = item
                    group.append(batch)
                    self._consumed = state
                yield Group(group, time.perf_counter() - t0)
        finally:
            stop.set()

    def eval_batches(self, device: Any = None) -> Iterator[dict[str, Any]]:
        """Every eval row of this rank once, in order, last partial batch kept."""
        pos = Position()
        rows: list[TokenizedRow] = []
        for item in self._shuffled(pos):
            tok = self._tokenize(*item)
            if tok is not None:
                rows.append(tok)
            if len(rows) == self.batch_size:
                yield collate(rows, self._pad_id)
                rows = []
        if rows:
            yield collate(rows, self._pad_id)
