"""Linear layers and the matmul kernel each one uses: dense, int8 and int4 weight-only (issue 5).

Every choice here was measured (bench/linear_routes.py, docs/benchmarks.md). On the CPU:
- float32, few rows (decoding): oneDNN with its own weight layout runs 1.2-1.8x faster than MKL's
  GEMV (decode end to end: 1.33x); `pack()` converts a decoder layer once after loading. Prompts run
  on the packed weights too: unpacking them per call for MKL's GEMM measured 20% slower end to end.
  The vision tower, which only ever sees many rows, stays in MKL's plain layout.
- bfloat16, int8 and int4, one row (batch-1 decoding) on x86 CPUs with AVX2: phi3v's own kernels
  (cpu_kernels.cpp): 1.2-1.6x (bf16), 1.4-1.5x (int8) and 2.2-2.5x (int4) faster than PyTorch's on an
  AVX2 CPU; on AVX512 CPUs their AVX512-BF16 / VNNI variants, 1.7x, 1.6x and 1.1-1.4x faster there.
  The bf16 ones keep the activations as they come (float32, or bf16 for the AVX512 one); the int8 and
  int4 ones take float32 or bf16 rows, answer in the same dtype, and quantize them to int8 in blocks of
  32 (0.5% relative error per product, against the weights' own 1% and 10%).
- bfloat16 on a CPU without bf16 instructions: many rows (prefill, vision) run as a float32 GEMM on
  float32 copies of the weight, DEQUANT_BLOCK output rows at a time, ~6x faster than the emulated bf16
  GEMM; few rows stay bf16. (A copy of the whole weight ran no faster and took 200 MB on Phi-3-V.)
- int8 / int4, other few-row products: PyTorch's weight-only kernels, fed bfloat16 activations (float32
  ones run 10-20x slower). Many rows dequantize the weight a block of output rows at a time and use the dense
  GEMM (in float32 where bf16 is emulated, as above), twice as fast as the int kernels there; the
  blocks keep the temporary memory to a few tens of MB instead of several copies of the layer. With
  AVX512-BF16, phi3v's kernels write each block straight as bf16 (`_own_bf16_dequantizer`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi3v import cpu_kernels
from phi3v.errors import Phi3VError

# Up to this many rows a product counts as "decoding" and goes to the few-row kernels.
FEW_ROWS = 32
# Output rows dequantized at a time for a many-row product (a multiple of every int4 layout block): a 32 MB
# float32 buffer on Phi-3-V. 4096 rows held 0.08 GiB more at the int4 peak and prefilled no faster.
DEQUANT_BLOCK = 1024
QUANT_MODES = ("int8", "int4")
# int4 inputs per (scale, zero) pair, by default the first that divides a layer's inputs. 128 is the usual
# choice for 4-bit LLM weights (GPTQ, AWQ, gpt-fast); 32 costs 0.3 GiB more on Phi-3-V for no accuracy the
# pocket model can measure (docs/benchmarks.md).
INT4_GROUP_SIZES = (128, 64, 32)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether the CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX); without them PyTorch's
    bfloat16 matmul is emulated and several times slower than float32."""
    flags = cpu_kernels.cpu_flags()
    if flags is None:
        return True  # not Linux: assume a modern CPU
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


