"""Huge pages (src/phi3v/hugepages.py) against the same tensors in ordinary 4 KiB pages, same run.

    python bench/hugepages.py --checkpoint /tmp/phi3v-full [--modes int8 int4 bf16] [--rounds 6]

- int8, int4: one loaded model; each round times batch-1 decode steps with the layers' huge-page
  weights, then with copies of them in PyTorch's own memory (or the other way round, alternately).
- attention: `decode_attention` over an 800-token bf16 cache, 32 layers, in huge pages and not; and
  the cost that keeps phi3v's KV cache in ordinary pages: a bf16 image prompt (4 crops) with a fresh
  cache in huge pages against one from torch.zeros, alternately.
- bf16: the weights are views of the file map, advised for huge pages or not; each way runs in a fresh
  process after the checkpoint is dropped from the page cache, so that readahead builds its pages anew.
Each is reported as median milliseconds and the ratio of huge pages to ordinary ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rss_stages import evict  # bench/ is this script's folder on sys.path

ROOT = Path(__file__).resolve().parents[1]

BF16_CHILD = r"""
import json, mmap, sys, time, torch
if sys.argv[2] == "small":
    del mmap.MADV_HUGEPAGE  # weights.iter_tensors advises only where the OS module offers it
import phi3v
from phi3v.api import options_from
from phi3v.generate import Batch, Request
m = phi3v.load(sys.argv[1], dtype="bfloat16", feature_cache_bytes=0)
ids = torch.tensor(m.tokenizer.encode("Describe a sunny day at the beach in detail."))
batch = Batch(m.model, m.tokenizer)
steps, rounds = 6, int(sys.argv[3])
batch.add(Request(ids, None, options_from(max_new_tokens=rounds * steps + 8, ignore_eos=True)))
batch.step()
times = []
for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(steps):
        batch.step()
    times.append((time.perf_counter() - t) / steps * 1e3)
