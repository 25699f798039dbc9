"""The global sample order of an epoch: pure functions of (row counts, seed, epoch), never of ranks.

Order of epoch e: the rows are cut into blocks of `block_rows` consecutive rows of a shard;
the blocks are permuted (seeded by seed and e), which is the coarse, data-set-wide shuffle;
the permuted row sequence is cut into windows of `window` rows and each window is shuffled
(seeded by seed, e and the window), which is the fine, bounded shuffle. Position p of the
epoch is one row; nothing here holds more than the block table (rows / block_rows entries)
and one window's permutation.

Batches: global batch i is positions [i*G, (i+1)*G) with G = batchSize x accumulation x world
(the global batch size); rank r takes the slice [i*G + r*G/world, ...) of it and cuts it into
`accumulation` micro-batches of batchSize. Because the order does not depend on the world
size, a run that consumed k global batches continues at position k*G with any world size
that keeps G: every row is trained exactly once per epoch, whatever the ranks were. Rows
past the last full global batch (N mod G) are not trained this epoch (drop_last); the next
epoch's permutation drops others.

numpy's PCG64 generators are used for the permutations (fast for millions of blocks); numpy
is pinned, so an order is reproduced bit for bit by the same image. The data state records
a fingerprint of the epoch's first blocks so a different order at resume is refused, not
trained silently.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

_BLOCKS, _WINDOW = 0xB10C, 0x51DE  # stream ids of the two generators


@dataclass
class GlobalOrder:
    """Maps an epoch position to (shard position, row inside the shard)."""

    rows: list[int]  # rows of each shard, in listing order
    block_rows: int
    window: int
    seed: int
    shuffle: bool = True
    _epoch: int | None = field(default=None, repr=False)
    _perm_ends: np.ndarray | None = field(default=None, repr=False)
    _perm: np.ndarray | None = field(default=None, repr=False)
    _windows: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # prefetch thread vs checkpoint

    def __post_init__(self) -> None:
        per_shard = np.array([-(-n // self.block_rows) for n in self.rows], dtype=np.int64)
        self._block_first = np.concatenate(([0], np.cumsum(per_shard)))  # first block id of each shard
        self.total = int(sum(self.rows))

    @property
    def blocks(self) -> int:
        return int(self._block_first[-1])

    def _block(self, b: int) -> tuple[int, int, int]:
        """(shard, first row, rows) of block id b."""
        s = int(np.searchsorted(self._block_first, b, side="right") - 1)
        first = (b - int(self._block_first[s])) * self.block_rows
        return s, first, min(self.block_rows, self.rows[s] - first)

    def _epoch_blocks(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        n = self.blocks
        perm = (np.random.Generator(np.random.PCG64([self.seed, epoch, _BLOCKS])).permutation(n)
                if self.shuffle else np.arange(n))
        self._perm, self._perm_ends = perm, np.cumsum(self._sizes(perm))
        self._epoch, self._windows = epoch, {}

    def _sizes(self, perm: np.ndarray) -> np.ndarray:
        """Block sizes in permuted order, vectorised (all blocks are full but each shard's last)."""
        shard = np.searchsorted(self._block_first, perm, side="right") - 1
        first = (perm - self._block_first[shard]) * self.block_rows
        return np.minimum(self.block_rows, np.asarray(self.rows, dtype=np.int64)[shard] - first)

    def fingerprint(self, epoch: int) -> list[int]:
        """The epoch's first block ids: equal orders have equal fingerprints.

        Drawn afresh (not from the cached epoch): the prefetch thread may be in the next epoch.
        """
        if not self.shuffle:
            return list(range(min(8, self.blocks)))
        perm = np.random.Generator(np.random.PCG64([self.seed, epoch, _BLOCKS])).permutation(self.blocks)
        return [int(b) for b in perm[:8]]

    def _pre_window(self, epoch: int, p: int) -> int:
        """Position before the window shuffle of epoch position p."""
        if not self.shuffle:
            return p
        w = p // self.window
        start = w * self.window
        key = (epoch, w)
        perm = self._windows.get(key)
        if perm is None:
            size = min(self.window, self.total - start)
            perm = np.random.Generator(np.random.PCG64([self.seed, epoch, w, _WINDOW])).permutation(size)
            self._windows = {k: v for k, v in self._windows.items() if k[1] >= w - 1}  # this and the last
            self._windows[key] = perm
        return start + int(perm[p - start])

    def locate(self, epoch: int, p: int) -> tuple[int, int]:
        """(shard position, row) at epoch position p (0 <= p < total)."""
        if not 0 <= p < self.total:
            raise IndexError(f"position {p} outside the epoch's {self.total} rows")
        with self._lock:
            self._epoch_blocks(epoch)
            assert self._perm is not None and self._perm_ends is not None
            q = self._pre_window(epoch, p)
            j = int(np.searchsorted(self._perm_ends, q, side="right"))
            before = int(self._perm_ends[j - 1]) if j else 0
            block = int(self._perm[j])
        s, first, _ = self._block(block)
        return s, first + (q - before)


def slice_positions(step: int, micro: int, rank: int, world: int, batch_size: int, accumulation: int) -> range:
    """Epoch positions of rank `rank`'s micro-batch `micro` of global batch `step` (see module doc)."""
    g = batch_size * accumulation * world
    start = step * g + rank * batch_size * accumulation + micro * batch_size
    return range(start, start + batch_size)
