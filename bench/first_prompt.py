"""Load time and the first two image prompts' time to first token, with the kept file-map views populated
while loading (phi3v's load) against the same load leaving them to be paged in on first use, same run.

    python bench/first_prompt.py --checkpoint /tmp/phi3v-full [--quantize none] [--cache cold|warm|both]
                                 [--rounds 2]

Each configuration runs in a fresh subprocess: load, then the same 4-crop image prompt twice (image
processor, vision tower, prefill up to the first token), each timed with the minor page faults it took.
"cold" first drops the checkpoint's pages from the OS page cache (bench/rss_stages.py's `run_child`), so
the weights come from the disk: at load with populating, during the first prompt without; "warm" runs
on what the previous run left cached. What a user waits for is load + the first prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from rss_stages import run_child  # bench/ is this script's folder on sys.path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, torch
import phi3v, phi3v.weights
from phi3v.image_processor import load_image
from staged_prompt import staged_prompt

folder, quantize, image, crops, populate = sys.argv[1:6]
if populate == "0":
    phi3v.weights.populate = lambda mm, start, length: None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t0 = time.perf_counter()
m = phi3v.load(folder, quantize=None if quantize == "none" else quantize, feature_cache_bytes=0)
out = {"load_s": time.perf_counter() - t0, "prompts": []}
img = load_image(image)
for _ in range(2):
    with torch.inference_mode():
        f0, at = faults(), {"start": time.perf_counter()}
        staged_prompt(m, img, int(crops), "Describe this image.", 1, lambda stage: at.__setitem__(stage, time.perf_counter()))
    out["prompts"].append({"vision_s": at["vision"] - at["start"], "prefill_s": at["prefill"] - at["vision"],
                           "ttft_s": at["prefill"] - at["start"], "faults": faults() - f0})
print(json.dumps(out))
"""


def run(a: argparse.Namespace, populate: bool, cold: bool) -> dict:
    """One configuration in a fresh interpreter: {load_s, prompts: [{vision_s, prefill_s, ttft_s, faults}] x 2}."""
    argv = [str(a.checkpoint), a.quantize, str(a.image), str(a.num_crops), "1" if populate else "0"]
    return run_child(CHILD, argv, a.checkpoint, cold)


def main() -> None:
    """Interleave the configurations round by round; print one row per run."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--image", type=Path, default=ROOT.parent / "shared/fixtures/images/australia.jpg")
    ap.add_argument("--num-crops", type=int, default=4)
    ap.add_argument("--cache", default="both", choices=["cold", "warm", "both"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    a = ap.parse_args()
    caches = {"cold": [True], "warm": [False], "both": [True, False]}[a.cache]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {a.checkpoint}, quantize {a.quantize}, "
          f"num_crops {a.num_crops}")  # fmt: skip
    print("| round | page cache | kept views | load s | 1st prompt: vision s | prefill s | TTFT s | faults "
          "| load + 1st TTFT s | 2nd prompt TTFT s |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for r in range(a.rounds):
        for cold in caches:
            for populate in (True, False):
                res = run(a, populate, cold) | {"round": r, "cold": cold, "populate": populate}
                rows.append(res)
                p1, p2 = res["prompts"]
                print(f"| {r} | {'cold' if cold else 'warm'} | {'populated at load' if populate else 'paged in on use'} "
                      f"| {res['load_s']:.2f} | {p1['vision_s']:.2f} | {p1['prefill_s']:.2f} | {p1['ttft_s']:.2f} "
                      f"| {p1['faults']} | {res['load_s'] + p1['ttft_s']:.2f} | {p2['ttft_s']:.2f} |", flush=True)  # fmt: skip
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
