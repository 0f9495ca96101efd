"""Rotary position embedding with Phi-3's LongRoPE ("su") scaling (spec §3.5).

Everything is computed in float32 and cast to the activation dtype at the end. One factor list is chosen
per sequence (batch row): `long_factor` when the row's length, max(position)+1, exceeds
`original_max_position_embeddings`, otherwise `short_factor`. Choosing per row rather than per call makes
every row of a batch equal to running it alone; for a single row it is the reference rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from phi3v.config import TextConfig


def inv_freq(cfg: TextConfig, factors: tuple[float, ...] | None, device: torch.device | None = None) -> Tensor:
    """inv_freq[i] = 1 / (factor[i] * theta^(2i/head_dim)), float32 [head_dim/2]."""
    d = cfg.head_dim
    exponent = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
    base = cfg.rope_theta**exponent
    if factors is not None:
        base = torch.tensor(factors, dtype=torch.float32, device=device) * base
    return 1.0 / base


def uses_long_factors(cfg: TextConfig, seq_len: int) -> bool:
    """Whether a sequence of `seq_len` tokens is rotated with the long factor list (spec §3.5)."""
    return cfg.long_factor is not None and seq_len > cfg.original_max_position_embeddings


def cos_sin(cfg: TextConfig, positions: Tensor, dtype: torch.dtype, seq_lens: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin tables for `positions` [B, T] -> two [B, 1, T, head_dim] tensors in `dtype`.

    `seq_lens` [B] is each row's sequence length, which picks its factor list (padding does not count).
    The LongRoPE scale sqrt(1 + ln(max/orig)/ln(orig)) multiplies both, whichever list is used.
    """
    dev = positions.device
    if cfg.short_factor is None:
        freqs = inv_freq(cfg, None, dev)[None].expand(positions.shape[0], -1)  # (B, D/2)
    else:
        use_long = (seq_lens > cfg.original_max_position_embeddings)[:, None]  # (B, 1)
        freqs = torch.where(use_long, inv_freq(cfg, cfg.long_factor, dev), inv_freq(cfg, cfg.short_factor, dev))
    angle = positions.float()[:, :, None] * freqs[:, None, :]  # (B, T, D/2)
    emb = torch.cat([angle, angle], dim=-1)[:, None]  # (B, 1, T, D)
    scale = cfg.rope_scale
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """[a, b] -> [-b, a] over the two halves of the last dimension (GPT-NeoX layout)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x' = x*cos + rotate_half(x)*sin, for x of shape (B, H, T, D)."""
    return x * cos + rotate_half(x) * sin
