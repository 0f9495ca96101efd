"""Software prefetch distances for the AVX512 decoding kernels (cpu_kernels.prefetch_bytes): batch-1 decode
step time of the real engine per distance, and decode_attention alone over an 800-token cache.

    python bench/prefetch.py --checkpoint /tmp/phi3v-full [--modes bf16 int8 int4] [--distances 0 1024 2048]

`--modes` with no mode measures the attention kernel alone.

Distance 0 (no prefetching, the hardware prefetcher alone) is the baseline, in the same run: the
distances take turns within each round, and each is reported as its median step time and its ratio to 0.
The steps decode from a short text prompt, so the weights dominate; the attention part shows the KV cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import phi3v
from phi3v import cpu_kernels
from phi3v.api import options_from
from phi3v.generate import Batch, Request


def use_distance(d: int) -> None:
    """Make every kernel call from now on prefetch `d` bytes ahead (weights and KV cache alike): through
    PHI3V_PREFETCH, left set for the rest of this process, which only measures."""
    os.environ["PHI3V_PREFETCH"] = str(d)
    cpu_kernels._env_prefetch.cache_clear()
    cpu_kernels.prefetch_bytes.cache_clear()


def step_times(m: phi3v.Phi3V, distances: list[int], rounds: int, steps: int) -> dict[int, float]:
    """Median milliseconds of a decode step per distance."""
    ids = torch.tensor(m.tokenizer.encode("Describe a sunny day at the beach in detail."))
    batch = Batch(m.model, m.tokenizer)
    batch.add(Request(ids, None, options_from(max_new_tokens=rounds * len(distances) * steps + 8, ignore_eos=True)))
    batch.step()
    times: dict[int, list[float]] = {d: [] for d in distances}
    for _ in range(rounds):
        for d in distances:
            use_distance(d)
            t = time.perf_counter()
            for _ in range(steps):
                batch.step()
            times[d].append((time.perf_counter() - t) / steps * 1e3)
    return {d: statistics.median(ts) for d, ts in times.items()}


def attention_times(distances: list[int], rounds: int, n: int = 800) -> dict[int, float]:
    """Median milliseconds of one decode step's attention (32 layers, 32 heads of 96, bf16 cache of n keys)."""
    own = cpu_kernels.get()
    L, H, D = 32, 32, 96
    k = torch.randn(L, 1, H, n + 200, D).bfloat16()  # distinct layers: a cold cache, as in decoding
    v = torch.randn_like(k)
    q, lens = torch.randn(1, H, D), torch.tensor([n])
    times: dict[int, list[float]] = {d: [] for d in distances}
    for _ in range(rounds):
        for d in distances:
            t = time.perf_counter()
            for layer in range(L):
                own.decode_attention(q, k[layer, :, :, :n], v[layer, :, :, :n], lens, 0.1, d)
            times[d].append((time.perf_counter() - t) * 1e3)
    return {d: statistics.median(ts) for d, ts in times.items()}


def report(title: str, times: dict[int, float]) -> None:
    """One markdown table: each distance's median ms and its ratio to no prefetching."""
    base = times[0]
    print(f"\n{title}\n| prefetch bytes | ms | vs none |\n|---:|---:|---:|")
    for d, ms in times.items():
        print(f"| {d} | {ms:.1f} | {ms / base:.2f}x |")


def main() -> None:
    """The attention kernel first (no checkpoint needed), then each mode's decode step."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--modes", nargs="*", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4"])
    ap.add_argument("--distances", type=int, nargs="+", default=[0, 512, 1024, 2048, 3072])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    distances = [0] + [d for d in a.distances if d != 0]
    if cpu_kernels.get() is None:
        raise SystemExit("phi3v's CPU kernels are not available here: nothing to measure")
    print(f"machine: {platform.machine()}, {cpu_kernels.cpu_vendor()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; this CPU's default: {cpu_kernels.prefetch_bytes()} bytes "
          f"(attention {cpu_kernels.prefetch_bytes(attention=True)})")  # fmt: skip
    report("decode_attention, 800-token bf16 cache, 32 layers", attention_times(distances, a.rounds))
    for mode in a.modes:
        m = phi3v.load(a.checkpoint, device="cpu", dtype="bfloat16", quantize=None if mode == "bf16" else mode)
        report(f"{mode}: decode step, batch 1", step_times(m, distances, a.rounds, a.steps))
        del m


if __name__ == "__main__":
    main()
