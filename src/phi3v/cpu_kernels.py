"""phi3v's own CPU kernels (cpu_kernels.cpp): one row of activations times a bf16, int8 or int4 weight, and
one decoding step's attention, for x86-64 CPUs with AVX2 and FMA; on AVX512 CPUs, variants with
AVX512-BF16 dot products (bf16) and AVX512-VNNI (int8, and int4 in PyTorch's AVX512 layout). They decode
1.2-2.5x faster than PyTorch's kernels (bench/linear_routes.py, docs/benchmarks.md), the AVX512 ones at about
the speed of reading the weights; the int8 and int4 ones round the activations to int8 in blocks of 32,
where PyTorch's round them to bfloat16. On AVX512 CPUs, also the fused steps of a prompt's layers
(cpu_fused.cpp: RMSNorm, SwiGLU, RoPE, CLIP's quick GELU), each one pass instead of PyTorch's several,
rounding as PyTorch's ops do (`fused`).

Compiled with PyTorch's extension builder the first time a model is loaded on such a CPU
(about a minute, needs a C++ compiler; the `ninja` package is a dependency), then loaded from the cache
(`$PHI3V_CACHE`, else `~/.cache/phi3v`). Without a compiler, or with `PHI3V_NATIVE=0`, phi3v uses
PyTorch's kernels: slower, and the same results within that rounding.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [Path(__file__).with_name(n) for n in ("cpu_kernels.cpp", "cpu_fused.cpp")]
# OpenMP: at::parallel_for's backend. No FMA contraction: the dequantizers must round a multiply and an add
# separately, as PyTorch's float32 dequantizing does (the kernels ask for FMAs where they want them).
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off"]


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where it cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration, IndexError):
        return None


def _cpu_supports_avx2() -> bool:
    flags = cpu_flags()
    return os.uname().machine in ("x86_64", "AMD64") and flags is not None and {"avx2", "fma"} <= flags


@functools.cache  # asked on every decoding product
def has_vnni() -> bool:
    """Whether the CPU has AVX512-VNNI on 256-bit registers (the int8 kernel, and the int4 one for PyTorch's
    AVX512 layout)."""
    return {"avx512_vnni", "avx512vl", "avx512bw"} <= (cpu_flags() or frozenset())


@functools.cache
def has_avx512_bf16() -> bool:
    """Whether the CPU has AVX512-BF16 dot products (the bf16 kernel for bfloat16 activations)."""
    return {"avx512_bf16", "avx512bw"} <= (cpu_flags() or frozenset())


@functools.cache
def has_avx512() -> bool:
    """Whether the CPU has the AVX512 subsets the fused kernels use (F, BW, VL)."""
    return {"avx512f", "avx512bw", "avx512vl"} <= (cpu_flags() or frozenset())


def fused(*tensors: torch.Tensor) -> ModuleType | None:
    """The kernels, when their fused layer steps (cpu_fused.cpp) can take these tensors: contiguous, on the
    CPU, all bfloat16 or all float32, none with a gradient to record (the kernels have no backward), on
    an AVX512 CPU; else None, for PyTorch's ops."""
    x = tensors[0]
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if not all(t.dtype == x.dtype and t.device == x.device and t.is_contiguous() for t in tensors):
        return None
    return get() if has_avx512() else None


@functools.cache
def cpu_vendor() -> str | None:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"); None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith("vendor_id")).split(":", 1)[1].strip()
    except (OSError, StopIteration, IndexError):
        return None


PREFETCH_LIMIT = 1 << 16  # far past any distance that helps; beyond it the kernels' addresses go wild


@functools.cache
def _env_prefetch() -> int | None:
    """PHI3V_PREFETCH as bytes; None where it is unset or unusable (said once, on stderr)."""
    env = os.environ.get("PHI3V_PREFETCH")
    if env is None:
        return None
    try:
        if 0 <= (n := int(env)) <= PREFETCH_LIMIT:
            return n
    except ValueError:
        pass
    print(f"phi3v: ignoring PHI3V_PREFETCH={env!r} (expected 0 (off) to {PREFETCH_LIMIT} bytes)", file=sys.stderr)
    return None


@functools.cache  # asked on every decoding product
def prefetch_bytes(attention: bool = False) -> int:
    """How far ahead of their reads the AVX512 decoding kernels ask for a weight's cache lines (or, with
    `attention`, decode_attention for the KV cache's); 0: not at all.

    On the Intel Xeon (bench/results/prefetch-*amx-dec*.md), 2048 bytes made batch-1 decode steps of
    Phi-3-V 18% (bf16), 3% (int8) and 6% (int4) shorter, the one distance that helped all three: 512 and
    1024 helped bf16 alike but slowed int4. The attention over an 800-token cache took 11-18% less time
    with 512, in three runs; 768 to 2048 did the same within the runs' noise.
    On the AMD EPYC the hardware prefetcher was measured to do better alone, so only Intel CPUs get it
    (docs/benchmarks.md). `PHI3V_PREFETCH=N` (bytes, 0 = off) overrides both choices.
    """
    if (env := _env_prefetch()) is not None:
        return env
    if cpu_vendor() != "GenuineIntel":
        return 0
    return 512 if attention else 2048


def _build_dir() -> Path:
    """A cache folder per source, PyTorch and Python version: the built module depends on all three."""
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + " ".join(CFLAGS).encode() + torch.__version__.encode()
                         + sys.version.encode()).hexdigest()[:16]  # fmt: skip
    root = Path(os.environ.get("PHI3V_CACHE") or Path.home() / ".cache" / "phi3v")
    return root / "kernels" / key


@functools.cache
def get() -> ModuleType | None:
    """The compiled kernels, building them on first use; None where they cannot run or be built (the
    reason goes to stderr once)."""
    if os.environ.get("PHI3V_NATIVE", "1") == "0" or not _cpu_supports_avx2():
        return None
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the pip package's binary, when the venv is not activated
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    build = _build_dir()
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        print("phi3v: compiling the CPU kernels (once, about a minute)...", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(
            "phi3v_cpu_kernels",
            [str(s) for s in SOURCES],
            build_directory=str(build),
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # noqa: BLE001 - any build failure means: fall back to PyTorch's kernels
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"phi3v: could not build the CPU kernels ({reason[:200]}); using PyTorch's slower "
              "kernels (set PHI3V_NATIVE=0 to skip this attempt)", file=sys.stderr)  # fmt: skip
        return None


def run(kernel, *args) -> torch.Tensor:
    """Call one of the kernels, under its name in torch.profiler's traces while a profiler runs (calls
    through pybind are otherwise invisible there; bench/profile_decode.py counts the products among them
    as matrix products). Without one, no marker: it costs 7 us, a millisecond per Phi-3-V decode step."""
    if not torch.autograd.profiler._is_profiler_enabled:
        return kernel(*args)
    with torch.profiler.record_function(f"phi3v::{kernel.__name__}"):
        return kernel(*args)
