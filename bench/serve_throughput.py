"""Aggregate decode throughput of `phi3v serve` at 1, 4 and 16 concurrent streaming clients.

    python bench/serve_throughput.py --checkpoint /tmp/phi3v-full [--dtype float32] [--quantize int8] [--tokens 24]

Starts the server on 127.0.0.1, then for each concurrency level runs that many clients at once, each
streaming one text request of `--tokens` new tokens (end tokens ignored, so every client decodes the
same amount). Reported per level: aggregate tokens/s over the whole wall time (prefills included), the
worst time to first token, and the aggregate decode tokens/s once every client is decoding (tokens
after each client's first / time from the last first token to the end). Ratios are to 1 client.
Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.loads(r.read())["status"] == "ready":
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready")


def client(url: str, i: int, tokens: int, out: list) -> None:
    body = {"messages": [{"role": "user", "content": f"Write about the number {i}."}], "max_tokens": tokens,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    n, first, t0 = 0, None, time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
                elif first is None:  # the role chunk is sent as soon as the prompt is prefilled
                    first = time.perf_counter() - t0
    out[i] = (n, first, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--levels", default="1,4,16")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "phi3v", "serve", "--model", args.checkpoint, "--port", str(port),
                               "--dtype", args.dtype, "--quantize", args.quantize, "--max-batch", "16"])  # fmt: skip
    try:
        wait_ready(url)
        import torch

        print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
              f"checkpoint {args.checkpoint}; dtype {args.dtype}; quantize {args.quantize}; "
              f"{args.tokens} new tokens per client")  # fmt: skip
        rows = []
        for level in map(int, args.levels.split(",")):
            out: list = [None] * level
            threads = [threading.Thread(target=client, args=(url, i, args.tokens, out)) for i in range(level)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            total = sum(n for n, _, _ in out)
            ttft = max(f for _, f, _ in out)
            # decode phase: from the moment every client has its first token (all prompts prefilled) to the
            # last token, every client is decoding in the shared batch
            decoded = sum(n - 1 for n, _, _ in out)
            decode_rate = decoded / max(max(e for _, _, e in out) - ttft, 1e-9)
            rows.append((level, total, wall, total / wall, ttft, decode_rate))
        base, dbase = rows[0][3], rows[0][5]
        print(f"{'clients':>7} {'tokens':>7} {'seconds':>8} {'agg tok/s':>10} {'vs 1':>6} {'worst TTFT s':>13} "
              f"{'agg decode tok/s':>17} {'vs 1':>6}")  # fmt: skip
        for level, total, wall, rate, ttft, drate in rows:
            print(f"{level:>7} {total:>7} {wall:>8.1f} {rate:>10.2f} {rate / base:>5.2f}x {ttft:>13.1f} "
                  f"{drate:>17.2f} {drate / dbase:>5.2f}x")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
