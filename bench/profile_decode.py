"""Where a decode step's time goes: torch.profiler over batch-1 decode steps of the real engine.

    python bench/profile_decode.py --checkpoint /tmp/phi3v-full [--mode auto|bf16|int8|int4] [--steps 8]
    python bench/profile_decode.py --checkpoint /tmp/phi3v-full --mode bf16 --prefill 798

Prints the operators by self CPU time and the share of the step that is matrix products (the part
bounded by memory bandwidth); everything else is overhead that does not belong in a decode step.
With --prefill N it profiles instead the prompt pass of N text tokens (the second one: the first
touches the memory-mapped weights), where the matrix products are compute-bound.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

import phi3v
from phi3v.api import options_from
from phi3v.generate import Batch, Request

MATMULS = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm", "aten::mkldnn_linear",
           "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int4pack_mm",
           "phi3v::bf16_gemv", "phi3v::bf16_gemv_avx512", "phi3v::int8_gemv", "phi3v::int8_gemv_vnni",
           "phi3v::int4_gemv", "phi3v::int4_gemv_b64")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--mode", default="auto", choices=["auto", "bf16", "int8", "int4"])
    ap.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 for --mode bf16, else auto)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=0, help="profile a prompt pass of this many tokens instead")
    a = ap.parse_args()
    quantize = a.mode if a.mode.startswith("int") else None
    dtype = a.dtype or ("bfloat16" if a.mode == "bf16" else "auto")
    m = phi3v.load(a.checkpoint, device="cpu", dtype=dtype, quantize=quantize)
    if a.prefill:
        return profile_prefill(m, a)
    ids = torch.tensor(m.tokenizer.encode("Describe a sunny day at the beach in detail."))
    req = Request(ids, None, options_from(max_new_tokens=a.steps + 3, ignore_eos=True))
    batch = Batch(m.model, m.tokenizer)
    batch.add(req)
    batch.step()  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(a.steps):
            batch.step()
        step = (time.perf_counter() - t) / a.steps
    print(f"mode {a.mode} ({m.model.dtype}), {step * 1e3:.0f} ms per decode step, batch 1")
    report(prof)


def profile_prefill(m: phi3v.Phi3V, a: argparse.Namespace) -> None:
    """Time and profile the prompt pass of `a.prefill` random text tokens (after one unprofiled pass)."""
    ids = torch.randint(0, m.tokenizer.vocab_size, (a.prefill,), generator=torch.Generator().manual_seed(0))
    for warm in (True, False):
        batch = Batch(m.model, m.tokenizer)
        req = Request(ids, None, options_from(max_new_tokens=2, ignore_eos=True))
        prof = None if warm else profile(activities=[ProfilerActivity.CPU])
        with prof or contextlib.nullcontext():
            t = time.perf_counter()
            batch.add(req)  # prefills
            took = time.perf_counter() - t
        print(f"mode {a.mode} ({m.model.dtype}), prompt pass of {a.prefill} tokens: {took:.1f} s"
              + (" (first, unprofiled)" if warm else ""), flush=True)  # fmt: skip
    report(prof)


def report(prof: profile) -> None:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"matrix products: {100 * mm / total:.1f}% of self CPU time")


if __name__ == "__main__":
    main()
