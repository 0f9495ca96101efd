"""Train the pocket model from scratch on generated data and write the files that ship in the package.

    python -m phi3v.pocket.train [--steps 1500] [--out src/phi3v/pocket/weights] [--seed 0]

Fixed seed, reproducible on the same machine and thread count; progress with loss and ETA on stderr.
Data is generated on the fly (phi3v.pocket.data), one fresh batch per step: nothing is downloaded and
no example is seen twice. The model is phi3v's own Phi3VForCausalLM: the same forward code as
inference, with gradients.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from phi3v.checkpoint import write_byte_tokenizer, write_configs
from phi3v.config import Phi3VConfig, TextConfig, VisionConfig
from phi3v.image_processor import preprocess
from phi3v.language import AttentionInputs
from phi3v.model import Phi3VForCausalLM
from phi3v.pocket import FOLDER
from phi3v.pocket.data import TASKS, Example, dataset, sample
from phi3v.prompt import Tokenizer, build_input_ids, chat_prompt
from phi3v.rope import cos_sin

NUM_CROPS = 4  # a square image becomes a 2x2 grid of tiles plus the global view
IGNORE = -100


def pocket_config(vocab_size: int, pad_token_id: int) -> Phi3VConfig:
    """Phi-3-V's structure, shrunk: 8x8 patches of 42 px per 336 px crop (16 merged tokens per crop, 93 per
    image), a 4-layer CLIP-style tower and a 4-layer su-RoPE decoder."""
    half = 32  # head_dim / 2
    text = TextConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=16384, original_max_position_embeddings=2048,
        short_factor=(1.0,) * half, long_factor=tuple(1.0 + 7.0 * i / (half - 1) for i in range(half)),
        pad_token_id=pad_token_id,
    )  # fmt: skip
    vision = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, patch_size=42)
    return Phi3VConfig(text=text, vision=vision, num_img_tokens=vision.tokens_per_side**2)


def build_tokenizer(folder: Path, seed: int) -> Tokenizer:
    """Learn BPE merges from the tasks' questions and answers (plus every word the OCR task can draw)."""
    from phi3v.pocket.data import COLOURS, SHAPES, WORDS

    examples = dataset(4000, seed + 1)
    corpus = [f"{e.question} {e.answer}" for e in examples] + list(WORDS) + list(COLOURS) + list(SHAPES)
    write_byte_tokenizer(folder, corpus, vocab_size=600)
    return Tokenizer.from_dir(folder)


def init_weights(model: nn.Module, seed: int) -> None:
    """GPT-2 style: N(0, 0.02) for matrices, embeddings and separators; zero biases; unit norms."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:
            nn.init.ones_(p)
        else:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def encode(tok: Tokenizer, ex: Example, side: int) -> tuple[list[int], list[int], Tensor, Tensor]:
    """Prompt ids (with image placeholders) + answer + <|end|>, the labels (answer only) and the pixels."""
    content = [{"type": "image", "image": im} for im in ex.images] + [{"type": "text", "text": ex.question}]
    prompt, _ = chat_prompt([{"role": "user", "content": content}])
    inputs = preprocess(ex.images, NUM_CROPS, side=side)
    prompt_ids = build_input_ids(tok, prompt, inputs.num_img_tokens)
    answer = tok.encode(ex.answer, add_bos=False) + [tok.end_token_id]
    return prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer, inputs.pixel_values, inputs.image_sizes


def collate(tok: Tokenizer, batch: list[Example], side: int) -> dict[str, Tensor]:
    """Right-padded ids and labels; every image's crops stacked in example order."""
    rows = [encode(tok, ex, side) for ex in batch]
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (x, y, _, _) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
    pixels = torch.cat([r[2] for r in rows])
    sizes = torch.cat([r[3] for r in rows])
    return {"ids": ids, "labels": labels, "pixel_values": pixels, "image_sizes": sizes}


def loss_fn(model: Phi3VForCausalLM, b: dict[str, Tensor]) -> Tensor:
    """Next-token cross-entropy on the answer tokens. Right padding needs no mask: causal attention never
    lets a real token see the padding after it."""
    feats = model.encode_images(b["pixel_values"], b["image_sizes"])
    x = model.embed(b["ids"], feats)
    B, T = b["ids"].shape
    pos = torch.arange(T).expand(B, T)
    cos, sin = cos_sin(model.config.text, pos, x.dtype, pos.amax(dim=1) + 1)
    h = model.decode_layers(x, AttentionInputs(cos, sin, None, pos))
    target = b["labels"][:, 1:]
    keep = target != IGNORE
    return F.cross_entropy(model.logits(h[:, :-1][keep]), target[keep])


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def save(model: Phi3VForCausalLM, folder: Path, info: dict) -> None:
    """config.json, generation/preprocessor configs, bf16 model.safetensors and pocket.json (with its sha256)."""
    write_configs(folder, model.config, NUM_CROPS)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    info["sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "pocket.json").write_text(json.dumps(info, indent=2) + "\n")


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, eval_n: int) -> dict:
    from tqdm import tqdm

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, seed)
    vocab = -(-tok.vocab_size // 64) * 64  # padded like Phi-3's 32064
    cfg = pocket_config(vocab, tok.pad_token_id)
    model = Phi3VForCausalLM(cfg)
    init_weights(model, seed)
    side = cfg.vision.tokens_per_side
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))  # fmt: skip
    rng = random.Random(seed)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"training {params / 1e6:.1f}M params", unit="step")
    smooth = None
    for step in bar:
        batch = [sample(TASKS[(step * batch_size + i) % len(TASKS)], rng) for i in range(batch_size)]
        b = collate(tok, batch, side)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        loss = loss_fn(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        bar.set_postfix(loss=f"{smooth:.3f}")
    seconds = time.perf_counter() - t0
    model.eval()
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "parameters": params,
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "final_loss": round(smooth, 4)}  # fmt: skip
    save(model, out, info)
    if eval_n:
        from phi3v.pocket.evaluate import evaluate, held_out

        import phi3v

        acc = evaluate(phi3v.load(out, device="cpu", dtype="float32"), held_out(eval_n))
        info["accuracy"] = acc
        save(model, out, info)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=FOLDER)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=400, help="held-out examples to score at the end (0: none)")
    a = ap.parse_args()
    info = train(a.out, a.steps, a.batch_size, a.lr, a.seed, a.eval)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
