"""One linear product per kernel route of src/phi3v/linear.py, at decode and prompt row counts.

    python bench/linear_routes.py [--n 16384] [--k 3072] [--rows 1 16 787]

The baseline is MKL's float32 `F.linear`, in the same run; each route's median time and its ratio to it.
"PyTorch kernel" rows are the quantized layers with phi3v's own CPU kernels switched off.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from phi3v import cpu_kernels, linear
from phi3v.linear import Int4Linear, Int8Linear, Linear


def median_times(routes: dict, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Each route's median milliseconds over `reps` rounds, the routes interleaved within a round so that
    this machine's slow drifts (10-20% between runs) reach all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in routes}
    for f in routes.values():
        f(x)  # warm-up: first-call conversions, caches
    for _ in range(reps):
        for name, f in routes.items():
            t = time.perf_counter()
            f(x)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def pytorch_kernels(layer):
    """`layer` with phi3v's own CPU kernels switched off: PyTorch's weight-only kernels instead."""

    def run(x):
        own, linear._own_kernels = linear._own_kernels, lambda *args: None
        try:
            return layer(x)
        finally:
            linear._own_kernels = own

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--k", type=int, default=3072)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 787])
    a = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(a.n, a.k) * 0.02
    packed = Linear(a.k, a.n, bias=False)
    packed.weight.data = w.clone()
    packed.pack()

    def bf16():
        layer = Linear(a.k, a.n, bias=False, dtype=torch.bfloat16)
        layer.weight.data = w.bfloat16()
        return layer

    def int8():
        return Int8Linear.quantize(w, None, torch.device("cpu"))

    def int4(g):
        return Int4Linear.quantize(w, None, torch.device("cpu"), g)

    # Every route reads its own copy of the weight, and a round reads them all in turn (over 500 MB), so
    # that no route finds its weight in the CPU's cache (32 MB of L3 here holds a whole int4 weight).
    wb, b1, b2 = bf16().weight, bf16(), bf16()
    routes = {
        "fp32 MKL F.linear": lambda x: F.linear(x, w),
        "fp32 oneDNN packed": packed,
        "bf16 F.linear": lambda x: F.linear(x.bfloat16(), wb),
        "bf16 (Linear)": lambda x: b1(x.bfloat16()),
        "bf16 (Linear), fp32 row": b2,  # one row: the AVX2 kernel (AVX512-BF16's takes bf16 rows only)
        "int8 PyTorch kernel": pytorch_kernels(int8()),
        "int8 (Int8Linear)": int8(),
        "int4 g32 PyTorch kernel": pytorch_kernels(int4(32)),
        "int4 g32 (Int4Linear)": int4(32),
        "int4 g128 PyTorch kernel": pytorch_kernels(int4(128)),
        "int4 g128 (Int4Linear)": int4(128),
        "int8 (Int8Linear), bf16": lambda x, layer=int8(): layer(x.bfloat16()),  # a bf16 model's activations
        "int4 g128 (Int4Linear), bf16": lambda x, layer=int4(128): layer(x.bfloat16()),
    }
    own = "phi3v's own kernels for 1 row" if cpu_kernels.get() is not None else "no own kernels on this CPU"
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"product [{a.n}x{a.k}] float32 activations; {own}")  # fmt: skip
    for rows in a.rows:
        x = torch.randn(rows, a.k)
        reps = 30 if rows <= 32 else 3
        with torch.inference_mode():
            ms = median_times(routes, x, reps)
        for name, t in ms.items():
            print(f"rows {rows:4d}  {name:<24} {t:8.1f} ms  {ms['fp32 MKL F.linear'] / t:5.2f}x vs MKL fp32")


if __name__ == "__main__":
    main()
