"""A preallocated key/value cache shared by all layers, one row per sequence (spec §3.3).

Rows are independent: each sequence's keys start at index 0 of its row and the cache index of a token is
its position, so a batch never needs left padding inside the cache and a row can be refilled while the
others keep decoding. Attention masks keys past each row's own position, which also hides whatever an
earlier occupant of the row left behind.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values after RoPE, [layers, rows, kv_heads, capacity, head_dim] each."""

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (n_layers, 0, n_heads, 0, head_dim)
        self.k = torch.empty(self.shape, dtype=dtype, device=device)
        self.v = torch.empty(self.shape, dtype=dtype, device=device)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, rows: int, capacity: int) -> None:
        """Grow (never shrink) to at least `rows` x `capacity`, keeping what is stored."""
        if rows <= self.rows and capacity <= self.capacity:
            return
        # grow geometrically (in each dimension that is short) so a stream of requests rarely copies the cache
        if rows > self.rows:
            rows = max(rows, self.rows + self.rows // 2)
        if capacity > self.capacity:
            capacity = max(capacity, self.capacity + self.capacity // 2)
        rows, capacity = max(rows, self.rows), max(capacity, self.capacity)
        shape = (self.k.shape[0], rows, self.k.shape[2], capacity, self.k.shape[4])
        for name in ("k", "v"):
            old = getattr(self, name)
            # zeros, not empty: masked-out entries still enter the P @ V product, and 0 * NaN would poison it.
            # Not in huge pages: the attention read them 15% faster, but this VM's first touch of a 2 MiB page
            # made a 798-token prompt 0.2-0.5 s slower (bench/hugepages.py)
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, : old.shape[1], :, : old.shape[3]] = old
            setattr(self, name, new)

    def write(self, layer: int, rows: slice, positions: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, T, D) at `positions` (B, T) of `rows`; return the rows' first kv_len entries."""
        kc, vc = self.k[layer, rows], self.v[layer, rows]  # views: (B, H, S, D)
        if k.shape[2] == kv_len:  # T distinct positions below kv_len = T: they are 0..T-1, as in every prefill
            kc[:, :, :kv_len] = k  # a plain copy: a third of the indexed one's time on a 798-token prompt
            vc[:, :, :kv_len] = v
            return kc[:, :, :kv_len], vc[:, :, :kv_len]
        b = torch.arange(kc.shape[0], device=kc.device)[:, None]  # (B, 1)
        kc[b, :, positions] = k.transpose(1, 2).to(kc.dtype)  # advanced indices first: (B, T, H, D)
        vc[b, :, positions] = v.transpose(1, 2).to(vc.dtype)
        return kc[:, :, :kv_len], vc[:, :, :kv_len]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` entries of row `src` into row `dst` (used to keep active rows dense)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
