"""phi3v's own CPU kernels (src/phi3v/cpu_kernels.cpp): one row times a bf16 / int8 / int4 weight, against
the same math in float64 from the (dequantized) weight and, for int8 and int4, the int8-quantized row; and
the fallbacks when they cannot be used."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from phi3v import cpu_kernels, linear
from phi3v.linear import Linear, quantize_layer

CPU = torch.device("cpu")
own = cpu_kernels.get()
INT8_KERNEL = "int8_gemv_vnni" if cpu_kernels.has_vnni() else "int8_gemv"  # the one Int8Linear takes here
needs_own = pytest.mark.skipif(own is None, reason="no AVX2 CPU or no C++ compiler: phi3v's kernels are not built")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def q8(x):
    """The int8 kernels' view of a float32 row: symmetric int8 codes per block of 32, scale max|x| / 127."""
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv).clamp(-127, 127) * d).reshape(x.shape)


def layer_and_input(mode, n, k, group=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A different spread per output row and per input block, so that every scale and zero matters.
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * (1 + torch.arange(k) // 32) * 0.01
    bias = torch.randn(n, generator=g)
    return quantize_layer(w.bfloat16(), bias, mode, CPU, group), torch.randn(1, k, generator=g) + 0.5, bias


@needs_own
def test_rows_are_quantized_to_int8_in_blocks_of_32():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 256, generator=g) * (1 + torch.arange(256) // 32)  # a different range per block
    x[0, 64:96] = 0  # an all-zero block has scale 0
    got = own.quantize_row(x).reshape(1, 256)
    assert torch.allclose(got, q8(x), rtol=0, atol=1e-6)
    assert 0 < rel(got, x) < 0.01


@needs_own
@pytest.mark.parametrize(
    "mode, n, k, group",
    [("int8", 4, 32, None), ("int8", 260, 224, None), ("int8", 3072, 8192, None),
     ("int4", 32, 64, 32), ("int4", 64, 64, 32), ("int4", 96, 256, 64), ("int4", 192, 256, 64),
     ("int4", 256, 384, 128), ("int4", 16384, 3072, 128)],
)  # fmt: skip
def test_own_kernels_compute_the_dequantized_product_of_the_int8_row(mode, n, k, group):
    """int8: x8 @ dequant(W).T with x8 = q8(x); int4: the same plus each group's zero times the sum of x
    (in float32) minus the sum of x8. Within float rounding of that math in float64, and within the
    quantization of x (0.5%) of the float product."""
    kernel = linear._own_int4_kernel(linear._cpu_int4_block(), n, group) if mode == "int4" else INT8_KERNEL
    if kernel is None:
        pytest.skip(f"no own int4 kernel for {n} rows in PyTorch's {linear._cpu_int4_block()}-row blocks on this CPU")
    layer, x, bias = layer_and_input(mode, n, k, group)
    w = layer.dequantize(torch.float32).double()
    x8 = q8(x).double()
    want = F.linear(x8, w, bias.double())
    if mode == "int4":
        zeros = layer.pairs()[..., 1].double()  # (groups, n)
        dx = (x.double() - x8).reshape(-1, group).sum(-1)  # (groups,)
        want = want + dx @ zeros
    if mode == "int8":
        raw = getattr(own, kernel)(x, layer.qweight, layer.scales)
        avx2 = own.int8_gemv(x, layer.qweight, layer.scales)  # also where the layer takes the VNNI kernel
        assert rel(avx2 + bias, want) < 2e-6
    else:
        raw = getattr(own, kernel)(x, layer.qweight, layer.scales_and_zeros, layer.group_size)
    assert raw.shape == (1, n) and rel(raw + bias, want) < 2e-6
    assert rel(raw + bias, F.linear(x.double(), w, bias.double())) < 1e-2
    got = layer(x)  # the layer takes this route for one row
    assert torch.equal(got, raw + bias)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert layer(x.view(1, 1, k)).shape == (1, 1, n)


@needs_own
@pytest.mark.parametrize("mode, n, k, group", [("int8", 260, 224, None), ("int4", 192, 256, 64)])
def test_quantized_kernels_take_a_bf16_row_and_answer_in_bf16(monkeypatch, mode, n, k, group):
    """A bf16 model's activations go to the int8/int4 kernels as they are: the same result as the float32
    row of the same values, rounded to bf16 once; the layer adds the bias in bf16, as before."""
    kernel = linear._own_int4_kernel(linear._cpu_int4_block(), n, group) if mode == "int4" else INT8_KERNEL
    if kernel is None:
        pytest.skip(f"no own int4 kernel for {n} rows in PyTorch's {linear._cpu_int4_block()}-row blocks on this CPU")
    layer, x, bias = layer_and_input(mode, n, k, group)
    xb = x.bfloat16()
    params = (layer.qweight, layer.scales) if mode == "int8" else (layer.qweight, layer.scales_and_zeros, group)
    kernels = [kernel, "int8_gemv"] if mode == "int8" else [kernel]
    for name in kernels:
        got = getattr(own, name)(xb, *params)
        assert got.dtype == torch.bfloat16 and torch.equal(got, getattr(own, name)(xb.float(), *params).bfloat16())
    seen = []
    monkeypatch.setattr(cpu_kernels, "run", lambda f, *a: seen.append(a[0].dtype) or f(*a))
    assert torch.equal(layer(xb), getattr(own, kernel)(xb, *params) + bias.bfloat16())
    assert seen == [torch.bfloat16]  # no float32 copy of the row on the way in
    with pytest.raises(RuntimeError, match="float32 or bfloat16 row"):
        getattr(own, kernel)(x.half(), *params)


@needs_own
@pytest.mark.parametrize("n, k", [(4, 16), (260, 208), (16384, 3072)])
def test_bf16_linear_takes_the_own_kernel_for_one_row(n, k):
    g = torch.Generator().manual_seed(1)
    layer = Linear(k, n, dtype=torch.bfloat16)
    layer.weight.data = torch.randn(n, k, generator=g).bfloat16()
    layer.bias.data = torch.randn(n, generator=g).bfloat16()
    x = torch.randn(1, k, generator=g).bfloat16()
    want = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    avx512 = k % 32 == 0 and cpu_kernels.has_avx512_bf16()  # the layer's route for a bf16 row
    raw = own.bf16_gemv_avx512(x, layer.weight) if avx512 else own.bf16_gemv(x.float(), layer.weight)
    assert raw.shape == (1, n) and rel(raw + layer.bias.float(), want) < 2e-6
    with torch.inference_mode():
        got = layer(x.view(1, 1, k))
    assert got.dtype == torch.bfloat16 and got.shape == (1, 1, n)
    assert torch.equal(got.view(1, n), (raw + layer.bias.float()).bfloat16())
    # a weight that trains keeps PyTorch's differentiable product
    layer.weight.requires_grad_(True)
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None


@needs_own
@pytest.mark.skipif(not cpu_kernels.has_avx512_bf16(), reason="no AVX512-BF16 on this CPU")
@pytest.mark.parametrize("n, k", [(4, 32), (260, 224), (16384, 3072)])
def test_bf16_rows_take_the_avx512_dot_product_kernel(monkeypatch, n, k):
    """A bfloat16 row times a bfloat16 weight: the same exact products as bf16_gemv's float32 path, summed
    in float32 (so within 2e-6 of float64); float32 rows keep bf16_gemv, which does not round them."""
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(1, k, generator=g).bfloat16()
    raw = own.bf16_gemv_avx512(x, w)
    assert raw.dtype == torch.float32 and raw.shape == (1, n)
    assert rel(raw, F.linear(x.double(), w.double())) < 2e-6
    calls = []
    for name in ("bf16_gemv", "bf16_gemv_avx512"):
        real = getattr(own, name)
        monkeypatch.setattr(own, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    layer = Linear(k, n, bias=False, dtype=torch.bfloat16)
    layer.weight.data = w
    with torch.inference_mode():
        assert torch.equal(layer(x), raw.bfloat16())
        layer(x.float())
    assert calls == ["bf16_gemv_avx512", "bf16_gemv"]


@needs_own
def test_shapes_the_int8_kernel_does_not_handle_take_pytorchs(monkeypatch):
    """It needs rows % 4 == 0 and inputs % 32 == 0 (int4 needs rows % 32 == 0, as its layout does)."""
    monkeypatch.setattr(own, "int8_gemv", None)  # would raise if called
    monkeypatch.setattr(own, "int8_gemv_vnni", None)
    layer, x, bias = layer_and_input("int8", 6, 16)
    assert rel(layer(x), F.linear(x, layer.dequantize(torch.float32), bias)) < 5e-3


@needs_own
def test_only_single_rows_without_gradients_use_them(monkeypatch):
    calls = []
    real = getattr(own, INT8_KERNEL)
    monkeypatch.setattr(own, INT8_KERNEL, lambda *a: calls.append(1) or real(*a))
    layer, x, _ = layer_and_input("int8", 64, 64)
    layer(x)
    assert calls == [1]
    layer(torch.randn(2, 64))
    layer(x.clone().requires_grad_(True))
    assert calls == [1]


@pytest.mark.skipif(not cpu_kernels._cpu_supports_avx2() or shutil.which("c++") is None
                    or os.environ.get("PHI3V_NATIVE") == "0", reason="no AVX2 CPU or no C++ compiler")  # fmt: skip
def test_the_kernels_build_where_they_can():
    """Where they can run, a build error must fail the suite, not skip the kernel tests above."""
    assert own is not None


@needs_own
@pytest.mark.parametrize("k", [3072, 3104])  # 3104: the unrolled loops' tails (97 int8 blocks, 48.5 bf16 rounds)
@pytest.mark.parametrize("ahead", [64, 2048, 1 << 16])
def test_prefetching_changes_no_result(k, ahead):
    """The AVX512 kernels' prefetch distance (cpu_kernels.prefetch_bytes) only asks for cache lines early:
    the same bits with it as without, even asking far past the weight's end."""
    layer8, x, _ = layer_and_input("int8", 520, k)
    layer4, _, _ = layer_and_input("int4", 256, k, 32)
    runs = []
    if cpu_kernels.has_vnni():
        runs.append(lambda pf: own.int8_gemv_vnni(x, layer8.qweight, layer8.scales, pf))
    if layer4.blocked:  # laid out for the 64-row kernel
        runs.append(lambda pf: own.int4_gemv_b64(x, layer4.qweight, layer4.scales_and_zeros, 32, pf))
    if cpu_kernels.has_avx512_bf16():
        w, xb = layer8.dequantize(torch.bfloat16), x.bfloat16()
        runs.append(lambda pf: own.bf16_gemv_avx512(xb, w, pf))
    if not runs:
        pytest.skip("no AVX512 kernels here")
    for run in runs:
        assert torch.equal(run(ahead), run(0))


def test_prefetch_distance_by_vendor_and_environment(monkeypatch, capsys):
    """2048 bytes on Intel CPUs, none elsewhere; PHI3V_PREFETCH overrides, and a bad value (not a number,
    negative, or past PREFETCH_LIMIT) is ignored with one line, however many kernels ask."""
    monkeypatch.delenv("PHI3V_PREFETCH", raising=False)

    def choose(attention=False):
        cpu_kernels._env_prefetch.cache_clear()
        cpu_kernels.prefetch_bytes.cache_clear()
        return cpu_kernels.prefetch_bytes(attention)

    for vendor, weights, cache in [("GenuineIntel", 2048, 512), ("AuthenticAMD", 0, 0), (None, 0, 0)]:
        monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda v=vendor: v)
        assert (choose(), choose(attention=True)) == (weights, cache)
    for env, want in [("1024", 1024), ("0", 0), (str(cpu_kernels.PREFETCH_LIMIT), cpu_kernels.PREFETCH_LIMIT)]:
        monkeypatch.setenv("PHI3V_PREFETCH", env)
        assert choose() == choose(attention=True) == want
    capsys.readouterr()
    for env in ["lots", "-1", str(cpu_kernels.PREFETCH_LIMIT + 1), "99999999999999999999"]:
        monkeypatch.setenv("PHI3V_PREFETCH", env)
        assert choose() == 0  # the vendor default (None above)
        assert cpu_kernels.prefetch_bytes(attention=True) == 0  # a second caller: no second line
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"ignoring PHI3V_PREFETCH={env!r}" in err
    cpu_kernels._env_prefetch.cache_clear()
    cpu_kernels.prefetch_bytes.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("PHI3V_NATIVE", "0")
    assert cpu_kernels.get.__wrapped__() is None


def test_a_failed_build_falls_back_with_one_line(monkeypatch, tmp_path, capsys):
    """No compiler (or any build error): None and one line on stderr, never an exception."""
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'phi3v_cpu_kernels'\nc++: command not found")

    monkeypatch.setenv("PHI3V_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(cpu_kernels, "_cpu_supports_avx2", lambda: True)
    assert cpu_kernels.get.__wrapped__() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("phi3v: could not build the CPU kernels (c++: command not found)")
    assert "slower" in err[-1] and "PHI3V_NATIVE=0" in err[-1]


def test_no_kernels_leave_the_layers_on_pytorchs(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "get", lambda: None)
    for mode in ("int8", "int4"):
        layer, x, bias = layer_and_input(mode, 64, 64, 32)
        assert rel(layer(x), F.linear(x, layer.dequantize(torch.float32), bias)) < 5e-3
    assert linear._own_kernels(x, True) is None


@needs_own
@pytest.mark.skipif(not cpu_kernels.has_avx512_bf16(), reason="no AVX512-BF16 on this CPU")
@pytest.mark.parametrize("mode, n, k, group", [("int8", 8, 32, None), ("int8", 200, 224, None), ("int4", 64, 64, 32),
                                               ("int4", 192, 256, 64), ("int4", 4096, 3072, 128)])  # fmt: skip
def test_bf16_prompts_dequantize_in_the_own_kernels(monkeypatch, mode, n, k, group):
    """Many bf16 rows: each block of the weight is written straight as bfloat16, bit for bit what
    layer.dequantize(torch.bfloat16) gives, so the product equals the one made from PyTorch's dequantized
    blocks of the same size. (Not from other block sizes: a bf16 GEMM's rounding can depend on its shape,
    and with AMX it does, measured on a Xeon: 64- and 128-column products differ by up to 0.5 at 3072
    inputs.)"""
    if mode == "int4" and linear._cpu_int4_block() != 64:
        pytest.skip("the int4 dequantizer reads PyTorch's AVX512 layout")
    layer, _, bias = layer_and_input(mode, n, k, group)
    lo = n // 2 // 64 * 64
    out = torch.empty(n - lo, k, dtype=torch.bfloat16)
    if mode == "int8":
        got = own.dequantize_int8_bf16(layer.qweight, layer.scales, lo, n, out)
    else:
        got = own.dequantize_int4_b64_bf16(layer.qweight, layer.scales_and_zeros, layer.group_size, lo, n, out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, layer.dequantize(torch.bfloat16, lo, n))
    monkeypatch.setattr(linear, "DEQUANT_BLOCK", 64)  # several blocks
    x = torch.randn(linear.FEW_ROWS + 5, k).bfloat16()
    calls, real = [], linear._own_bf16_dequantizer
    monkeypatch.setattr(linear, "_own_bf16_dequantizer", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        fast = layer(x)
        pytorchs = lambda layer, *_: lambda lo, hi, out: out.copy_(layer.dequantize(torch.bfloat16, lo, hi))  # noqa: E731
        monkeypatch.setattr(linear, "_own_bf16_dequantizer", pytorchs)
        plain = layer(x)
    assert calls and torch.equal(fast, plain)


def softmax_attention(q, k, v, lengths):
    """Each row's query heads over its first lengths[b] keys, in float64; key/value head h // (H / Hkv)."""
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    out = []
    for b, n in enumerate(lengths.tolist()):
        kb = k[b, :, :n].double().repeat_interleave(H // Hkv, dim=0)
        vb = v[b, :, :n].double().repeat_interleave(H // Hkv, dim=0)
        scores = (q[b].double()[:, None] @ kb.transpose(1, 2)) / D**0.5  # (H, 1, n)
        out.append((scores.softmax(-1) @ vb)[:, 0])
    return torch.stack(out)


@needs_own
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, Hkv, D, spread", [(4, 4, 96, 1.0), (6, 2, 40, 1.0), (2, 1, 8, 30.0), (2, 1, 32, 30.0)])
@pytest.mark.parametrize("prefetch", [0, 512])
def test_decode_attention_is_softmax_attention_over_each_rows_keys(dtype, H, Hkv, D, spread, prefetch):
    """Float32 or bf16 cache views (capacity beyond the keys in use, NaN there), grouped heads, an odd
    number of 8-wide chunks (D=40; D=32 and 96 take the AVX512 variant where there is one), lengths off the
    8-key and 8-wide exp blocks, and scores 30x wider than usual (differences past e^-87) all give softmax
    attention within float32 rounding, with or without prefetching."""
    g = torch.Generator().manual_seed(int(D + spread))
    B, capacity = 3, 48
    lengths = torch.tensor([1, 13, 45])
    cache = (torch.randn(2, B, Hkv, capacity, D, generator=g) * 2).to(dtype)
    for b, n in enumerate(lengths.tolist()):
        cache[:, b, :, n:] = float("nan")  # what attention must never read
    k, v = cache[0][:, :, :45], cache[1][:, :, :45]
    q = torch.randn(B, H, D, generator=g) * spread
    got = own.decode_attention(q, k, v, lengths, D**-0.5, prefetch)
    ref = softmax_attention(q, k, v, lengths)
    assert got.dtype == torch.float32 and not got.isnan().any()
    assert (got.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    assert torch.equal(got, own.decode_attention(q, k, v, lengths, D**-0.5, 0))  # prefetching: the same bits


@needs_own
def test_decode_attention_checks_its_inputs():
    q, kv = torch.randn(1, 2, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="outside 1..S"):
        own.decode_attention(q, kv, kv, torch.tensor([0]), 0.25)
    with pytest.raises(RuntimeError, match="outside 1..S"):
        own.decode_attention(q, kv, kv, torch.tensor([9]), 0.25)
    with pytest.raises(RuntimeError, match="contiguous"):
        strided = torch.randn(1, 2, 16, 8).transpose(2, 3)  # (1, 2, 8, 16), keys not in contiguous rows
        own.decode_attention(q, strided, strided, torch.tensor([8]), 0.25)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        own.decode_attention(q, kv.half(), kv.half(), torch.tensor([8]), 0.25)