pmd = [l for l in open("/proc/self/smaps_rollup") if l.startswith("FilePmdMapped")][0].split()[1]
print(json.dumps({"times": times, "file_pmd_bytes": int(pmd) * 1024}))
"""


def huge_tensors(model) -> list[tuple[torch.nn.Module, str]]:
    """(module, buffer name) of every quantized buffer the loader put in huge pages."""
    from phi3v.linear import Int4Linear, Int8Linear

    out = []
    for m in model.modules():
        if isinstance(m, Int8Linear):
            out.append((m, "qweight"))
        elif isinstance(m, Int4Linear) and m.blocked:
            out += [(m, "qweight"), (m, "scales_and_zeros")]
    return out


def quantized_steps(checkpoint: str, mode: str, rounds: int, steps: int = 8) -> dict[str, float]:
    """Median decode-step ms with the loader's huge-page weights and with 4 KiB-page copies of them."""
    import phi3v
    from phi3v.api import options_from
    from phi3v.generate import Batch, Request

    m = phi3v.load(checkpoint, quantize=mode, feature_cache_bytes=0)
    bufs = huge_tensors(m.model)
    huge = [getattr(mod, name) for mod, name in bufs]
    small = [t.clone() for t in huge]  # PyTorch's allocator: ordinary pages, unless THP is "always"
    ids = torch.tensor(m.tokenizer.encode("Describe a sunny day at the beach in detail."))
    batch = Batch(m.model, m.tokenizer)
    batch.add(Request(ids, None, options_from(max_new_tokens=rounds * 2 * (steps + 1) + 8, ignore_eos=True)))
    batch.step()
    times: dict[str, list[float]] = {"huge": [], "small": []}
    for r in range(rounds):
        for which in ("huge", "small") if r % 2 == 0 else ("small", "huge"):
            for (mod, name), t in zip(bufs, huge if which == "huge" else small):
                setattr(mod, name, t)
            batch.step()  # the first step after a swap pays for the other tensors' cache state
            t0 = time.perf_counter()
            for _ in range(steps):
                batch.step()
            times[which].append((time.perf_counter() - t0) / steps * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def attention(rounds: int, n: int = 800) -> dict[str, float]:
    """Median ms of one decode step's attention over an n-key bf16 cache, in huge pages and not."""
    from phi3v import cpu_kernels, hugepages

    own = cpu_kernels.get()
    L, H, D = 32, 32, 96
    k = torch.randn(L, 1, H, n + 200, D).bfloat16()
    v = torch.randn_like(k)
    arena = hugepages.HugePages()
    caches = {"huge": (arena.copy(k), arena.copy(v)), "small": (k, v)}
    q, lens = torch.randn(1, H, D), torch.tensor([n])
    times: dict[str, list[float]] = {"huge": [], "small": []}
    for _ in range(rounds):
        for which, (kc, vc) in caches.items():
            t0 = time.perf_counter()
            for layer in range(L):
                own.decode_attention(q, kc[layer, :, :, :n], vc[layer, :, :, :n], lens, 0.1,
                                     cpu_kernels.prefetch_bytes(attention=True))  # fmt: skip
            times[which].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def kv_prefill(checkpoint: str, rounds: int) -> dict[str, float]:
    """Median seconds of a 4-crop image prompt's prefill (bf16) into a fresh KV cache in huge pages and
    into one from torch.zeros."""
    import phi3v
    from phi3v import hugepages, kv_cache
    from phi3v.api import options_from
    from phi3v.generate import Batch, Request
    from phi3v.image_processor import load_image, preprocess
    from phi3v.prompt import build_input_ids, chat_prompt

    real_zeros, real_reserve = torch.zeros, kv_cache.KVCache.reserve

    def huge_zeros(shape, dtype, device):
        n = torch.Size(shape).numel() * dtype.itemsize
        mm, start = hugepages._mapping(n)
        return hugepages._tensor(mm, start, shape, dtype)

    def reserve_in_huge_pages(cache, rows, capacity):  # its torch.zeros is the cache's only allocation
        torch.zeros = huge_zeros
        try:
            real_reserve(cache, rows, capacity)
        finally:
            torch.zeros = real_zeros

    m = phi3v.load(checkpoint, dtype="bfloat16", feature_cache_bytes=0)
    img = load_image(ROOT.parent / "shared/fixtures/images/australia.jpg")
    times: dict[str, list[float]] = {"huge": [], "small": []}
    with torch.inference_mode():
        inputs = preprocess([img], 4)
        feats = m.model.encode_images(inputs.pixel_values, inputs.image_sizes)
        msg = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe."}]}]
        ids = torch.tensor(build_input_ids(m.tokenizer, chat_prompt(msg)[0], inputs.num_img_tokens))
        for r in range(rounds):
            for which in ("huge", "small") if r % 2 == 0 else ("small", "huge"):
                kv_cache.KVCache.reserve = reserve_in_huge_pages if which == "huge" else real_reserve
                batch = Batch(m.model, m.tokenizer)
                t0 = time.perf_counter()
                batch.add(Request(ids, feats, options_from(max_new_tokens=128, ignore_eos=True)))
                times[which].append(time.perf_counter() - t0)
    kv_cache.KVCache.reserve = real_reserve
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bf16_steps(checkpoint: str, rounds: int) -> dict[str, float]:
    """Median bf16 decode-step ms from a file map advised for huge pages and from one that is not, each
    in a fresh process after a cold read."""
    out = {}
    for which in ("huge", "small"):
        evict(Path(checkpoint))
        env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
        run = subprocess.run([sys.executable, "-c", BF16_CHILD, checkpoint, which, str(rounds)], check=True,
                             capture_output=True, text=True, env=env)  # fmt: skip
        r = json.loads(run.stdout.strip().splitlines()[-1])
        out[which] = statistics.median(r["times"])
        out[f"{which} file PMD GiB"] = r["file_pmd_bytes"] / 2**30
    return out


def main() -> None:
    """Each requested part, then one table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--modes", nargs="*", default=["int8", "int4", "bf16"], choices=["int8", "int4", "bf16"])
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"machine: {platform.machine()}, kernel {platform.release()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; THP {thp.read_text().strip() if thp.exists() else 'n/a'}")  # fmt: skip
    rows = {"attention, 800-token cache": attention(a.rounds * 2),
            "bf16 image prompt into a fresh KV cache": kv_prefill(a.checkpoint, a.rounds)}
    for mode in a.modes:
        if mode == "bf16":
            r = bf16_steps(a.checkpoint, a.rounds)
            print(f"bf16 file map in 2 MiB pages: {r['huge file PMD GiB']:.2f} GiB advised, "
                  f"{r['small file PMD GiB']:.2f} GiB not")  # fmt: skip
            rows["bf16 decode step"] = r
        else:
            rows[f"{mode} decode step"] = quantized_steps(a.checkpoint, mode, a.rounds)
    print("\n| | huge pages ms | 4 KiB pages ms | ratio |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['huge']:.1f} | {r['small']:.1f} | {r['huge'] / r['small']:.2f}x |")


if __name__ == "__main__":
    main()
