"""How close an image prompt's time to first token is to what its matrix products alone cost on this CPU.

    python bench/prefill_floor.py [--tokens 798] [--crops 5] [--dtype bfloat16] [--repeat 5]

Time to first token is the vision tower over every crop plus the decoder's prefill over the whole prompt,
and nearly all of both is dense matrix products, which phi3v and transformers both hand to the same
kernel (oneDNN's, for bfloat16 on the CPU). This times, on random weights of the real shapes:

- the floor: each layer's matrix products alone (`F.linear` on the layer's weights, the fastest route
  PyTorch has, which both implementations take), for one CLIP layer over `--crops` crops of 577 tokens and one decoder layer over
  `--tokens` tokens, then scaled to the layers that run (23 of CLIP's 24, all 32 decoder layers);
- attention alone (PyTorch's fused CPU `scaled_dot_product_attention`, which both implementations call) on
  the layers' head shapes;
- phi3v's own layers (`CLIPEncoderLayer`, `DecoderLayer`) on the same inputs: the products and attention
  plus norms, RoPE and activations; once with phi3v's fused kernels for those steps (cpu_fused.cpp, on
  AVX512 CPUs) and the vision tower's biases added inside oneDNN's product, and once as before those
  (`*_eager_s`): PyTorch's eager ops for those steps and F.linear for the biases.

Their ratio says how much of a first token any implementation can still win without changing the math:
if phi3v's layers run within a few percent of their products, so does any other implementation that
computes them, and a first token much earlier than transformers' is out of reach on this CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from phi3v import cpu_kernels, linear
from phi3v.config import TextConfig, VisionConfig
from phi3v.language import AttentionInputs, DecoderLayer
from phi3v.rope import cos_sin
from phi3v.vision import CLIPEncoderLayer


def best_of(fn, repeat: int) -> float:
    """The fastest of `repeat` timed calls, after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def products(x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    """Each (out, in) weight applied to x, as the layers' `F.linear` calls do."""
    for w in weights:
        F.linear(x, w)


@torch.inference_mode()
def measure(tokens: int, crops: int, dtype: torch.dtype, repeat: int) -> dict:
    torch.manual_seed(0)
    v, t = VisionConfig(), TextConfig()
    clip = CLIPEncoderLayer(v).to(dtype)
    dec = DecoderLayer(t, 0).to(dtype)
    for p in [*clip.parameters(), *dec.parameters()]:
        p.normal_(0, 0.02)
    xv = torch.randn(crops, v.num_patches + 1, v.hidden_size).to(dtype)
    xd = torch.randn(1, tokens, t.hidden_size).to(dtype)
    # the MLP's down projection reads the intermediate activations: time it on an input that wide
    xv_wide = torch.randn(crops, v.num_patches + 1, v.intermediate_size).to(dtype)
    xd_wide = torch.randn(1, tokens, t.intermediate_size).to(dtype)
    a = clip.self_attn
    pos = torch.arange(tokens)[None]
    cos, sin = cos_sin(t, pos, dtype, torch.tensor([tokens]))
    attn = AttentionInputs(cos, sin, None, pos)

    clip_mm = best_of(lambda: (products(xv, [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.out_proj.weight,
                                             clip.mlp.fc1.weight]),
                               products(xv_wide, [clip.mlp.fc2.weight])), repeat)  # fmt: skip
    dec_mm = best_of(lambda: (products(xd, [dec.self_attn.qkv_proj.weight, dec.self_attn.o_proj.weight,
                                            dec.mlp.gate_up_proj.weight]),
                              products(xd_wide, [dec.mlp.down_proj.weight])), repeat)  # fmt: skip
    # attention alone, on the layers' head shapes: PyTorch's fused CPU kernel, as both implementations call it
    qv = torch.randn(crops, v.num_attention_heads, v.num_patches + 1, v.head_dim).to(dtype)
    qd = torch.randn(1, t.num_attention_heads, tokens, t.head_dim).to(dtype)
    clip_attn = best_of(lambda: F.scaled_dot_product_attention(qv, qv, qv), repeat)
    dec_attn = best_of(lambda: F.scaled_dot_product_attention(qd, qd, qd, is_causal=True), repeat)
    clip_layer = best_of(lambda: clip(xv), repeat)
    dec_layer = best_of(lambda: dec(xd, attn), repeat)
    fused, bias_product = cpu_kernels.fused, linear._onednn_bias_product
    cpu_kernels.fused = lambda *tensors: None  # every layer step on PyTorch's ops,
    linear._onednn_bias_product = lambda *args: False  # and the biases added by F.linear
    try:
        clip_eager = best_of(lambda: clip(xv), repeat)
        dec_eager = best_of(lambda: dec(xd, attn), repeat)
    finally:
        cpu_kernels.fused, linear._onednn_bias_product = fused, bias_product

    n_clip, n_dec = v.layers_to_run, t.num_hidden_layers
    flops = 2 * (crops * (v.num_patches + 1) * 12 * v.hidden_size**2 * n_clip
                 + tokens * (t.hidden_size * (3 * t.hidden_size + t.hidden_size + 3 * t.intermediate_size)) * n_dec)  # fmt: skip
    floor = clip_mm * n_clip + dec_mm * n_dec
    layers = clip_layer * n_clip + dec_layer * n_dec
    eager = clip_eager * n_clip + dec_eager * n_dec
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},  # fmt: skip
        "settings": {"tokens": tokens, "crops": crops, "dtype": str(dtype).removeprefix("torch."), "repeat": repeat},
        "clip": {"layers": n_clip, "products_s": round(clip_mm * n_clip, 2), "attention_s": round(clip_attn * n_clip, 2),
                 "phi3v_layers_s": round(clip_layer * n_clip, 2), "phi3v_layers_eager_s": round(clip_eager * n_clip, 2)},
        "decoder": {"layers": n_dec, "products_s": round(dec_mm * n_dec, 2), "attention_s": round(dec_attn * n_dec, 2),
                    "phi3v_layers_s": round(dec_layer * n_dec, 2), "phi3v_layers_eager_s": round(dec_eager * n_dec, 2)},
        "products_tflop": round(flops / 1e12, 2),
        "products_gflops": round(flops / floor / 1e9, 1),
        "floor_s": round(floor, 2),
        "floor_with_attention_s": round(floor + clip_attn * n_clip + dec_attn * n_dec, 2),
        "phi3v_layers_s": round(layers, 2),
        "phi3v_layers_eager_s": round(eager, 2),
        "phi3v_over_floor": round(layers / floor, 3),
        "eager_over_floor": round(eager / floor, 3),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=798, help="prompt tokens (798: one 640x480 image at num_crops=4)")
    ap.add_argument("--crops", type=int, default=5, help="CLIP crops (5: a 2x2 grid and the global view)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    print(json.dumps(measure(a.tokens, a.crops, getattr(torch, a.dtype), a.repeat), indent=2))


if __name__ == "__main__":
    main()
