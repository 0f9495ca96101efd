"""phi3v's fused layer steps (src/phi3v/cpu_fused.cpp): RMSNorm (spec §3.2), SwiGLU (§3.4), RoPE (§3.5) and
CLIP's quick GELU (§4.2), each against the eager PyTorch sequence it replaces, which rounds every
intermediate to the activation dtype: in bfloat16 the same bits (up to the last bit of float32's exp or of
a row's sum, which a bfloat16 result almost never shows), in float32 within a few ulp; and the layers that
call them, which must not change by taking them."""

import pytest
import torch
import torch.nn.functional as F

from phi3v import cpu_kernels
from phi3v.config import TextConfig, VisionConfig
from phi3v.language import AttentionInputs, DecoderLayer, RMSNorm
from phi3v.rope import apply_rope, cos_sin
from phi3v.vision import CLIPEncoderLayer

own = cpu_kernels.get()
needs_fused = pytest.mark.skipif(own is None or not cpu_kernels.has_avx512(),
                                 reason="phi3v's kernels are not built, or the CPU lacks AVX512")  # fmt: skip
DTYPES = [torch.bfloat16, torch.float32]


def assert_matches_eager(got, want):
    """bfloat16: at most one element in 1000 apart, by a unit or two (RMSNorm rounds twice); float32: a few
    ulp."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.dtype == torch.bfloat16:
        differ = got != want
        assert differ.float().mean().item() <= 1e-3
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-30)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def eager_rms_norm(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(798, 3072), (3, 5, 40), (7, 3)])  # 40, 3: rows that end mid-register
def test_rms_norm_is_the_eager_math(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    assert_matches_eager(own.rms_norm(x, w, 1e-5), eager_rms_norm(x, w, 1e-5))


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, inner", [(798, 8192), (5, 40), (2, 3)])
def test_silu_mul_is_up_times_silu_of_gate(dtype, rows, inner):
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(rows, 2 * inner, generator=g) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_matches_eager(own.silu_mul(gate_up), up * F.silu(gate))


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 577, 4096), (3, 37)])
def test_quick_gelu_works_in_place(dtype, shape):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    x.view(-1)[:4] = torch.tensor([-100.0, 100.0, 0.0, -50.0])  # saturated both ways, zero, subnormal
    want = x * torch.sigmoid(1.702 * x)
    out = own.quick_gelu_(x)
    assert out is x
    assert_matches_eager(x, want)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads, kv_heads, D", [(32, 32, 96), (4, 2, 6), (2, 1, 40)])  # grouped keys; tails
def test_rope_rotates_queries_and_keys_into_head_major_tensors(dtype, q_heads, kv_heads, D):
    """Two rows at different positions (a batch), with the values' heads after the keys left alone."""
    cfg = TextConfig(hidden_size=q_heads * D, num_attention_heads=q_heads, num_key_value_heads=kv_heads)
    B, T = 2, 7
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, (q_heads + 2 * kv_heads) * D, generator=g).to(dtype)
    pos = torch.stack([torch.arange(T), torch.arange(T) + 100])
    cos, sin = cos_sin(cfg, pos, dtype, pos.amax(dim=1) + 1)
    before = x.clone()
    q, k = own.rope(x, cos, sin, q_heads, kv_heads, D)
    heads = x.view(B, T, q_heads + 2 * kv_heads, D).transpose(1, 2)
    assert q.is_contiguous() and k.is_contiguous()
    assert_matches_eager(q, apply_rope(heads[:, :q_heads], cos, sin))
    assert_matches_eager(k, apply_rope(heads[:, q_heads : q_heads + kv_heads], cos, sin))
    assert torch.equal(x, before)


@needs_fused
def test_the_kernels_refuse_what_they_cannot_read():
    x = torch.randn(2, 3, 16).bfloat16()
    cos = torch.randn(2, 1, 3, 8).bfloat16()
    with pytest.raises(RuntimeError, match="cos and sin"):
        own.rope(x, cos[:1], cos[:1], 1, 1, 8)  # one row's tables for two rows
    with pytest.raises(RuntimeError, match="W >="):
        own.rope(x, cos, cos, 2, 1, 8)  # more heads than the rows hold
    with pytest.raises(RuntimeError, match="contiguous"):
        own.rms_norm(x.transpose(0, 1), torch.ones(16).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="x's dtype"):
        own.rms_norm(x, torch.ones(16), 1e-5)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        own.quick_gelu_(x.half())


@needs_fused
def test_fused_only_where_the_kernels_can_take_the_tensors():
    x = torch.randn(4, 8).bfloat16()
    with torch.inference_mode():
        assert cpu_kernels.fused(x, x[0]) is own
        assert cpu_kernels.fused(x.t()) is None  # not contiguous
        assert cpu_kernels.fused(x.half()) is None
        assert cpu_kernels.fused(x, x.float()) is None  # mixed dtypes
    assert cpu_kernels.fused(x) is own  # autograd on, but nothing to record
    assert cpu_kernels.fused(x, torch.ones(8, requires_grad=True)) is None  # the kernels have no backward


def test_no_fused_kernels_without_avx512(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "has_avx512", lambda: False)
    with torch.inference_mode():
        assert cpu_kernels.fused(torch.ones(4)) is None


def small_layers(dtype):
    torch.manual_seed(0)
    t = TextConfig(hidden_size=192, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
                   num_hidden_layers=1)  # fmt: skip
    v = VisionConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2)
    dec, clip = DecoderLayer(t, 0).to(dtype), CLIPEncoderLayer(v).to(dtype)
    for p in [*dec.parameters(), *clip.parameters()]:
        p.data.normal_(0, 0.05)
    pos = torch.arange(9)[None]
    cos, sin = cos_sin(t, pos, dtype, torch.tensor([9]))
    return dec, clip, AttentionInputs(cos, sin, None, pos), torch.randn(1, 9, 192).to(dtype), torch.randn(3, 11, 128).to(dtype)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_give_the_same_result_through_the_fused_kernels(monkeypatch, dtype):
    """A decoder layer and a CLIP layer, with the kernels and with PyTorch's ops (as on a GPU or a CPU
    without AVX512); `calls` proves the first run took them."""
    dec, clip, a, xd, xv = small_layers(dtype)
    calls = []
    fused = cpu_kernels.fused
    monkeypatch.setattr(cpu_kernels, "fused", lambda *t: calls.append(len(t)) or fused(*t))
    with torch.inference_mode():
        got = dec(xd, a), clip(xv)
        assert len(calls) == 5 and fused(xd) is own  # 2 norms, RoPE, SwiGLU; quick GELU
        monkeypatch.setattr(cpu_kernels, "fused", lambda *t: None)
        want = dec(xd, a), clip(xv)
    for g, w in zip(got, want, strict=True):
        assert_matches_eager(g, w)


@needs_fused
def test_norms_stay_differentiable():
    """Outside inference the layers take PyTorch's ops, whose gradients autograd knows."""
    norm = RMSNorm(16, 1e-5)
    x = torch.randn(3, 16, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
