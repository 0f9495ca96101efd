"""Linear kernels (src/phi3v/linear.py): every fast route against plain float32 math on the same weights."""

import pytest
import torch
import torch.nn.functional as F

from phi3v import linear
from phi3v.errors import Phi3VError
from phi3v.linear import Int4Linear, Int8Linear, Linear, _pack_int4, _unpack_int4, pack_for_cpu, quantize_layer

CPU = torch.device("cpu")


def weights(n=256, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02, torch.randn(n, generator=g) * 0.01


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_packed_float32_matches_plain_and_stays_a_plain_module():
    w, b = weights()
    layer = Linear(128, 256)
    layer.weight.data, layer.bias.data = w.clone(), b.clone()
    x = torch.randn(3, 5, 128)
    want = F.linear(x, w, b)
    layer.pack()
    assert layer.weight.is_mkldnn
    for rows in (x[:1, :1], x, torch.randn(600, 128)):  # decode, short and long prompts
        assert (layer(rows) - F.linear(rows, w, b)).abs().max() < 1e-5
    assert torch.equal(layer.state_dict()["weight"], w)  # state_dict() is plain tensors
    layer.to(torch.float32)  # any .to() restores the plain layout
    assert not layer.weight.is_mkldnn and torch.equal(layer.weight, w)
    assert (layer(x) - want).abs().max() < 1e-5


def test_bf16_many_rows_run_in_float32_on_cpus_without_bf16(monkeypatch):
    w, _ = weights()
    layer = Linear(128, 256, bias=False).to(torch.bfloat16)
    layer.weight.data = w.bfloat16()
    x = torch.randn(linear.FEW_ROWS + 1, 128).bfloat16()
    monkeypatch.setattr(linear, "cpu_has_fast_bf16", lambda: False)
    assert torch.equal(layer(x), F.linear(x.float(), w.bfloat16().float()).bfloat16())
    monkeypatch.setattr(linear, "cpu_has_fast_bf16", lambda: True)
    assert torch.equal(layer(x), F.linear(x, w.bfloat16()))


def test_bf16_many_rows_convert_the_weight_a_block_of_rows_at_a_time(monkeypatch):
    """On CPUs without bf16 instructions each DEQUANT_BLOCK output rows of the weight are converted to float32
    and multiplied in turn: the blocks, each with its own slice of the bias, make up the whole product."""
    w, b = weights(200, 128)
    layer = Linear(128, 200).to(torch.bfloat16).requires_grad_(False)
    layer.weight.data, layer.bias.data = w.bfloat16(), b.bfloat16()
    x = torch.randn(2, linear.FEW_ROWS, 128).bfloat16()
    monkeypatch.setattr(linear, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(linear, "DEQUANT_BLOCK", 64)  # blocks of 64, 64, 64 and 8 rows
    monkeypatch.setattr(linear._scratch, "buf", torch.empty(0))
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    got = layer(x)
    assert got.shape == (2, linear.FEW_ROWS, 200) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-5)
    assert linear._scratch.buf.numel() == 64 * 128  # one block's worth of scratch, not the whole weight


@pytest.mark.skipif(not linear._has_onednn_pointwise() or not linear.cpu_has_fast_bf16(),
                    reason="no oneDNN linear op, or bf16 is emulated on this CPU")  # fmt: skip
def test_bf16_prompts_with_a_bias_add_it_inside_onednns_product():
    """The vision tower's layers (bias, many bf16 rows): oneDNN's linear op, bit for bit F.linear's result.
    Strided rows, which that op reads wrongly, and products autograd records take F.linear."""
    w, b = (t.bfloat16() for t in weights(256, 128))
    layer = Linear(128, 256).bfloat16().requires_grad_(False)
    layer.weight.data, layer.bias.data = w, b
    x = torch.randn(3, 50, 128).bfloat16()
    strided = torch.randn(3, 51, 128).bfloat16()[:, 1:]
    assert linear._onednn_bias_product(x, w, b)
    assert not linear._onednn_bias_product(strided, w, b)
    assert not linear._onednn_bias_product(x[:1, :4].clone(), w, b)  # few rows: the decoding kernels
    assert not linear._onednn_bias_product(x.float(), w.float(), b.float())
    assert not linear._onednn_bias_product(x.requires_grad_(), w, b)
    x.requires_grad_(False)
    for rows in (x, strided):
        assert torch.equal(layer(rows), F.linear(rows, w, b))


def test_int4_layout_round_trips():
    q = torch.randint(0, 16, (192, 64), dtype=torch.int32)
    assert torch.equal(_unpack_int4(_pack_int4(q), torch.empty(192, 64, dtype=torch.int32)), q)


def test_many_row_products_reuse_one_scratch_buffer_without_aliasing(monkeypatch):
    """The float32 weight of a many-row product lives in a per-thread scratch buffer: allocated once,
    reused by every layer, never aliased by a result, and bypassed when autograd needs the weight later."""
    monkeypatch.setattr(linear, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(linear._scratch, "buf", torch.empty(0))
    layers = []
    for seed in (1, 2):
        w, _ = weights(seed=seed)
        layer = Linear(128, 256, bias=False).to(torch.bfloat16).requires_grad_(False)
        layer.weight.data = w.bfloat16()
        layers.append(layer)
    x = torch.randn(linear.FEW_ROWS + 1, 128).bfloat16()
    first = layers[0](x)
    buf = linear._scratch.buf.data_ptr()
    second = layers[1](x)
    assert linear._scratch.buf.data_ptr() == buf  # reused, not reallocated
    for layer, y in zip(layers, (first, second)):  # the first result survived the second product
        assert torch.equal(y, F.linear(x.float(), layer.weight.float()).bfloat16())
    for q in (quantize_layer(layers[0].weight, None, "int8", CPU), quantize_layer(layers[0].weight, None, "int4", CPU)):
        assert torch.equal(q.dequantize(torch.float32, out=torch.empty(256, 128)), q.dequantize(torch.float32))
        q(x)
        assert linear._scratch.buf.data_ptr() == buf
    # when autograd records the product (a weight that trains, or only activations that do, as with adapters
    # on a frozen model), the float32 weight must outlive the next product, for the backward pass
    want = layers[0].weight.float().sum(0).expand(x.shape)
    for weight_trains in (False, True):
        layers[0].weight.requires_grad_(weight_trains)
        xr = x.float().requires_grad_(True)
        y = layers[0](xr.bfloat16())
        layers[1](x)
        y.float().sum().backward()
        assert torch.allclose(xr.grad, want, rtol=1e-2, atol=1e-3), weight_trains
    # the same for activations that train through a quantized layer (adapters on a quantized model)
    q = quantize_layer(layers[0].weight, None, "int8", CPU)
    xr = x.float().requires_grad_(True)
    y = q(xr)
    layers[1](x)
    y.sum().backward()
    assert torch.allclose(xr.grad, q.dequantize(torch.float32).sum(0).expand_as(xr), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode, weight_err", [("int8", 0.01), ("int4", 0.1)])
def test_quantized_layers_match_dequantized_math(mode, weight_err):
    """Both routes (the int kernel for few rows, dequantize + GEMM for many) compute x @ dequant(W).T."""
    w, b = weights()
    layer = quantize_layer(w.bfloat16(), b, mode, CPU, group_size=32)
    assert isinstance(layer, Int8Linear if mode == "int8" else Int4Linear)
    deq = layer.dequantize(torch.float32)
    assert rel(deq, w) < weight_err  # 8 bits per channel, or 4 bits per group of 32
    for rows in (1, 4, linear.FEW_ROWS + 1, 100):
        x = torch.randn(rows, 128)
        want = F.linear(x, deq, b)
        got = layer(x)
        assert got.dtype == x.dtype and got.shape == want.shape
        # The few-row kernels round the activations on the CPU, to bf16 (PyTorch's) or to int8 in blocks of
        # 32 (phi3v's, one row): under 1% of the product.
        assert rel(got, want) < 1e-2, (rows, rel(got, want))


def test_blocked_int4_pairs_are_pytorchs_in_another_order(monkeypatch):
    """Where phi3v's 64-row kernel runs a layer, its (scale, zero) pairs are stored block by block
    (Int4Linear.blocked); `pairs` gives back PyTorch's order, and the layer computes what the same layer
    laid out for PyTorch's kernel does, with phi3v's kernels (one row, many rows) and without them."""
    w, b = weights(n=192, k=256)
    monkeypatch.setattr(linear, "_runs_blocked", lambda n, g: True)
    blocked = quantize_layer(w.bfloat16(), b, "int4", CPU, group_size=64)
    monkeypatch.setattr(linear, "_runs_blocked", lambda n, g: False)
    plain = quantize_layer(w.bfloat16(), b, "int4", CPU, group_size=64)
    assert blocked.blocked and not plain.blocked
    assert blocked.scales_and_zeros.shape == (3, 4, 64, 2) and plain.scales_and_zeros.shape == (4, 192, 2)
    assert torch.equal(blocked.qweight, plain.qweight) and torch.equal(blocked.pairs(), plain.scales_and_zeros)
    for lo, hi in [(64, 192), (0, 64), (0, 192), (128, None)]:
        assert torch.equal(blocked.pairs(lo, hi), plain.pairs(lo, hi)), (lo, hi)
    if linear._cpu_int4_block() == 64:  # the layout the blocked order is for
        assert torch.equal(blocked.dequantize(torch.float32), plain.dequantize(torch.float32))
        for rows in (1, 2, linear.FEW_ROWS + 3):  # 2: PyTorch's kernel, from a kept copy in its order
            x = torch.randn(rows, 256)
            want = F.linear(x, plain.dequantize(torch.float32), b)
            assert rel(blocked(x), want) < 1e-2 and rel(plain(x), want) < 1e-2
            with monkeypatch.context() as m:
                m.setattr(linear.cpu_kernels, "get", lambda: None)  # PyTorch's kernels, in PyTorch's order
                assert rel(blocked(x), want) < 1e-2
        assert torch.equal(blocked._torch_pairs(), plain.scales_and_zeros)
        assert blocked._torch_pairs() is blocked._torch_pairs()


def test_int4_with_a_partial_row_block_runs_prompts_too():
    """96 output rows: a whole number of AVX2 row blocks (32) but not of AVX512 ones (64), which PyTorch
    lays out differently; prompts then take PyTorch's kernel instead of dequantizing."""
    w, b = weights(n=96)
    layer = quantize_layer(w.bfloat16(), b, "int4", CPU, group_size=32)
    x = torch.randn(linear.FEW_ROWS + 8, 128)
    want = F.linear(x, w, b)
    assert rel(layer(x), want) < 0.1 and rel(layer(x[:1]), want[:1]) < 0.1


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_many_rows_dequantize_in_blocks_and_run_in_float32_without_bf16(monkeypatch, mode):
    """Prompts dequantize a block of output rows at a time (bounded temporary memory), and bf16 activations
    take the float32 GEMM on CPUs that emulate bf16, like the dense layers (module docstring)."""
    w, b = weights(n=256)
    layer = quantize_layer(w, b, mode, CPU, group_size=32)
    deq = layer.dequantize(torch.float32)
    assert torch.equal(torch.cat([layer.dequantize(torch.float32, lo, lo + 64) for lo in range(0, 256, 64)]), deq)
    x = torch.randn(2, linear.FEW_ROWS, 128).bfloat16()  # 64 rows: the many-row route
    gemms, plain = [], F.linear
    monkeypatch.setattr(linear, "DEQUANT_BLOCK", 64)
    monkeypatch.setattr(F, "linear", lambda a, w, bias=None: gemms.append((a.dtype, w.shape)) or plain(a, w, bias))
    monkeypatch.setattr(linear, "cpu_has_fast_bf16", lambda: False)
    got = layer(x)
    assert got.dtype == torch.bfloat16 and rel(got, plain(x.float(), deq, b)) < 3e-3
    assert gemms == [(torch.float32, (64, 128))] * 4
    gemms.clear()
    monkeypatch.setattr(linear, "cpu_has_fast_bf16", lambda: True)
    layer(x)
    rows = 128 if linear._own_bf16_dequantizer(layer, x, torch.bfloat16) else 64  # bf16 blocks: same bytes
    assert gemms == [(torch.bfloat16, (rows, 128))] * (256 // rows)


def test_int8_error_is_per_channel():
    """A channel of large weights does not coarsen the others (one scale per output row)."""
    w, _ = weights()
    w[0] *= 1000
    deq = Int8Linear.quantize(w, None, CPU).dequantize(torch.float32)
    assert rel(deq[1:], w[1:]) < 0.01


def test_int4_default_group_is_the_largest_that_divides_the_inputs():
    assert quantize_layer(weights(k=256)[0], None, "int4", CPU).group_size == 128
    assert quantize_layer(weights(k=96)[0], None, "int4", CPU).group_size == 32


def test_int4_group_size_must_divide_inputs():
    with pytest.raises(Phi3VError, match="group size 48 does not divide in_features 128"):
        quantize_layer(weights()[0], None, "int4", CPU, group_size=48)


def test_unknown_mode():
    with pytest.raises(Phi3VError, match="unknown quantization 'int3'"):
        quantize_layer(weights()[0], None, "int3", CPU, group_size=32)


def test_pack_for_cpu_only_touches_float32_linears():
    model = torch.nn.Sequential(Linear(8, 8), Linear(8, 8).to(torch.bfloat16), torch.nn.Linear(8, 8))
    pack_for_cpu(model)
    assert [m.weight.is_mkldnn for m in model] == [True, False, False]


def test_int4_refuses_to_run_off_the_device_it_was_packed_for():
    layer = quantize_layer(weights()[0], None, "int4", CPU, group_size=32)
    layer.packed_for = "cuda"  # as if packed on a GPU and then moved to the CPU
    with pytest.raises(Phi3VError, match="int4 weights packed for cuda cannot run on cpu"):
        layer(torch.randn(1, 128))
