"""Top-1 agreement and logit error of int8 and int4 weights against bfloat16, on a trained model.

    python bench/quant_agreement.py [--model pocket] [--examples 200] [--group-size 128]

bench/speed.py measures the same on the real dimensions, but with random weights, whose next-token
distribution is nearly flat: any perturbation flips the argmax there, so its agreement figures say little
about a trained model. The pocket model is trained (docs/pocket.md). Each held-out question is answered
greedily by the bfloat16 model; that answer is then teacher-forced through every mode in one full pass,
and at every answer position (each answer token and its <|end|>) this reports how often the mode's top-1
token is bf16's and the relative error of its logits (L2 norm of the difference over bf16's), besides
each mode's exact-match accuracy on the same questions.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

import phi3v
from phi3v.language import AttentionInputs
from phi3v.pocket.evaluate import HELD_OUT_SEED, held_out
from phi3v.rope import cos_sin


@torch.inference_mode()
def answer_logits(m: phi3v.Phi3V, ex, answer_ids: list[int]) -> torch.Tensor:
    """Float32 logits at the positions that predict `answer_ids`, the question about ex.images teacher-forced
    with them: (len(answer_ids), vocab)."""
    req = m.request(ex.question, images=ex.images)
    ids = torch.cat([req.input_ids, torch.tensor(answer_ids)])[None]
    model = m.model
    x = model.embed(ids, req.image_features)
    pos = torch.arange(ids.shape[1])[None]
    cos, sin = cos_sin(model.config.text, pos, x.dtype, pos.amax(dim=1) + 1)
    h = model.decode_layers(x, AttentionInputs(cos, sin, None, pos))
    start = req.input_ids.numel() - 1  # the prompt's last position predicts the first answer token
    return model.logits(h[0, start : start + len(answer_ids)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pocket")
    ap.add_argument("--examples", type=int, default=200, help="held-out questions (all four tasks in turn)")
    ap.add_argument("--group-size", type=int, default=128, help="int4 inputs per (scale, zero) pair")
    a = ap.parse_args()
    examples = held_out(a.examples, seed=HELD_OUT_SEED + 2)
    models = {"bf16": phi3v.load(a.model, device="cpu", dtype="bfloat16", feature_cache_bytes=0)}
    for mode in ("int8", "int4"):
        models[mode] = phi3v.load(a.model, device="cpu", dtype="bfloat16", quantize=mode, group_size=a.group_size,
                                  feature_cache_bytes=0)  # fmt: skip
    tok = models["bf16"].tokenizer
    answers = [models["bf16"].chat(ex.question, images=ex.images, max_new_tokens=32) for ex in examples]
    forced = [tok.encode(text, add_bos=False) + [tok.end_token_id] for text in answers]
    ref = [answer_logits(models["bf16"], ex, ids) for ex, ids in zip(examples, forced)]
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "model": a.model, "examples": len(examples), "answer_positions": sum(map(len, forced)),
              "int4_group_size": a.group_size, "modes": {}}  # fmt: skip
    for mode, m in models.items():
        logits = [answer_logits(m, ex, ids) for ex, ids in zip(examples, forced)]
        top1 = torch.cat([(x.argmax(-1) == r.argmax(-1)) for x, r in zip(logits, ref)]).float().mean()
        err = torch.stack([(x - r).norm() / r.norm() for x, r in zip(logits, ref)]).median()
        right = sum(m.chat(ex.question, images=ex.images, max_new_tokens=32).strip() == ex.answer for ex in examples)
        report["modes"][mode] = {"top1_vs_bf16": round(float(top1), 4), "median_rel_err": round(float(err), 4),
                                 "exact_match": round(right / len(examples), 4)}  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
