"""Can the pocket tower learn to see glyphs? A quick signal for the OCR task, on the vision tower alone.

    python -m phi3v.pocket.glyphs [--patch 42] [--jitter 20] [--steps 400] [--sizes 40 70] [--ramp 0]

Each image holds 8 single characters (a-z, 0-9) in 8 of the 16 cells of an 84 px grid, each centred on a
patch corner plus a random shift of up to --jitter px, in random colours on the tasks' backgrounds. The
tower, with a linear head on its layer-normed patch features, learns to name the character whose centre
lies in each patch (cross-entropy over those patches); held-out accuracy is printed every 100 steps.

What it showed (docs/pocket.md): with 42 px patches, 400 steps of 16 images reach 90% at --jitter 0 and
9% at --jitter 20 (40% with --steps 1200); at --jitter 20, 28 px patches reach 21%, 21 px 28% and 14 px
36%. Where a glyph falls inside its patch is what the OCR task's free text makes hard.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from phi3v.image_processor import preprocess
from phi3v.model import Phi3VForCausalLM
from phi3v.pocket.data import BACKGROUNDS, CHARS, INK, SIZE
from phi3v.pocket.evaluate import HELD_OUT_SEED
from phi3v.pocket.train import init_weights, lr_at, param_groups, pocket_config

CELL = 84  # a 4x4 grid of cells; their centres are patch corners for 42 and 21 px patches


def glyph_image(rng: random.Random, patch: int, jitter: int, sizes: tuple[int, int]) -> tuple[Image.Image, Tensor]:
    """One image of 8 characters and, per patch (row-major), the index into CHARS of the character centred
    in it, or -1."""
    img = Image.new("RGB", (SIZE, SIZE), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(img)
    grid = SIZE // patch
    target = torch.full((grid * grid,), -1)
    for cell in rng.sample(range(16), 8):
        c = rng.choice(CHARS)
        font = ImageFont.load_default(size=rng.randint(*sizes))
        x = (cell % 4) * CELL + CELL // 2 + rng.randint(-jitter, jitter)
        y = (cell // 4) * CELL + CELL // 2 + rng.randint(-jitter, jitter)
        draw.text((x, y), c, fill=rng.choice(INK), font=font, anchor="mm")
        target[(y // patch) * grid + x // patch] = CHARS.index(c)
    return img, target


def batch(rng: random.Random, n: int, patch: int, jitter: int, sizes: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """n images as (n, 3, 336, 336) pixels, normalised as the image processor does, and their targets."""
    images, targets = zip(*(glyph_image(rng, patch, jitter, sizes) for _ in range(n)))
    return preprocess(list(images), 1, side=SIZE // patch // 2).pixel_values[:, 0], torch.stack(targets)


def ocr_batch(rng: random.Random, n: int, patch: int) -> tuple[Tensor, Tensor]:
    """n images of the OCR task, each as its two crops at num_crops=1 (the tile and the global view), and per
    patch the index into CHARS of the character whose box holds the patch's centre, or -1
    (`train.patch_targets` on the task's label maps)."""
    from phi3v.pocket.data import PIXEL_CLASS, ocr
    from phi3v.pocket.train import scene_batch

    b = scene_batch([ocr(rng)[0] for _ in range(n)], SIZE // patch // 2, num_crops=1)
    lookup = torch.full((256,), -1)
    lookup[torch.tensor([PIXEL_CLASS[c] for c in CHARS])] = torch.arange(len(CHARS))
    return b["pixel_values"][:, :2].flatten(0, 1), lookup[b["patch_targets"]]


def run(patch: int = 42, jitter: int = 20, steps: int = 400, sizes: tuple[int, int] = (40, 70), images: int = 16,
        lr: float = 1e-3, every: int = 100, seed: int = 0, ramp: int = 0, text: bool = False) -> list[float]:  # fmt: skip
    """Train the tower and head for `steps`, the shift growing from 0 to `jitter` over the first `ramp` steps
    (with `text`, on the OCR task's images instead: `ocr_batch`); returns the held-out accuracy (at the full
    `jitter`) every `every` steps."""
    torch.manual_seed(seed)
    cfg = pocket_config(640, 0, patch)
    model = Phi3VForCausalLM(cfg)
    init_weights(model, seed)
    tower = model.model.vision_embed_tokens.img_processor
    head = nn.Linear(cfg.vision.hidden_size, len(CHARS))
    head_group = {"params": list(head.parameters()), "lr": lr, "base_lr": lr, "weight_decay": 0.0}
    opt = torch.optim.AdamW(param_groups(model, lr) + [head_group], betas=(0.9, 0.95))

    def logits(pixels: Tensor) -> Tensor:
        f = tower(pixels)
        return head(F.layer_norm(f, f.shape[-1:]))

    def draw(rng: random.Random, n: int, shift: int) -> tuple[Tensor, Tensor]:
        return ocr_batch(rng, n, patch) if text else batch(rng, n, patch, shift, sizes)

    held = [draw(random.Random(HELD_OUT_SEED + i), 50, jitter) for i in range(2)]
    labelled = sum(int((t >= 0).sum()) for _, t in held)
    rng, t0, accuracies = random.Random(seed), time.perf_counter(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, g["base_lr"], warmup=min(50, steps // 5))
        shift = jitter if step >= ramp else jitter * step // ramp
        pixels, target = draw(rng, images, shift)
        keep = target >= 0
        loss = F.cross_entropy(logits(pixels)[keep], target[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            with torch.no_grad():
                right = sum(int((logits(p).argmax(-1) == t)[t >= 0].sum()) for p, t in held)
            accuracies.append(right / labelled)
            print(f"step {step + 1} {time.perf_counter() - t0:.0f}s loss {loss.item():.3f} "
                  f"held-out accuracy {accuracies[-1]:.2f}", flush=True)  # fmt: skip
    return accuracies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=int, default=42, help="the tower's patch size (336 / patch even)")
    ap.add_argument("--jitter", type=int, default=20, help="a character's largest shift from a patch corner, px")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--sizes", type=int, nargs=2, default=(40, 70), help="font sizes, smallest and largest")
    ap.add_argument("--images", type=int, default=16, help="images per step")
    ap.add_argument("--ramp", type=int, default=0, help="grow the shift from 0 to --jitter over this many steps")
    ap.add_argument("--text", action="store_true", help="the OCR task's images and their characters instead")
    a = ap.parse_args()
    run(a.patch, a.jitter, a.steps, tuple(a.sizes), a.images, ramp=a.ramp, text=a.text)


if __name__ == "__main__":
    main()
