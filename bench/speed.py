"""End-to-end speed and memory: phi3v in each weight mode against a transformers baseline, same weights.

    python bench/speed.py --checkpoint /tmp/phi3v-full [--num-crops 4 16] [--new-tokens 128]
                          [--modes auto bf16 int8 int4] [--baselines sdpa-fp32 eager-fp32 sdpa-bf16]

One image, greedy, EOS ignored. Every configuration runs in its own subprocess, so peak RSS is its own.
Measured per run: load seconds and peak RSS, image processing ms, vision encode s, prefill tokens/s,
time to first token (image decode -> first token), decode tokens/s.

The baseline is what the official remote code computes, built from transformers' native parts:
CLIPVisionModel (all 24 layers, hidden_states[-2]) + the HD transform and projector (phi3v's functions,
a few ms) + Phi3ForCausalLM.generate(inputs_embeds=...), with `attn_implementation` eager or sdpa.

Numerical cost: the bf16 run's greedy tokens are the reference; every run is then teacher-forced along
them (one full pass) and its logits at those positions are compared with bf16's: top-1 agreement and
relative error. The memory-bandwidth limit is measured copy bandwidth / bytes of weights read per
decode step, with the copy measured right before each run; each mode's decode rate is reported as a
fraction of it. `--repeat N` runs every configuration N times in interleaved rounds and reports the
issue's ratios (quantized decode against bf16, bf16 against transformers) per round and their medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phi3v.linear import INT4_GROUP_SIZES

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe this image in detail."


def peak_rss() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss it does not inherit the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_phi3v(a: argparse.Namespace) -> dict:
    import torch

    import phi3v
    from phi3v.image_processor import load_image
    from staged_prompt import staged_prompt  # bench/ is this script's folder on sys.path

    dtype = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}.get(a.mode, a.dtype)
    quantize = a.mode if a.mode in ("int8", "int4") else None
    t0 = time.perf_counter()
    m = phi3v.load(a.checkpoint, device=a.device, dtype=dtype, quantize=quantize, group_size=a.group_size,
                   feature_cache_bytes=0)  # fmt: skip
    out = {"load_s": time.perf_counter() - t0, "dtype": str(m.model.dtype).removeprefix("torch."),
           "kv_dtype": str(m.model.cache_dtype).removeprefix("torch.")}
    img = load_image(a.image)
    with torch.inference_mode():
        at = {"start": time.perf_counter()}
        batch, req, feats, ids = staged_prompt(m, img, a.num_crops, PROMPT, a.new_tokens,
                                               lambda stage: at.__setitem__(stage, time.perf_counter()))  # fmt: skip
        while req.finish_reason is None:
            batch.step()
        t4 = time.perf_counter()
        out |= {"image_ms": (at["preprocess"] - at["start"]) * 1e3, "vision_s": at["vision"] - at["preprocess"],
                "prefill_s": at["prefill"] - at["vision"], "ttft_s": at["prefill"] - at["start"],
                "prompt_tokens": len(ids), "decode_tok_s": (len(req.tokens) - 1) / (t4 - at["prefill"]),
                "tokens": req.tokens, "peak_rss": peak_rss()}  # fmt: skip
        out["logits"] = None
        if a.agree:
            full = torch.cat([ids, torch.tensor(a.ref_tokens or req.tokens)])
            x = m.model.embed(full[None], feats)
            out["logits"] = teacher_forced(m.model, x, len(req.tokens))
    return out


def teacher_forced(model, x, n: int):
    """Logits for the last n positions of one full causal pass over embeddings x (1, T, hidden), its keys
    and values stored in and read back from a KV cache of the model's cache dtype, as in generation."""
    import torch

    from phi3v.kv_cache import KVCache
    from phi3v.language import AttentionInputs
    from phi3v.rope import cos_sin

    T, t = x.shape[1], model.config.text
    pos = torch.arange(T)[None]
    cos, sin = cos_sin(t, pos, x.dtype, pos.amax(dim=1) + 1)
    cache = KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, model.cache_dtype, model.device)
    cache.reserve(1, T)
    h = model.decode_layers(x, AttentionInputs(cos, sin, None, pos, cache, slice(0, 1), T))
    return model.logits(h[:, T - n - 1 : T - 1])[0]


