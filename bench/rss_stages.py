"""Resident memory after each step of one image prompt, with small tensors copied (phi3v's load) against
the same load keeping every right-dtype tensor in the file map (`MAPPED_FROM_BYTES = 0`), same run.

    python bench/rss_stages.py --checkpoint /tmp/phi3v-full [--quantize int4] [--cache cold|warm|both]

Each configuration runs in a fresh subprocess, which reports VmHWM (peak), RssAnon and RssFile after
the load, the image processor, the vision tower, the prefill and the decode. "cold" first drops the
checkpoint's pages from the OS page cache (posix_fadvise DONTNEED: no root needed), so the load reads
the file again and readahead builds the large folios that made mapped small tensors expensive; "warm"
runs on whatever the previous run left cached.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("load", "preprocess", "vision", "prefill", "decode")

CHILD = r"""
import json, sys, torch
from pathlib import Path
import phi3v, phi3v.weights
from phi3v.image_processor import load_image
from staged_prompt import staged_prompt

folder, quantize, image, crops, new_tokens, mapped_from = sys.argv[1:7]
phi3v.weights.MAPPED_FROM_BYTES = int(mapped_from)
rows = {}
def record(stage):
    d = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    rows[stage] = {k: int(d[k].split()[0]) * 1024 for k in ("VmHWM", "RssAnon", "RssFile")}
m = phi3v.load(folder, quantize=None if quantize == "none" else quantize, feature_cache_bytes=0)
record("load")
img = load_image(image)
with torch.inference_mode():
    batch, req, _, _ = staged_prompt(m, img, int(crops), "Describe this image in detail.", int(new_tokens), record)
    while req.finish_reason is None:
        batch.step()
    record("decode")
print(json.dumps(rows))
"""


def evict(folder: Path) -> None:
    """Drop the checkpoint's clean pages from the OS page cache."""
    for path in sorted(folder.glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(code: str, argv: list[str], folder: Path, cold: bool) -> dict:
    """`code` run in a fresh interpreter with `argv`, after dropping `folder`'s checkpoint from the page
    cache if `cold`: the JSON object on its last line of output."""
    if cold:
        evict(folder)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(a: argparse.Namespace, mapped_from: int, cold: bool) -> dict:
    """One configuration in a fresh interpreter: {stage: {VmHWM, RssAnon, RssFile}} in bytes."""
    argv = [str(a.checkpoint), a.quantize, str(a.image), str(a.num_crops), str(a.new_tokens), str(mapped_from)]
    return run_child(CHILD, argv, a.checkpoint, cold)


def main() -> None:
    """Run both loads under each cache state and print one table per run, then the peaks side by side."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"])
    ap.add_argument("--image", type=Path, default=ROOT.parent / "shared/fixtures/images/australia.jpg")
    ap.add_argument("--num-crops", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--cache", default="both", choices=["cold", "warm", "both"])
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    import torch

    from phi3v.weights import MAPPED_FROM_BYTES

    print(f"machine: {platform.processor() or platform.machine()}, kernel {platform.release()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {a.checkpoint}, quantize {a.quantize}, "
          f"num_crops {a.num_crops}, {a.new_tokens} new tokens")  # fmt: skip
    gib = 2**30
    caches = ("cold", "warm") if a.cache == "both" else (a.cache,)
    peaks: dict[tuple[str, str], list[float]] = {}
    for round_ in range(a.repeat):
        for cache in caches:
            for label, mapped_from in (("copied", MAPPED_FROM_BYTES), ("all mapped", 0)):
                rows = run(a, mapped_from, cache == "cold")
                peaks.setdefault((cache, label), []).append(rows["decode"]["VmHWM"] / gib)
                print(f"\nround {round_ + 1}, {cache} cache, small tensors {label} (GiB)")
                print(f"{'after':<11} {'peak':>6} {'anon':>6} {'file':>6}")
                for s in STAGES:
                    r = rows[s]
                    print(f"{s:<11} {r['VmHWM'] / gib:6.2f} {r['RssAnon'] / gib:6.2f} {r['RssFile'] / gib:6.2f}")
    print("\npeak RSS GiB, each round")
    for (cache, label), v in peaks.items():
        print(f"{cache:<5} {label:<11} " + " ".join(f"{x:.2f}" for x in v))


if __name__ == "__main__":
    main()
