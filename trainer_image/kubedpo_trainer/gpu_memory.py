"""`kubedpo_gpu_memory_bytes`: the peak GPU memory of the fullest rank, allocated and reserved.

Only rank 0 serves metrics, but the rank closest to running out of memory may be any rank
(uneven sequence lengths, rank 0's extra work at checkpoints). So every rank reads its own
peaks and one gather gives rank 0 the maximum over ranks: `kind="allocated"` is what tensors
hold (`torch.cuda.max_memory_allocated`), `kind="reserved"` what the caching allocator took from
the driver (`max_memory_reserved`), the number that meets the GPU's limit.

The reader is injected so that the path from reading to the gauge runs on CPU in tests; on a
machine without CUDA there is no reader and the gauge stays unset (there is no GPU memory).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MemoryReader = Callable[[], tuple[float, float]]  # () -> (peak allocated, peak reserved) bytes, this rank
Gather = Callable[[torch.Tensor], torch.Tensor]  # (2,) on each rank -> (world * 2,) on every rank


def cuda_memory_reader(device: torch.device | str) -> MemoryReader | None:
    """This process's CUDA peaks, or None when `device` is not a CUDA device."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None

    def read() -> tuple[float, float]:
        return float(torch.cuda.max_memory_allocated(dev)), float(torch.cuda.max_memory_reserved(dev))

    return read


def max_over_ranks(reader: MemoryReader, gather: Gather, device: torch.device | str = "cpu") -> dict[str, float]:
    """{"allocated": bytes, "reserved": bytes}, each the maximum over ranks. A collective: every
    rank must call it at the same step."""
    local = torch.tensor(reader(), dtype=torch.float64, device=device)
    peaks = gather(local).reshape(-1, 2).max(dim=0).values
    return {"allocated": float(peaks[0]), "reserved": float(peaks[1])}


def peak_memory_bytes() -> int:
    """Peak CUDA memory allocated on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
