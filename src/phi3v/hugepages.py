"""CPU memory in transparent huge pages for the quantized weights, which each decoding step streams
through (`weights.load_model`).

Read from 2 MiB pages instead of 4 KiB ones (fewer TLB misses as the prefetchers stream across page
boundaries), on the AMX Xeon a batch-1 decode step of Phi-3-V took 174 ms instead of 197 in int8, 105
instead of 118 in int4 (with `Int4Linear.blocked`: in PyTorch's order the pairs' reads met in the same
cache sets and huge pages made int4 slower; bench/hugepages.py). The memory is anonymous and private (shared anonymous memory is shmem, whose
huge pages Linux leaves off by default) and advised with MADV_HUGEPAGE, which the usual `madvise` THP
setting honours. Where the OS offers no such advice, tensors stay where PyTorch put them. The KV cache
stays in ordinary pages: see `KVCache.reserve`.
"""

from __future__ import annotations

import contextlib
import mmap

import torch

AVAILABLE = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")
HUGE_PAGE = 2 << 20


def advise(mm: mmap.mmap, start: int = 0, length: int | None = None) -> None:
    """Ask for huge pages for mm's bytes start..start+length (page-aligned start; None: to the end),
    where the OS offers them: a no-op elsewhere, and on kernels built without transparent huge pages."""
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            mm.madvise(mmap.MADV_HUGEPAGE, start, len(mm) - start if length is None else length)


def _mapping(nbytes: int) -> tuple[mmap.mmap, int]:
    """Zero-filled private anonymous memory advised for huge pages, and the offset in it of its first
    2 MiB boundary (kernels before 6.7 do not align such mappings themselves): nbytes from there on."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advise(mm)
    address = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
    return mm, -address % HUGE_PAGE


def _tensor(mm: mmap.mmap, offset: int, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over mm's bytes from `offset`; it keeps the mapping alive."""
    count = torch.Size(shape).numel() * dtype.itemsize
    return torch.frombuffer(mm, dtype=torch.uint8, count=count, offset=offset).view(dtype).reshape(shape)


class HugePages:
    """Huge-page memory handed out to tensors one after another, CHUNK bytes a mapping: one mapping per
    tensor would leave up to 2 MiB resident past the end of each."""

    CHUNK = 256 << 20

    def __init__(self) -> None:
        self._map: mmap.mmap | None = None
        self._used = 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """t's data in huge-page memory (t itself off the CPU, or where there is none)."""
        if t.device.type != "cpu" or not AVAILABLE or t.numel() == 0:
            return t
        n = -(-t.nbytes // 4096) * 4096  # page-aligned pieces keep each tensor's rows cache-line aligned
        if self._map is None or self._used + n > len(self._map):
            self._map, self._used = _mapping(max(self.CHUNK, n))
        out = _tensor(self._map, self._used, t.shape, t.dtype)
        self._used += n
        return out.copy_(t)
