"""Load time and peak RSS of `phi3v.weights.load_model` against a plain safetensors load, same checkpoint.

    python bench/load_memory.py --checkpoint /tmp/phi3v-full [--make] [--dtype bfloat16]

Each load runs in a fresh subprocess so that ru_maxrss is that load's own peak. The baseline is the
common recipe: `safetensors.safe_open(...).get_tensor()` for every tensor, then `.to(dtype)`, then
`load_state_dict(assign=True)` into a meta-built model.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
from pathlib import Path
folder, dtype, how = Path(sys.argv[1]), getattr(torch, sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
if how == "phi3v":
    from phi3v.weights import load_model
    model = load_model(folder, dtype=dtype)
else:
    from safetensors import safe_open
    from phi3v.config import Phi3VConfig
    from phi3v.model import Phi3VForCausalLM
    from phi3v.weights import is_ignored, shard_map
    cfg = Phi3VConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        model = Phi3VForCausalLM(cfg)
    state = {}
    files = shard_map(folder)
    for shard in sorted(set(files.values())):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                if not is_ignored(k, cfg):
                    state[k] = f.get_tensor(k).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
seconds = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "weights": weights}))
"""


def run(folder: Path, dtype: str, how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), dtype, how], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--make", action="store_true", help="write a full-size random checkpoint there first")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--skip-baseline", action="store_true",
                    help="phi3v only (a float32 baseline load can need weights + file size of memory)")
    args = ap.parse_args()
    if args.make and not (args.checkpoint / "config.json").exists():
        from phi3v.checkpoint import write_checkpoint

        write_checkpoint(args.checkpoint, "full")
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; checkpoint {args.checkpoint}; dtype {args.dtype}")  # fmt: skip
    hows = ("phi3v",) if args.skip_baseline else ("phi3v", "safetensors")
    rows = {how: run(args.checkpoint, args.dtype, how) for how in hows}
    gib = 1024**3
    print(f"{'loader':<12} {'seconds':>8} {'peak RSS GiB':>13} {'weights GiB':>12} {'RSS/weights':>12}")
    for how, r in rows.items():
        print(f"{how:<12} {r['seconds']:8.1f} {r['peak_rss'] / gib:13.2f} {r['weights'] / gib:12.2f} "
              f"{r['peak_rss'] / r['weights']:12.2f}")  # fmt: skip
    if args.skip_baseline:
        return
    p, b = rows["phi3v"], rows["safetensors"]
    print(f"phi3v / baseline: time {p['seconds'] / b['seconds']:.2f}x, peak RSS {p['peak_rss'] / b['peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