def _gemm_dtype(x: Tensor) -> torch.dtype:
    """The dtype a many-row product runs in: float32 for bf16 activations on a CPU that emulates bf16."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        return torch.float32
    return x.dtype


class _Scratch(threading.local):
    buf = torch.empty(0)


_scratch = _Scratch()


def _records_grad(*inputs: Tensor) -> bool:
    """Whether autograd records a product of `inputs` (it then keeps them for the backward pass)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def _scratch_float32(shape: tuple[int, int], *inputs: Tensor) -> Tensor:
    """This thread's float32 CPU scratch memory as a `shape` tensor, valid until the next call; fresh
    memory instead when autograd records a product of `inputs`, since it keeps the weight for the backward
    pass (F.linear saves it to compute the input's gradient).

    Many-row products on the CPU need a float32 weight per call (converted from bf16, or dequantized).
    Fresh memory for it costs page faults that measured several times the conversion itself (5 s of a
    798-token bf16 prefill of Phi-3-V, and more with the allocator setting of quantized loads), so one
    buffer per thread is kept, grown to the largest block seen: 34 MB on Phi-3-V (1024 rows of 8192).
    """
    if _records_grad(*inputs):
        return torch.empty(shape)
    n = shape[0] * shape[1]
    # A buffer made under torch.inference_mode() cannot be written outside it (and the reverse is fine).
    if _scratch.buf.numel() < n or (_scratch.buf.is_inference() and not torch.is_inference_mode_enabled()):
        _scratch.buf = torch.empty(0)  # free the old one before allocating the new
        _scratch.buf = torch.empty(n)
    return _scratch.buf[:n].view(shape)


