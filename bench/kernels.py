"""One linear product per kernel route of src/phi3v/linear.py, at decode and prompt row counts.

    python bench/kernels.py [--n 16384] [--k 3072] [--rows 1 16 787]

The baseline is MKL's float32 `F.linear`, in the same run; each route's time and its ratio to it.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from phi3v import cpu_kernels, linear
from phi3v.linear import Int4Linear, Int8Linear, Linear


def timed(f, reps: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e3


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
    int8 = Int8Linear.quantize(w, None, torch.device("cpu"))
    int4 = {g: Int4Linear.quantize(w, None, torch.device("cpu"), g) for g in (32, 128)}
    routes = {
        "fp32 MKL F.linear": lambda x: F.linear(x, w),
        "fp32 oneDNN packed": packed,
        "bf16 F.linear": (lambda wb: lambda x: F.linear(x.bfloat16(), wb))(w.bfloat16()),
        "int8 PyTorch kernel": pytorch_kernels(int8),
        "int8 (Int8Linear)": int8,
        "int4 g32 PyTorch kernel": pytorch_kernels(int4[32]),
        "int4 g32 (Int4Linear)": int4[32],
        "int4 g128 PyTorch kernel": pytorch_kernels(int4[128]),
        "int4 g128 (Int4Linear)": int4[128],
    }
    own = "phi3v's own kernels for 1 row" if cpu_kernels.get() is not None else "no own kernels on this CPU"
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"product [{a.n}x{a.k}] float32 activations; {own}")  # fmt: skip
    for rows in a.rows:
        x = torch.randn(rows, a.k)
        reps = 20 if rows <= 32 else 3
        with torch.inference_mode():
            base = timed(lambda: routes["fp32 MKL F.linear"](x), reps)
            for name, f in routes.items():
                ms = timed(lambda: f(x), reps)
                print(f"rows {rows:4d}  {name:<24} {ms:8.1f} ms  {base / ms:5.2f}x vs MKL fp32")


if __name__ == "__main__":
    main()
