"""The Phi-3-mini decoder blocks (spec §3). Attribute names equal the official state-dict keys."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi3v import cpu_kernels
from phi3v.config import TextConfig
from phi3v.kv_cache import KVCache
from phi3v.linear import Linear
from phi3v.rope import apply_rope


class RMSNorm(nn.Module):
    """Normalise in float32, cast back, then scale (spec §3.2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if (kernels := cpu_kernels.fused(x, self.weight)) is not None:
            return cpu_kernels.run(kernels.rms_norm, x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass
class AttentionInputs:
    """What every layer needs besides its hidden state, built once per forward call.

    cos, sin: (B, 1, T, D) rotary tables. mask: (B, 1, T, S) bool, True = may attend, or None for plain
    causal attention over the call's own tokens. With a cache, keys/values are written at `positions` of
    `rows` and attention reads the first `kv_len` entries of those rows. kv_lens (B,): for a decoding
    step (one new token a row), the number of keys each row attends to, which the mask also says.
    """

    cos: Tensor
    sin: Tensor
    mask: Tensor | None
    positions: Tensor
    cache: KVCache | None = None
    rows: slice = field(default_factory=lambda: slice(None))
    kv_len: int = 0
    kv_lens: Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.layer_idx = layer_idx
        # Fused projection as stored in the checkpoint: rows are [Q; K; V] (spec §2.1).
        self.qkv_proj = Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, a: AttentionInputs) -> Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if a.cos.shape[0] == B and (fused := cpu_kernels.fused(qkv, a.cos, a.sin)) is not None:
            q, k = cpu_kernels.run(fused.rope, qkv, a.cos, a.sin, self.n_heads, self.n_kv, self.head_dim)
        else:
            q = apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), a.cos, a.sin)
            k = apply_rope(k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2), a.cos, a.sin)
        if a.cache is not None:  # keys are cached after RoPE (spec §3.3)
            k, v = a.cache.write(self.layer_idx, a.rows, a.positions, k, v, a.kv_len)
            if a.kv_lens is not None and (kernels := _decode_kernels(q, k)) is not None:
                q1 = q.reshape(B, self.n_heads, self.head_dim).float().contiguous()
                y = cpu_kernels.run(kernels.decode_attention, q1, k, v, a.kv_lens, self.head_dim**-0.5,
                                    cpu_kernels.prefetch_bytes(attention=True))  # fmt: skip
                return self.o_proj(y.to(x.dtype).view(B, 1, q_size))
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache kept narrower than the compute dtype
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=a.mask, is_causal=a.mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, q_size))


def _decode_kernels(q: Tensor, k: Tensor):
    """phi3v's CPU kernels when they can run this decoding step's attention (cpu_kernels.decode_attention:
    reads a float32 or bfloat16 cache as stored, faster than SDPA); else None."""
    if q.device.type != "cpu" or q.shape[-1] % 8 or q.shape[-1] > 256 or torch.is_grad_enabled():
        return None
    if k.dtype not in (torch.float32, torch.bfloat16):
        return None
    return cpu_kernels.get()


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # [gate; up]
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)
        if (kernels := cpu_kernels.fused(gate_up)) is not None:
            return self.down_proj(cpu_kernels.run(kernels.silu_mul, gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h)) (spec §3.1)."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: Tensor, a: AttentionInputs) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), a)
        return h + self.mlp(self.post_attention_layernorm(h))
