"""A quantized model's compute dtype: peak memory and speed of float32 (`auto` on CPUs without bf16
instructions) against bfloat16, same weights, same image.

    python bench/compute_dtype.py --checkpoint /tmp/phi3v-full [--quantize int4] [--new-tokens 48]

Each dtype runs in a fresh process (peak RSS is VmHWM, that process's own). The weight-only kernels take
bf16 activations either way; the compute dtype decides the KV cache, the embedding, attention and norms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
import phi3v
from phi3v.api import options_from
from phi3v.generate import Batch, Request
from phi3v.image_processor import load_image, preprocess
from phi3v.prompt import build_input_ids, chat_prompt
folder, image, mode, dtype, new = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
t = time.perf_counter()
m = phi3v.load(folder, device="cpu", dtype=dtype, quantize=mode, feature_cache_bytes=0)
load = time.perf_counter() - t
img = load_image(image)
with torch.inference_mode():
    t0 = time.perf_counter()
    inputs = preprocess([img], 4)
    feats = m.model.encode_images(inputs.pixel_values, inputs.image_sizes)
    t1 = time.perf_counter()
    msg = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe this image."}]}]
    ids = torch.tensor(build_input_ids(m.tokenizer, chat_prompt(msg)[0], inputs.num_img_tokens))
    req = Request(ids, feats, options_from(max_new_tokens=new, ignore_eos=True))
    batch = Batch(m.model, m.tokenizer)
    batch.add(req)
    t2 = time.perf_counter()
    while req.finish_reason is None:
        batch.step()
    t3 = time.perf_counter()
hwm = next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
print(json.dumps({"load_s": load, "vision_s": t1 - t0, "prefill_s": t2 - t1, "ttft_s": t2 - t0,
                  "decode_tok_s": (len(req.tokens) - 1) / (t3 - t2), "peak_rss": hwm}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--image", type=Path, default=ROOT.parent / "shared/fixtures/images/australia.jpg")
    ap.add_argument("--quantize", default="int4", choices=["int8", "int4"])
    ap.add_argument("--new-tokens", type=int, default=48)
    a = ap.parse_args()
    print(f"{a.quantize}, checkpoint {a.checkpoint}, image {a.image.name}, num_crops 4, {a.new_tokens} new tokens")
    print("| compute dtype | peak RSS GiB | vision s | prefill s | TTFT s | decode tok/s |\n|---|---:|---:|---:|---:|---:|")
    rows = {}
    for dtype in ("float32", "bfloat16"):  # float32 first: the baseline
        cmd = [sys.executable, "-c", CHILD, str(a.checkpoint), str(a.image), a.quantize, dtype, str(a.new_tokens)]
        r = rows[dtype] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"| {dtype} | {r['peak_rss'] / 2**30:.2f} | {r['vision_s']:.1f} | {r['prefill_s']:.1f} | "
              f"{r['ttft_s']:.1f} | {r['decode_tok_s']:.2f} |", flush=True)  # fmt: skip
    f, b = rows["float32"], rows["bfloat16"]
    print(f"bfloat16 / float32: peak RSS {b['peak_rss'] / f['peak_rss']:.2f}x, decode {b['decode_tok_s'] / f['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