def _dequantized_product(layer: Int8Linear | Int4Linear, x: Tensor) -> Tensor:
    """x @ dequant(W).T for many rows of x, dequantizing DEQUANT_BLOCK output rows of W at a time (into the
    scratch buffer on the CPU)."""
    dt = _gemm_dtype(x)
    own = _own_bf16_dequantizer(layer, x, dt)
    cpu = x.device.type == "cpu"

    def rows(lo: int, hi: int) -> Tensor:
        if own is not None:  # half-width rows of the float32 scratch buffer hold the bf16 block
            return own(lo, hi, _scratch_float32((hi - lo, layer.in_features // 2), x).view(torch.bfloat16))
        out = _scratch_float32((hi - lo, layer.in_features), x) if cpu else None
        return layer.dequantize(torch.float32, lo, hi, out=out).to(dt)

    step = 2 * DEQUANT_BLOCK if own is not None else DEQUANT_BLOCK  # bf16 rows: the same scratch bytes
    return _blockwise_product(x, layer.out_features, layer.in_features, layer.bias, dt, step, rows)


def _blockwise_product(x: Tensor, out_features: int, in_features: int, bias: Tensor | None, dt: torch.dtype,
                       step: int, rows: Callable[[int, int], Tensor]) -> Tensor:  # fmt: skip
    """x @ W.T + bias computed in `dt`, `step` output rows of W at a time, each block from rows(lo, hi)."""
    x2 = x.reshape(-1, in_features).to(dt)
    bias = None if bias is None else bias.to(dt)
    blocks = []
    for lo in range(0, out_features, step):
        hi = min(lo + step, out_features)
        blocks.append(F.linear(x2, rows(lo, hi), None if bias is None else bias[lo:hi]))
    y = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)  # cat would copy a lone block
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def _own_bf16_dequantizer(layer: Int8Linear | Int4Linear, x: Tensor, dt: torch.dtype):
    """(lo, hi, out) -> rows lo:hi of `layer`'s weight written into `out` as bfloat16 by phi3v's kernels,
    the same values as layer.dequantize(torch.bfloat16, lo, hi), where a bf16 many-row product on this CPU
    can use them (AVX512-BF16; int4 with blocked pairs, in PyTorch's 64-row layout); else None."""
    if dt != torch.bfloat16 or x.device.type != "cpu" or layer.in_features % 32 or _records_grad(x):
        return None
    if not cpu_kernels.has_avx512_bf16() or (own := cpu_kernels.get()) is None:
        return None
    if isinstance(layer, Int8Linear):
        return lambda lo, hi, out: own.dequantize_int8_bf16(layer.qweight, layer.scales, lo, hi, out)
    if layer.blocked and DEQUANT_BLOCK % 64 == 0:
        return lambda lo, hi, out: own.dequantize_int4_b64_bf16(layer.qweight, layer.scales_and_zeros,
                                                                layer.group_size, lo, hi, out)  # fmt: skip
    return None


def _own_kernels(x: Tensor, shape_ok: bool, *params: Tensor):
    """phi3v's CPU kernels (cpu_kernels.get()) when a product of x (and `params`) can use them: one row on
    the CPU, a shape they handle, no gradient to record; else None."""
    if x.device.type != "cpu" or _rows(x) != 1 or not shape_ok or _records_grad(x, *params):
        return None
    return cpu_kernels.get()


class Linear(nn.Linear):
    """nn.Linear, with faster routes on the CPU (see the module docstring). Same math; only the
    summation order may differ."""

    def pack(self) -> None:
        """Move a float32 CPU weight into oneDNN's blocked layout (replaces it: no extra memory kept)."""
        if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32 and not self.weight.is_mkldnn:
            self.weight = nn.Parameter(self.weight.detach().to_mkldnn(), requires_grad=False)

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.float() need the plain layout back
        if self.weight.is_mkldnn:
            self.weight = nn.Parameter(self.weight.detach().to_dense(), requires_grad=False)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # state_dict() stays plain tensors
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:
            destination[prefix + "weight"] = self.weight.detach().to_dense()

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if w.is_mkldnn:
            y = torch._C._nn.mkldnn_linear(x.reshape(-1, x.shape[-1]).float().to_mkldnn(), w).to_dense()
            y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
            return y if self.bias is None else y + self.bias
        if w.dtype == torch.bfloat16 and (own := _own_kernels(x, w.shape[0] % 4 == 0 and w.shape[1] % 16 == 0, w)):
            x1 = x.reshape(1, -1)
            if x.dtype == torch.bfloat16 and w.shape[1] % 32 == 0 and cpu_kernels.has_avx512_bf16():
                # the same products, exactly
                y = cpu_kernels.run(own.bf16_gemv_avx512, x1.contiguous(), w, cpu_kernels.prefetch_bytes())
            else:
                y = cpu_kernels.run(own.bf16_gemv, x1.float().contiguous(), w)
            y = y.reshape(*x.shape[:-1], -1)
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        if w.dtype == torch.bfloat16 and _rows(x) > FEW_ROWS and _gemm_dtype(x) == torch.float32:
            return _blockwise_product(x, w.shape[0], w.shape[1], self.bias, torch.float32, DEQUANT_BLOCK,
                                      lambda lo, hi: _scratch_float32((hi - lo, w.shape[1]), x, w).copy_(w[lo:hi]))  # fmt: skip
        if _onednn_bias_product(x, w, self.bias):
            return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        return super().forward(x)


@functools.cache
def _has_onednn_pointwise() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_bias_product(x: Tensor, w: Tensor, bias: Tensor | None) -> bool:
    """Whether a many-row bf16 product with a bias goes to oneDNN's linear op, which adds the bias inside
    the product: the same result, bit for bit, 6-15% faster on the vision tower's shapes than F.linear,
    which first copies the bias into every output row (bench/prefill_floor.py). Contiguous inputs only:
    the op reads a strided one wrongly."""
    return (bias is not None and x.device.type == "cpu" and x.dtype == w.dtype == bias.dtype == torch.bfloat16
            and _rows(x) > FEW_ROWS and x.is_contiguous() and w.is_contiguous() and bias.is_contiguous()
            and not _records_grad(x, w, bias) and _has_onednn_pointwise())  # fmt: skip


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Give every float32 CPU `Linear` in `model` the oneDNN layout (a no-op elsewhere). Only worth it for
    layers that decode: the vision tower always sees many rows."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.pack()
    return model


def _kernel_dtype(x: Tensor) -> torch.dtype:
    """The activation dtype PyTorch's weight-only kernels run fast in on this device."""
    return torch.bfloat16 if x.device.type == "cpu" or x.dtype == torch.float32 else x.dtype


class Int8Linear(nn.Module):
    """Weight-only int8, one symmetric scale per output channel: W ~= qweight * scales[:, None]."""

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)  # float32
        self.register_buffer("bias", bias)
        self._kernel_scales: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None, device: torch.device) -> Int8Linear:
        """Quantize `weight` (any float dtype, any device) onto `device`, a block of rows at a time."""
        q = torch.empty(weight.shape, dtype=torch.int8, device=device)
        scales = torch.empty(weight.shape[0], dtype=torch.float32, device=device)
        for lo in range(0, weight.shape[0], 4096):
            w = weight[lo : lo + 4096].to(device=device, dtype=torch.float32)
            s = w.abs().amax(dim=1).clamp(min=1e-12) / 127
            q[lo : lo + 4096] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
            scales[lo : lo + 4096] = s
        return cls(q, scales, None if bias is None else bias.to(device))

    def dequantize(self, dtype: torch.dtype, lo: int = 0, hi: int | None = None, out: Tensor | None = None) -> Tensor:
        """Output rows lo:hi of the weight (all of it by default) in `dtype`, computed in float32 (in `out`,
        a float32 (hi - lo, in_features) tensor, when given)."""
        q = self.qweight[lo:hi]
        w = out.copy_(q) if out is not None else q.to(torch.float32)
        return w.mul_(self.scales[lo:hi, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if _rows(x) > FEW_ROWS:
            return _dequantized_product(self, x)
        x2 = x.reshape(-1, self.in_features)
        if (own := _own_kernels(x, self.out_features % 4 == 0 and self.in_features % 32 == 0)) is not None:
            if cpu_kernels.has_vnni():
                y = cpu_kernels.run(own.int8_gemv_vnni, _kernel_row(x2), self.qweight, self.scales,
                                    cpu_kernels.prefetch_bytes())  # fmt: skip
            else:
                y = cpu_kernels.run(own.int8_gemv, _kernel_row(x2), self.qweight, self.scales)
            return _finish(self, y, x)
        kd = _kernel_dtype(x)
        key = (kd, self.scales.device)
        if key not in self._kernel_scales:
            self._kernel_scales[key] = self.scales.to(kd)
        return _finish(self, torch._weight_int8pack_mm(x2.to(kd), self.qweight, self._kernel_scales[key]), x)


class Int4Linear(nn.Module):
    """Weight-only int4, asymmetric per group of `group_size` inputs: W ~= (q - 8) * scale + zero.

    `qweight` is in the layout of PyTorch's int4 kernel for the device. `scales_and_zeros` holds
    bfloat16 (scale, zero) pairs: (in_features / group_size, out_features, 2) as PyTorch's kernel takes
    them, or, `blocked` where phi3v's 64-row CPU kernel runs the layer, (out_features / 64,
    in_features / group_size, 64, 2), each row block's pairs together (cpu_kernels.cpp says why).
    `pairs` gives them in PyTorch's order either way.
    """

    def __init__(self, qweight: Tensor, scales_and_zeros: Tensor, bias: Tensor | None, shape: tuple[int, int],
                 group_size: int):  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = shape
        self.group_size = group_size
        self.packed_for = qweight.device.type  # the kernel layout differs between CPU and CUDA
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", bias)
        self._pytorch_order: Tensor | None = None  # blocked pairs in PyTorch's order, once its kernel asks

    @property
    def blocked(self) -> bool:
        """Whether the pairs are in the 64-row kernel's blocked order."""
        return self.scales_and_zeros.dim() == 4

    def pairs(self, lo: int = 0, hi: int | None = None) -> Tensor:
        """The (scale, zero) pairs of output rows lo:hi in PyTorch's order, (groups, rows, 2)."""
        sz = self.scales_and_zeros
        if not self.blocked:
            return sz[:, lo:hi]
        hi = self.out_features if hi is None else hi
        block = sz[lo // 64 : -(-hi // 64)]
        return block.transpose(0, 1).reshape(sz.shape[1], -1, 2)[:, lo % 64 : lo % 64 + hi - lo]

    def _torch_pairs(self) -> Tensor:
        """The pairs as PyTorch's CPU kernel takes them. A blocked layer keeps a copy once asked, since a
        few rows at a time (batched decoding) go to that kernel every step: at group 128, 1/16 of the
        codes' size."""
        if not self.blocked:
            return self.scales_and_zeros
        if self._pytorch_order is None:
            self._pytorch_order = self.pairs().contiguous()
        return self._pytorch_order

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None, device: torch.device, group_size: int | None = None
                 ) -> Int4Linear:  # fmt: skip
        """Quantize `weight` onto `device` with min/max scaling per group (15 steps between them); groups
        of `group_size` inputs, or by default the first of INT4_GROUP_SIZES that divides them."""
        n, k = weight.shape
        if group_size is None:
            group_size = next((g for g in INT4_GROUP_SIZES if k % g == 0), INT4_GROUP_SIZES[-1])
        if k % group_size:
            raise Phi3VError(f"int4 group size {group_size} does not divide in_features {k}; use 32, 64 or 128")
        q = torch.empty((n, k), dtype=torch.int32, device=device)
        sz = torch.empty((k // group_size, n, 2), dtype=torch.bfloat16, device=device)
        for lo in range(0, n, 4096):
            w = weight[lo : lo + 4096].to(device=device, dtype=torch.float32).reshape(-1, k // group_size, group_size)
            lo_v, hi_v = w.amin(dim=-1), w.amax(dim=-1)
            scale = ((hi_v - lo_v) / 15).clamp(min=1e-12)
            q[lo : lo + 4096] = torch.round((w - lo_v[..., None]) / scale[..., None]).clamp_(0, 15).reshape(-1, k).int()
            # Store scale and the value of code 8, the kernel's zero point: (q - 8) * scale + zero.
            sz[:, lo : lo + 4096] = torch.stack([scale, lo_v + 8 * scale], dim=-1).transpose(0, 1).to(torch.bfloat16)
        if device.type == "cpu" and _runs_blocked(n, group_size):
            sz = sz.view(k // group_size, n // 64, 64, 2).transpose(0, 1).contiguous()
        return cls(_pack_int4(q), sz, None if bias is None else bias.to(device), (n, k), group_size)

    def dequantize(self, dtype: torch.dtype, lo: int = 0, hi: int | None = None, out: Tensor | None = None) -> Tensor:
        """Output rows lo:hi of the weight (all of it by default; lo and hi multiples of the layout's
        row block) in `dtype`, computed in float32 (in `out`, a float32 (hi - lo, in_features) tensor, when
        given)."""
        hi = self.out_features if hi is None else min(hi, self.out_features)
        k, g = self.in_features, self.group_size
        b = _cpu_int4_block()
        w = out if out is not None else torch.empty(hi - lo, k, device=self.qweight.device)
        _unpack_int4(self.qweight.reshape(-1, k, b // 2)[lo // b : hi // b], out=w)
        s, z = self.pairs(lo, hi).float().unbind(-1)  # (groups, rows)
        # (q - 8) * s + z == q * s + (z - 8 s): two passes over the block instead of three
        w3 = w.view(hi - lo, -1, g).mul_(s.t()[..., None]).add_((z - 8 * s).t()[..., None])
        return w3.view(hi - lo, k).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.qweight.device.type != self.packed_for:
            raise Phi3VError(f"int4 weights packed for {self.packed_for} cannot run on {self.qweight.device.type}; "
                             "load the model with that device instead of moving it")  # fmt: skip
        block = _cpu_int4_block()
        # Dequantizing reads whole row blocks (64 rows with AVX512); a layer with a partial last block, laid
        # out differently by PyTorch, runs its prompts through PyTorch's kernel instead.
        if _rows(x) > FEW_ROWS and x.device.type == "cpu" and block and self.out_features % block == 0:
            return _dequantized_product(self, x)
        x2 = x.reshape(-1, self.in_features)
        kernel = _own_int4_kernel(block, self.out_features, self.group_size)
        if kernel == "int4_gemv_b64" and not self.blocked:
            kernel = None  # laid out where phi3v's kernels were not built: PyTorch's kernel takes it
        if (own := _own_kernels(x, kernel is not None)) is not None:
            extra = (cpu_kernels.prefetch_bytes(),) if kernel == "int4_gemv_b64" else ()
            y = cpu_kernels.run(getattr(own, kernel), _kernel_row(x2), self.qweight, self.scales_and_zeros,
                                self.group_size, *extra)  # fmt: skip
        elif x.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.qweight, self.group_size,
                                                  self._torch_pairs())  # fmt: skip
        else:
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16), self.qweight, self.group_size, self.scales_and_zeros)
        return _finish(self, y, x)


def _own_int4_kernel(block: int | None, out_features: int, group_size: int) -> str | None:
    """The name of phi3v's int4 kernel for PyTorch's CPU layout with row blocks of `block` (32 with AVX2,
    64 with AVX512; the latter kernel needs AVX512-VNNI), or None where none handles the layer."""
    if group_size % 32 or block is None or out_features % block:
        return None
    if block == 32:
        return "int4_gemv"
    return "int4_gemv_b64" if block == 64 and cpu_kernels.has_vnni() else None


def _runs_blocked(out_features: int, group_size: int) -> bool:
    """Whether a CPU int4 layer of this shape gets the blocked pairs of phi3v's 64-row kernel: where that
    kernel handles it and phi3v's kernels are built."""
    kernel = _own_int4_kernel(_cpu_int4_block(), out_features, group_size)
    return kernel == "int4_gemv_b64" and cpu_kernels.get() is not None


def _kernel_row(x2: Tensor) -> Tensor:
    """One row for phi3v's int8/int4 kernels. They take float32 or bfloat16 and answer in the same dtype,
    so such a row goes as it is, with no conversion either way."""
    if x2.dtype in (torch.float32, torch.bfloat16) and x2.is_contiguous():
        return x2
    return x2.float().contiguous()


def _finish(layer: Int8Linear | Int4Linear, y: Tensor, x: Tensor) -> Tensor:
    """A quantized product's (rows, out) result in x's shape and dtype, plus the bias."""
    y = y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)
    return y if layer.bias is None else y + layer.bias.to(x.dtype)


def _pack_int4(q: Tensor) -> Tensor:
    """int32 codes 0..15 (n, k) -> the int4 kernel's weight layout on q's device."""
    if q.device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q, 1)
    return torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)


def _unpack_int4(packed: Tensor, out: Tensor) -> Tensor:
    """The CPU kernel's layout back to codes, written into `out` (n, k) of any dtype: blocks of `b` output
    rows, and within a block for each input column b/2 bytes whose low nibbles hold rows 0..b/2-1 and high
    nibbles the rest."""
    b = _cpu_int4_block()
    n, k = out.shape
    p = packed.reshape(n // b, k, b // 2)
    blocks = out.view(n // b, b, k)
    blocks[:, : b // 2].copy_((p & 15).transpose(1, 2))
    blocks[:, b // 2 :].copy_((p >> 4).transpose(1, 2))
    return out


@functools.cache
def _cpu_int4_block() -> int | None:
    """The row-block size of the CPU int4 layout (it depends on the instruction set), found by packing
    a probe; None when no candidate reproduces it, and dequantizing is then not offered."""
    probe = torch.randint(0, 16, (256, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    if packed.numel() * 2 != probe.numel():
        return None
    for b in (16, 32, 64, 128, 256):
        p = packed.reshape(256 // b, 64, b // 2)
        if torch.equal(torch.cat([p & 15, p >> 4], dim=-1).transpose(1, 2).reshape(256, 64).int(), probe):
            return b
    return None


def check_quant_mode(mode: str | None) -> None:
    """A one-line error for anything but None or one of QUANT_MODES."""
    if mode is not None and mode not in QUANT_MODES:
        raise Phi3VError(f"unknown quantization {mode!r}; use one of {', '.join(QUANT_MODES)} or none")


def quantize_layer(weight: Tensor, bias: Tensor | None, mode: str, device: torch.device,
                   group_size: int | None = None) -> nn.Module:  # fmt: skip
    """A quantized linear layer built from a stored `weight` (and `bias`)."""
    check_quant_mode(mode)
    if mode == "int8":
        return Int8Linear.quantize(weight, bias, device)
    return Int4Linear.quantize(weight, bias, device, group_size)
