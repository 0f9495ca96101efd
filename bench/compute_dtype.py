"""A quantized model's compute dtype: peak memory and speed of float32 (`auto` on CPUs without bf16
instructions) against bfloat16, same weights, same image.

    python bench/compute_dtype.py --checkpoint /tmp/phi3v-full [--quantize int4] [--new-tokens 48]

Each dtype is one run of bench/speed.py's phi3v child (a fresh process: its peak RSS is its own), with
float32, the baseline, first. The compute dtype decides the KV cache, the embedding, attention and
norms; whatever it is, phi3v's own CPU kernels round the quantized products' activations to int8 and
PyTorch's to bf16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--image", type=Path, default=ROOT.parent / "shared/fixtures/images/australia.jpg")
    ap.add_argument("--quantize", default="int4", choices=["int8", "int4"])
    ap.add_argument("--num-crops", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="phi3v-dtype-"))
    print(f"{a.quantize}, checkpoint {a.checkpoint}, image {a.image.name}, num_crops {a.num_crops}, "
          f"{a.new_tokens} new tokens, greedy, EOS ignored")  # fmt: skip
    print("| compute dtype | peak RSS GiB | vision s | prefill s | TTFT s | decode tok/s |\n|---|---:|---:|---:|---:|---:|")
    rows = {}
    for dtype in ("float32", "bfloat16"):
        cmd = [sys.executable, str(ROOT / "bench/speed.py"), "--child", "phi3v", "--mode", a.quantize,
               "--dtype", dtype, "--checkpoint", str(a.checkpoint), "--image", str(a.image),
               "--num-crops", str(a.num_crops), "--new-tokens", str(a.new_tokens), "--out", str(work / dtype)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        r = rows[dtype] = json.loads(out.strip().splitlines()[-1])
        print(f"| {dtype} | {r['peak_rss'] / 2**30:.2f} | {r['vision_s']:.1f} | {r['prefill_s']:.1f} | "
              f"{r['ttft_s']:.1f} | {r['decode_tok_s']:.2f} |", flush=True)  # fmt: skip
    f, b = rows["float32"], rows["bfloat16"]
    print(f"bfloat16 / float32: peak RSS {b['peak_rss'] / f['peak_rss']:.2f}x, decode {b['decode_tok_s'] / f['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