def child_transformers(a: argparse.Namespace) -> dict:
    import torch
    import transformers
    from safetensors import safe_open

    sys.path.insert(0, str(ROOT))
    from phi3v.config import Phi3VConfig
    from phi3v.image_embedding import hd_feature_transform, merge_2x2
    from phi3v.image_processor import load_image, preprocess
    from phi3v.prompt import Tokenizer, build_input_ids, chat_prompt
    from phi3v.weights import CLIP_PREFIX, shard_map
    from tests.hf_reference import clip_config, phi3_config

    attn, dt = a.mode.split("-")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt]
    folder = Path(a.checkpoint)
    t0 = time.perf_counter()
    cfg = Phi3VConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        lm = transformers.Phi3ForCausalLM(phi3_config(cfg.text, attn))
        clip = transformers.CLIPVisionModel(clip_config(cfg.vision, attn))
        proj = torch.nn.Sequential(torch.nn.Linear(4 * cfg.vision.hidden_size, cfg.text.hidden_size), torch.nn.GELU(),
                                   torch.nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size))  # fmt: skip
    tower = getattr(clip, "vision_model", clip)
    lm_state, clip_state, glue = {}, {}, {}
    for shard in sorted(set(shard_map(folder).values())):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                if "position_ids" in k or "inv_freq" in k:
                    continue
                t = f.get_tensor(k).to(dtype)
                if k.startswith(CLIP_PREFIX):
                    clip_state[k[len(CLIP_PREFIX) :]] = t
                elif k.startswith("model.vision_embed_tokens."):
                    glue[k.removeprefix("model.vision_embed_tokens.")] = t
                else:
                    lm_state[k] = t
    lm.load_state_dict(lm_state, strict=True, assign=True)
    tower.load_state_dict(clip_state, strict=True, assign=True)
    proj.load_state_dict({k.removeprefix("img_projection."): v for k, v in glue.items() if "img_projection" in k},
                         strict=True, assign=True)  # fmt: skip
    # Buffers computed at construction (rotary frequencies, CLIP's position ids) must not stay on meta.
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=lm.config)
    tower.embeddings.register_buffer("position_ids", torch.arange(tower.embeddings.num_positions)[None], False)
    left = [n for n, b in [*lm.named_buffers(), *clip.named_buffers()] if b.is_meta]
    assert not left, left
    lm.eval(), clip.eval()
    out = {"load_s": time.perf_counter() - t0, "dtype": dt}
    tok = Tokenizer.from_dir(folder)
    img = load_image(a.image)
    stamps = []

    class Clock:  # a streamer: generate() calls put() once with the prompt, then once per new token
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    with torch.inference_mode():
        t0 = time.perf_counter()
        inputs = preprocess([img], a.num_crops)
        t1 = time.perf_counter()
        h, w = (int(v) // 336 for v in inputs.image_sizes[0])
        crops = inputs.pixel_values[0, : 1 + h * w].to(dtype)
        hidden = clip(pixel_values=crops, output_hidden_states=True).hidden_states[-2][:, 1:]
        merged = merge_2x2(hidden)
        feats = proj(hd_feature_transform(merged, h, w, glue["sub_GN"], glue["glb_GN"]))
        t2 = time.perf_counter()
        prompt, _ = chat_prompt([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": PROMPT}]}])
        ids = torch.tensor(build_input_ids(tok, prompt, inputs.num_img_tokens), dtype=torch.long)
        emb = lm.model.embed_tokens(ids.clamp_min(0))
        emb[ids < 0] = feats.to(emb.dtype)
        gen = lm.generate(inputs_embeds=emb[None], max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                          do_sample=False, streamer=Clock(), pad_token_id=0)  # fmt: skip
        new = gen[0, -a.new_tokens :].tolist()
        first, last = stamps[-a.new_tokens], stamps[-1]
        out |= {"image_ms": (t1 - t0) * 1e3, "vision_s": t2 - t1, "prefill_s": first - t2, "ttft_s": first - t0,
                "prompt_tokens": len(ids), "decode_tok_s": (a.new_tokens - 1) / (last - first), "tokens": new,
                "peak_rss": peak_rss()}  # fmt: skip
        out["logits"] = None
        if a.agree:  # another full pass: minutes at full size in bf16 on a CPU without bf16 instructions
            full = torch.cat([ids, torch.tensor(a.ref_tokens or new)])
            x = lm.model.embed_tokens(full.clamp_min(0))
            x[full < 0] = feats.to(x.dtype)
            out["logits"] = lm(inputs_embeds=x[None]).logits[0, -len(new) - 1 : -1].float()
    return out


def copy_bandwidth() -> tuple[float, float]:
    """Bytes per second of a large tensor copy (read + write; the bandwidth limit's measure) and of a
    plain read (a sum: what a decode step does with its weights), each the best of 5."""
    import torch

    a = torch.ones(256 << 20, dtype=torch.float32)  # 1 GiB
    b = torch.empty_like(a)
    copy = read = 0.0
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        copy = max(copy, 2 * a.numel() * 4 / (time.perf_counter() - t))
        t = time.perf_counter()
        a.sum()
        read = max(read, a.numel() * 4 / (time.perf_counter() - t))
    return copy, read


def decode_bytes(checkpoint: Path, mode: str, dtype: str, group_size: int) -> float:
    """Bytes of weights read per decode step: decoder linears and lm_head in the mode's storage."""
    from phi3v.config import Phi3VConfig

    t = Phi3VConfig.from_file(Path(checkpoint) / "config.json").text
    h, i, kv = t.hidden_size, t.intermediate_size, t.num_key_value_heads * t.head_dim
    layer = h * (h + 2 * kv) + h * h + h * 2 * i + i * h
    n, head = t.num_hidden_layers * layer, t.vocab_size * h
    full = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2}[dtype]
    if mode == "int8":
        return n * 1 + head * 1
    if mode == "int4":
        return n * (0.5 + 4 / group_size) + head * 1  # codes + a bf16 (scale, zero) pair per group
    return (n + head) * full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--image", type=Path, default=ROOT.parent / "shared/fixtures/images/australia.jpg")
    ap.add_argument("--num-crops", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["auto", "bf16", "int8", "int4"])
    ap.add_argument("--baselines", nargs="*", default=["sdpa-fp32", "eager-fp32", "sdpa-bf16", "eager-bf16"])
    ap.add_argument("--baseline-crops", type=int, nargs="*", default=[4], help="crop settings the baselines run at")
    ap.add_argument("--no-agreement", action="store_true", help="skip the bf16 reference and the teacher-forced passes")
    ap.add_argument("--baseline-agreement", action="store_true",
                    help="also teacher-force the baselines (shows they compute what phi3v does; one more prefill each)")
    ap.add_argument("--group-size", type=int, default=INT4_GROUP_SIZES[0],
                    help="int4 inputs per group (default: phi3v's, which fits Phi-3-V's every layer)")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every configuration, interleaved; ratios are taken within a round")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/speed.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="auto", help="with --child: compute dtype of int8/int4 (bench/compute_dtype.py)")
    ap.add_argument("--ref", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--agree", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        import torch

        a.num_crops = a.num_crops[0]
        a.ref_tokens = json.loads(a.ref.read_text()) if a.ref else None
        res = child_phi3v(a) if a.child == "phi3v" else child_transformers(a)
        torch.save(res.pop("logits"), a.out.with_suffix(".logits.pt"))
        print(json.dumps(res))
        return
    run_all(a)


def warm_page_cache(folder: Path) -> float:
    """Read every file of the checkpoint once, so each run loads it from the OS page cache, as every
    later run would anyway: left out of it (after bench/first_prompt.py, say), the first run alone read
    the disk and its first token came 12 s late. Returns the seconds taken."""
    t0 = time.perf_counter()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
    return time.perf_counter() - t0


def run_all(a: argparse.Namespace) -> None:
    import torch

    a.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="phi3v-bench-"))
    print(f"read the checkpoint into the page cache in {warm_page_cache(a.checkpoint):.1f} s", flush=True)
    bw, read = copy_bandwidth()
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}, copy bandwidth {bw / 1e9:.1f} GB/s (read alone {read / 1e9:.1f})")  # fmt: skip
    print(f"machine: {machine}\ncheckpoint {a.checkpoint}, image {a.image.name}, {a.new_tokens} new tokens, greedy, "
          f"EOS ignored, int4 group {a.group_size}, {a.repeat} round(s)", flush=True)  # fmt: skip
    rows = []
    for crops in a.num_crops:
        ref = work / f"ref-{crops}.json"
        first = [] if a.no_agreement else [("phi3v", "bf16")]
        runs = first + [("phi3v", m) for m in a.modes if a.no_agreement or m != "bf16"]
        if crops in a.baseline_crops:
            runs += [("transformers", b) for b in a.baselines]
        ref_logits = None
        # Rounds run every configuration once, in the same order, so that a drift of the machine's speed
        # (this VM's copy bandwidth moved by 1.5x within an hour) reaches each alike: the ratios between
        # configurations are taken within a round, and their median reported.
        for round_ in range(a.repeat):
            for kind, mode in runs:
                stem = work / f"{kind}-{mode}-{crops}"
                cmd = [sys.executable, __file__, "--child", kind, "--mode", mode, "--checkpoint", str(a.checkpoint),
                       "--image", str(a.image), "--num-crops", str(crops), "--new-tokens", str(a.new_tokens),
                       "--group-size", str(a.group_size), "--device", a.device, "--out", str(stem)]  # fmt: skip
                if ref.exists():
                    cmd += ["--ref", str(ref)]
                agree = round_ == 0 and not a.no_agreement and (kind == "phi3v" or a.baseline_agreement)
                if agree:
                    cmd += ["--agree"]
                # The bandwidth limit of each run is measured just before it, not once for the whole bench.
                run_bw, run_read = copy_bandwidth() if a.device == "cpu" else (bw, read)
                t = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if p.returncode:
                    print(f"{kind} {mode} crops={crops} FAILED:\n{p.stderr[-3000:]}", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                logits = torch.load(stem.with_suffix(".logits.pt"))
                if ref_logits is None and logits is not None:
                    ref.write_text(json.dumps(r["tokens"]))
                    ref_logits = logits
                if logits is not None:
                    r["top1_vs_bf16"] = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
                    r["logits_rel_err"] = ((logits - ref_logits).norm() / ref_logits.norm()).item()
                weights_mode = mode if kind == "phi3v" else "dense"
                limit = run_bw / decode_bytes(a.checkpoint, weights_mode, r["dtype"], a.group_size)
                r |= {"impl": kind, "mode": mode, "num_crops": crops, "round": round_, "copy_gb_s": run_bw / 1e9,
                      "read_gb_s": run_read / 1e9, "bw_limit_tok_s": limit, "bw_fraction": r["decode_tok_s"] / limit,
                      "wall_s": time.perf_counter() - t}  # fmt: skip
                r.pop("tokens")
                rows.append(r)
                print(fmt(r), flush=True)
    summary = ratios(rows)
    a.out.write_text(json.dumps({"machine": machine, "new_tokens": a.new_tokens, "rows": rows, "ratios": summary},
                                indent=1))  # fmt: skip
    print(table(rows))
    if summary:
        print("\n" + ratio_table(summary))


def ratios(rows: list[dict]) -> list[dict]:
    """The issue's ratios within each round (phi3v int8 and int4 decode against phi3v bf16; phi3v bf16 decode
    and time to first token against the best transformers baseline of the round), with their medians over
    the rounds."""
    import statistics

    out = []
    for crops in sorted({r["num_crops"] for r in rows}):
        per_round: dict[str, list[float]] = {}
        for rnd in sorted({r["round"] for r in rows}):
            got = {(r["impl"], r["mode"]): r for r in rows if r["num_crops"] == crops and r["round"] == rnd}
            bf16 = got.get(("phi3v", "bf16"))
            base = [r for (impl, _), r in got.items() if impl == "transformers"]
            if bf16 is None:
                continue
            for q in ("int8", "int4"):
                if ("phi3v", q) in got:
                    per_round.setdefault(f"{q} decode / bf16 decode", []).append(
                        got[("phi3v", q)]["decode_tok_s"] / bf16["decode_tok_s"])  # fmt: skip
            if base:
                best = max(base, key=lambda r: r["decode_tok_s"])
                per_round.setdefault("bf16 decode / best transformers decode", []).append(
                    bf16["decode_tok_s"] / best["decode_tok_s"])  # fmt: skip
                fastest = min(base, key=lambda r: r["ttft_s"])
                per_round.setdefault("bf16 TTFT / best transformers TTFT", []).append(bf16["ttft_s"] / fastest["ttft_s"])
        out += [{"num_crops": crops, "ratio": k, "rounds": v, "median": statistics.median(v)} for k, v in per_round.items()]
    return out


def ratio_table(summary: list[dict]) -> str:
    """A markdown table of `ratios`' output."""
    lines = ["| crops | ratio | per round | median |", "|---|---|---|---:|"]
    for s in summary:
        lines.append(f"| {s['num_crops']} | {s['ratio']} | {', '.join(f'{v:.2f}' for v in s['rounds'])} | "
                     f"**{s['median']:.2f}** |")  # fmt: skip
    return "\n".join(lines)


def fmt(r: dict) -> str:
    return (f"round {r['round']} {r['impl']:<12} {r['mode']:<10} crops={r['num_crops']:<3} {r['dtype']:<8} "
            f"kv {r.get('kv_dtype', r['dtype']):<8} load {r['load_s']:6.1f}s "
            f"rss {r['peak_rss'] / 2**30:5.2f}GiB img {r['image_ms']:6.0f}ms vision {r['vision_s']:6.1f}s "
            f"prefill {r['prompt_tokens'] / r['prefill_s']:6.1f}tok/s ttft {r['ttft_s']:6.1f}s "
            f"decode {r['decode_tok_s']:5.2f}tok/s ({100 * r['bw_fraction']:3.0f}% of bw) "
            f"top1 {agreement(r)}")  # fmt: skip


def agreement(r: dict) -> str:
    if "top1_vs_bf16" not in r:
        return "-"
    return f"{100 * r['top1_vs_bf16']:.1f}% | {r['logits_rel_err']:.1e}"


def table(rows: list[dict]) -> str:
    """A markdown table for docs/benchmarks.md."""
    head = ("| round | impl | mode | crops | compute dtype | KV cache | load s | peak RSS GiB | image ms | vision s | "
            "prefill tok/s | TTFT s | decode tok/s | copy GB/s | % of bandwidth limit | top-1 vs bf16 | logits rel. err |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.get('round', 0)} | {r['impl']} | {r['mode']} | {r['num_crops']} | {r['dtype']} | "
            f"{r.get('kv_dtype', r['dtype'])} | {r['load_s']:.1f} | "
            f"{r['peak_rss'] / 2**30:.2f} | {r['image_ms']:.0f} | {r['vision_s']:.1f} | "
            f"{r['prompt_tokens'] / r['prefill_s']:.1f} | {r['ttft_s']:.1f} | {r['decode_tok_s']:.2f} | "
            f"{r.get('copy_gb_s', 0):.1f} | {100 * r['bw_fraction']:.0f}% | "
            f"{agreement(r) if 'top1_vs_bf16' in r else '- | -'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
