"""Train the pocket model from scratch on generated data and write the files that ship in the package.

    python -m phi3v.pocket.train [--vision-steps 1000] [--steps 2300] [--low-res-steps 1590] [--patch-weight 1]
                                 [--batch-size 18] [--mix 1 3 2 3] [--vision-scenes 9] [--patch 42] [--drills] [--bf16]
                                 [--norm-probe] [--vision-lr 1]
                                 [--out src/phi3v/pocket/weights] [--seed 0]

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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
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
from phi3v.pocket.data import FACTS, PIXEL_CLASS, PIXEL_CLASSES, TASKS, Example, dataset, questions
from phi3v.pocket.evaluate import HELD_OUT_SEED
from phi3v.prompt import Tokenizer, build_input_ids, chat_prompt
from phi3v.rope import cos_sin

T = TypeVar("T")

NUM_CROPS = 4  # a square image becomes a 2x2 grid of tiles plus the global view
IGNORE = -100
MAX_TURNS = 6  # questions per training conversation
AUX_WEIGHT = 0.1  # of the per-image fact loss (a sum over FACTS) against the per-token answer loss
PATCH = 42  # the shipped tower's patch size (px of a 336 px crop)
EVEN_MIX = (1,) * len(TASKS)  # conversations of each task per len(TASKS) of a batch
VISION_SCENES = 8  # scenes per step of the vision phase (`vision_phase`)
VISION_HELD_OUT_SEED = HELD_OUT_SEED + 3  # the vision phase's held-out scenes: a seed training never uses


def pocket_config(vocab_size: int, pad_token_id: int, patch: int = PATCH) -> Phi3VConfig:
    """Phi-3-V's structure, shrunk: 8x8 patches of 42 px per 336 px crop (16 merged tokens per crop, 93 per
    image; `patch` px patches give (168 / patch)^2 per crop), a 4-layer CLIP-style tower and a 4-layer
    su-RoPE decoder."""
    half = 32  # head_dim / 2
    text = TextConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=16384, original_max_position_embeddings=2048,
        short_factor=(1.0,) * half, long_factor=tuple(1.0 + 7.0 * i / (half - 1) for i in range(half)),
        pad_token_id=pad_token_id,
    )  # fmt: skip
    vision = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          patch_size=patch)  # fmt: skip
    if not vision.has_even_grid:
        raise ValueError(f"--patch {patch}: the patch size must divide 336 px into an even number of patches")
    return Phi3VConfig(text=text, vision=vision, num_img_tokens=vision.tokens_per_side**2)


def build_tokenizer(folder: Path, seed: int, drills: bool = False) -> Tokenizer:
    """Learn BPE merges from the tasks' questions and answers, plus every word the OCR task can draw (and
    the drills' questions, when training with them)."""
    from phi3v.pocket.data import COLOURS, SHAPES, WORDS

    examples = dataset(4000, seed + 1)
    if drills:
        rng = random.Random(seed + 2)
        examples += [q for i in range(200) for q in questions(TASKS[i % len(TASKS)], rng) if q.drill]
    corpus = [f"{e.question} {e.answer}" for e in examples] + list(WORDS) + list(COLOURS) + list(SHAPES)
    write_byte_tokenizer(folder, corpus, vocab_size=600)
    return Tokenizer.from_dir(folder)


def new_model(tok: Tokenizer, seed: int, patch: int = PATCH, norm_probe: bool = False) -> tuple[Phi3VForCausalLM, Probes]:
    """A pocket model for `tok`, initialised from `seed` (`init_weights`; its vocabulary padded to a multiple
    of 64, like Phi-3's 32064), and its training-only `Probes`."""
    cfg = pocket_config(-(-tok.vocab_size // 64) * 64, tok.pad_token_id, patch)
    model = Phi3VForCausalLM(cfg)
    init_weights(model, seed)
    return model, Probes(cfg, norm_probe)


def task_cycle(mix: tuple[int, ...]) -> list[str]:
    """TASKS, each `mix` times in a row: conversation i of a batch (scene i of a vision step) is of task
    cycle[i % len(cycle)]."""
    return [t for t, k in zip(TASKS, mix) for _ in range(k)]


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


def param_groups(model: Phi3VForCausalLM, lr: float, weight_decay: float = 0.01, vision_lr: float = 1.0,
                 patch_lr_scale: float | None = None) -> list[dict]:  # fmt: skip
    """AdamW groups: decay on matrices only; the vision path (`model.vision_embed_tokens`) at `vision_lr`
    times the rate; the patch embedding's rate scaled down further by `patch_lr_scale`, by default
    hidden/fan-in.

    Adam moves every weight by about `lr` per step, so a layer's output moves by about lr * fan-in when the
    gradient is coherent across its inputs, as it is for a 42x42x3 patch of uniform colour: at full rate
    the 5292-input patch embedding rewrites the tower's input every step and the tower learns nothing
    (measured: a linear colour probe on the tower is right 38% of the time after 100 steps; at the
    scaled rate, 100%)."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        rate = lr * vision_lr if name.startswith("model.vision_embed_tokens.") else lr
        if "patch_embedding" in name:
            rate *= patch_lr_scale if patch_lr_scale is not None else p.shape[0] / p[0].numel()
        groups.setdefault((rate, weight_decay if p.dim() >= 2 else 0.0), []).append(p)
    return [{"params": ps, "lr": rate, "base_lr": rate, "weight_decay": wd} for (rate, wd), ps in groups.items()]


def optimizer(model: Phi3VForCausalLM, probes: nn.Module, lr: float, vision_lr: float = 1.0,
              patch_lr_scale: float | None = None) -> torch.optim.AdamW:  # fmt: skip
    """AdamW over `param_groups` and the training-only probes (`Probes`, or a fact probe alone), which learn
    at the vision path's rate, without decay."""
    rate = lr * vision_lr
    probe_group = {"params": list(probes.parameters()), "lr": rate, "base_lr": rate, "weight_decay": 0.0}
    groups = param_groups(model, lr, vision_lr=vision_lr, patch_lr_scale=patch_lr_scale)
    return torch.optim.AdamW(groups + [probe_group], betas=(0.9, 0.95))


def encode(tok: Tokenizer, turns: list[Example], image_tokens: list[int]) -> tuple[list[int], list[int]]:
    """A conversation of questions about one scene (the images ride on the first turn, `image_tokens` each)
    -> ids with image placeholders, and labels (each answer and its <|end|>; IGNORE elsewhere)."""
    messages: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    for i, ex in enumerate(turns):
        images = [{"type": "image", "image": im} for im in ex.images] if i == 0 else []
        messages.append({"role": "user", "content": [*images, {"type": "text", "text": ex.question}]})
        prompt_ids = build_input_ids(tok, chat_prompt(messages)[0], image_tokens)
        if prompt_ids[: len(ids)] != ids:  # each turn must extend the last one token for token
            raise ValueError(f"turn {i} of a {ex.task} conversation tokenizes its history differently")
        answer = tok.encode(ex.answer, add_bos=False) + [tok.end_token_id]
        labels += [IGNORE] * (len(prompt_ids) - len(ids)) + answer
        ids = prompt_ids + answer
        messages.append({"role": "assistant", "content": ex.answer})
    return ids, labels


def fact_targets(facts: list[frozenset[str]]) -> Tensor:
    """Each image's facts as a multi-hot row over FACTS."""
    index = {f: i for i, f in enumerate(FACTS)}
    out = torch.zeros(len(facts), len(FACTS))
    for i, fs in enumerate(facts):
        out[i, [index[f] for f in fs]] = 1.0
    return out


def patch_targets(label_maps: list, image_sizes: Tensor, grid: int, crop: int = 336) -> Tensor:
    """What lies under the centre of each patch of every real crop (`ImageEmbedding.real_crops` order: per
    image the global view, then the tiles row-major), as PIXEL_CLASSES indices: (sum of crops, grid * grid).

    The generated images are square, so the HD transform only scales them (spec §5.1): a tile at row r,
    column c of the (h, w) HD image covers [r * crop, (r + 1) * crop) there, the global view the whole image.
    """
    centres = (torch.arange(grid) + 0.5) * (crop / grid)  # in crop pixels
    out = []
    for label_map, (h, w) in zip(label_maps, image_sizes.tolist(), strict=True):
        size = label_map.size[0]
        if label_map.size != (size, size) or h != w:
            raise ValueError("patch targets are defined for square images only")
        labels = torch.from_numpy(np.asarray(label_map, dtype=np.int64))
        out.append(_labels_at(labels, centres * size / crop, centres * size / crop))  # the global view
        scale = size / h  # label-map pixels per HD-image pixel
        out += [_labels_at(labels, (r * crop + centres) * scale, (c * crop + centres) * scale)
                for r in range(h // crop) for c in range(w // crop)]  # fmt: skip
    return torch.stack(out)


def _labels_at(labels: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """The classes at every (y, x) of a grid of label-map coordinates, row-major."""
    iy = ys.long().clamp_(0, labels.shape[0] - 1)
    ix = xs.long().clamp_(0, labels.shape[1] - 1)
    return labels[iy[:, None], ix[None, :]].reshape(-1)


def scene_batch(scenes: list[Example], side: int, num_crops: int = NUM_CROPS) -> dict:
    """The vision path's inputs and targets for the images of `scenes` (each one's images, in order): every
    image's crops stacked, with its image-token count, its facts (multi-hot over FACTS) and what lies under
    each of its crops' patches (`patch_targets`)."""
    inputs = preprocess([im for ex in scenes for im in ex.images], num_crops, side=side)
    patches = patch_targets([m for ex in scenes for m in ex.label_maps], inputs.image_sizes, 2 * side)
    return {"pixel_values": inputs.pixel_values, "image_sizes": inputs.image_sizes,
            "image_tokens": inputs.num_img_tokens, "facts": fact_targets([f for ex in scenes for f in ex.facts]),
            "patch_targets": patches}  # fmt: skip


def collate(tok: Tokenizer, convs: list[list[Example]], side: int, num_crops: int = NUM_CROPS) -> dict:
    """`scene_batch` of the conversations' images, with right-padded ids and labels."""
    b = scene_batch([turns[0] for turns in convs], side, num_crops)
    counts = iter(b["image_tokens"])
    rows = [encode(tok, turns, [next(counts) for _ in turns[0].images]) for turns in convs]
    width = max(len(ids) for ids, _ in rows)
    b["ids"] = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    b["labels"] = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        b["ids"][i, : len(x)], b["labels"][i, : len(y)] = torch.tensor(x), torch.tensor(y)
    return b


def fact_probe(hidden: int, normed: bool = False) -> nn.Module:
    """The fact probe: a linear map from an image's mean projected token to a logit per FACTS entry; with
    `normed`, the mean is layer-normed first (no affine).

    The mean of an image's tokens hardly differs between images at the start (its spread over images is a
    fifteenth of its size, measured on 64 images), so a plain linear probe must first grow its weights many
    times over, at Adam's fixed step, before its loss can teach the tower anything. Normed, it reads the
    differences at once: vision path alone, 200 steps, held-out fact loss ocr/shapes/chart/change 16.7 /
    10.2 / 19.5 / 9.8 against 17.3 / 10.9 / 22.2 / 10.5. The full training with it scored worse on shapes, so
    it is off by default (docs/pocket.md)."""
    linear = nn.Linear(hidden, len(FACTS))
    return nn.Sequential(nn.LayerNorm(hidden, elementwise_affine=False), linear) if normed else linear


def fact_loss(probe: nn.Module, feats: Tensor, counts: list[int], targets: Tensor) -> Tensor:
    """Each image's fact loss, summed over FACTS: the probe reads the mean of the image's projected tokens
    (`feats`, `counts` rows per image)."""
    pooled = torch.stack([f.mean(0) for f in feats.split(counts)])
    return F.binary_cross_entropy_with_logits(probe(pooled), targets, reduction="none").sum(1)


class Probes(nn.Module):
    """The training-only heads on the vision path (not part of the shipped model): `facts` reads each image's
    mean projected token (`fact_probe`), `patches` each CLIP patch feature, layer-normed (`patch_loss`)."""

    def __init__(self, cfg: Phi3VConfig, norm_probe: bool = False):
        super().__init__()
        self.facts = fact_probe(cfg.text.hidden_size, norm_probe)
        self.patches = nn.Linear(cfg.vision.hidden_size, len(PIXEL_CLASSES))


def patch_loss(head: nn.Module, patches: Tensor, targets: Tensor) -> Tensor:
    """Each crop's mean cross-entropy of naming what lies under each patch's centre (`patch_targets`).

    Dense targets teach the tower where things are and what they look like patch by patch, which the
    per-image facts cannot: with 42 px patches a glyph is learned at a fixed place in its patch in a few
    hundred steps but hardly at a free one (`phi3v.pocket.glyphs`)."""
    logits = patch_logits(head, patches)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape).mean(1)


def patch_logits(head: nn.Module, patches: Tensor) -> Tensor:
    """The patch head's logits over PIXEL_CLASSES for each CLIP patch feature, layer-normed first."""
    return head(F.layer_norm(patches, patches.shape[-1:]))


def encode_once(model: Phi3VForCausalLM, pixel_values: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor]:
    """`ImageEmbedding.encode`, with the tower run once for a crop that is there twice: a 336 px square at
    num_crops=1 has one tile, bit for bit its global view (the resize is the identity). The same features
    and gradients (the one result feeds both places), for half the tower's work in the low-resolution steps."""
    emb = model.model.vision_embed_tokens
    crops = emb.real_crops(pixel_values, image_sizes)
    if all(grid == (1, 1) for grid in emb.crop_grids(image_sizes)) and torch.equal(crops[0::2], crops[1::2]):
        patches = emb.img_processor(crops[0::2]).repeat_interleave(2, dim=0)
    else:  # encode's own path, from the crops already gathered
        patches = emb.img_processor(crops)
    return emb.project(patches, image_sizes), patches


def vision_losses(model: Phi3VForCausalLM, probes: Probes, b: dict) -> tuple[Tensor, Tensor, Tensor]:
    """The image tokens of `b` (a `scene_batch`), each image's summed fact loss and each crop's patch loss."""
    feats, patches = encode_once(model, b["pixel_values"], b["image_sizes"])
    aux = fact_loss(probes.facts, feats, b["image_tokens"], b["facts"])
    return feats, aux, patch_loss(probes.patches, patches, b["patch_targets"])


def losses(model: Phi3VForCausalLM, probes: Probes, b: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token cross-entropy of every answer token, each image's summed fact loss and each crop's patch
    loss, all unreduced.

    The fact and patch losses are the vision tower's own pretraining (Phi-3-V's tower came pretrained, by
    CLIP). Without them the tower learns through the decoder's attention alone, and in 160 steps a one-shape
    colour question stayed near chance (loss 2.1 -> 1.8); with the fact probe the same run learned it (loss
    2.1 -> 0.6). The probes are not part of the shipped model.
    """
    feats, aux, dense = vision_losses(model, probes, b)
    x = model.embed(b["ids"], feats)
    B, T = b["ids"].shape
    pos = torch.arange(T).expand(B, T)
    cos, sin = cos_sin(model.config.text, pos, x.dtype, pos.amax(dim=1) + 1)
    h = model.decode_layers(x, AttentionInputs(cos, sin, None, pos))
    target = b["labels"][:, 1:]
    keep = target != IGNORE
    return F.cross_entropy(model.logits(h[:, :-1][keep]), target[keep], reduction="none"), aux, dense


def conversation(task: str, rng: random.Random, max_turns: int = MAX_TURNS, drills: bool = False) -> list[Example]:
    """Up to `max_turns` of the questions one scene answers (with `drills`, the training-only ones too), in
    random order, except that the first is never a drill: the held-out questions are asked with nothing but
    the image to go on, and each kind of them is asked first as often as any other."""
    turns = [q for q in questions(task, rng) if drills or not q.drill]
    rng.shuffle(turns)
    first = next(i for i, q in enumerate(turns) if not q.drill)
    turns.insert(0, turns.pop(first))
    return turns[:max_turns]


def micro_batches(tok: Tokenizer, convs: list[list[Example]], side: int, num_crops: int = NUM_CROPS) -> list[dict]:
    """`convs` collated one micro-batch per task, so that short single-image conversations are not padded to
    the length of the two-image ones."""
    groups: dict[str, list[list[Example]]] = {}
    for turns in convs:
        groups.setdefault(turns[0].task, []).append(turns)
    return [collate(tok, g, side, num_crops) for g in groups.values()]


def train_step(model: Phi3VForCausalLM, probes: Probes, batches: list[dict], bf16: bool = False,
               patch_weight: float = 0.0) -> tuple[float, float, float]:  # fmt: skip
    """Accumulate the gradient of (mean answer-token loss + AUX_WEIGHT * mean fact loss per image +
    `patch_weight` * mean patch loss per crop) over `batches` (a step's `micro_batches`), with bfloat16
    autocast if `bf16`. Returns the three means (the patch loss is measured at weight 0 too, untrained)."""
    tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    images = sum(len(b["image_tokens"]) for b in batches)
    crops = sum(len(b["patch_targets"]) for b in batches)
    totals = [0.0, 0.0, 0.0]
    for b in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            lm, aux, dense = losses(model, probes, b)
        lm, aux, dense = lm.float().sum() / tokens, aux.float().sum() / images, dense.float().sum() / crops
        loss = lm + AUX_WEIGHT * aux
        (loss + patch_weight * dense if patch_weight else loss).backward()  # weight 0: the head gets no grad
        totals = [t + x.item() for t, x in zip(totals, (lm, aux, dense))]
    return tuple(totals)


def crops_at(step: int, low_res_steps: int) -> int:
    """The num_crops of step `step` when the first `low_res_steps` are at low resolution: 1 (one tile and the
    global view, about half a full step's cost in the main training), then NUM_CROPS."""
    return 1 if step < low_res_steps else NUM_CROPS


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def optimizer_step(model: Phi3VForCausalLM, opt: torch.optim.Optimizer, step: int, steps: int,
                   backward: Callable[[], tuple[float, ...]], warmup: int = 100,
                   rate: float = 1.0) -> tuple[float, ...]:  # fmt: skip
    """Step `step` of `steps`: every group at `rate` times its `lr_at` rate, fresh gradients from `backward`
    (whose losses are returned), the model's clipped to norm 1, then the update. Gradients are set to None,
    not zeroed, so that what `backward` does not reach gets no update (the decoder in the vision phase)."""
    for g in opt.param_groups:
        g["lr"] = rate * lr_at(step, steps, g["base_lr"], warmup)
    opt.zero_grad(set_to_none=True)
    got = backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return got


def vision_step(model: Phi3VForCausalLM, probes: Probes, b: dict, bf16: bool = False) -> tuple[float, float]:
    """A step of the vision phase: the gradient of (AUX_WEIGHT * mean fact loss per image + mean patch loss
    per crop) over `b` (a `scene_batch`). Nothing reaches the decoder, so its gradients stay None and
    AdamW skips it, weight decay included. Returns the two means."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        _, aux, dense = vision_losses(model, probes, b)
    aux, dense = aux.float().mean(), dense.float().mean()
    (AUX_WEIGHT * aux + dense).backward()
    return aux.item(), dense.item()


@torch.no_grad()
def patch_accuracy(model: Phi3VForCausalLM, probes: Probes, b: dict) -> float:
    """How often the patch head names what lies under a patch of `b` (a `scene_batch`), over the patches
    with something under their centre (the background, most of every image, is left out)."""
    _, patches = model.model.vision_embed_tokens.encode(b["pixel_values"], b["image_sizes"])
    target = b["patch_targets"]
    on = target != PIXEL_CLASS[""]
    return round(float((patch_logits(probes.patches, patches).argmax(-1) == target)[on].float().mean()), 4)


def draw_scenes(rng: random.Random, tasks: list[str] | tuple[str, ...], n: int) -> list[Example]:
    """n freshly drawn scenes, cycling through `tasks`: the first question of each, which carries its
    images, facts and label maps."""
    return [questions(tasks[i % len(tasks)], rng)[0] for i in range(n)]


def vision_phase(model: Phi3VForCausalLM, probes: Probes, opt: torch.optim.Optimizer, steps: int, scenes: int,
                 tasks: list[str], rng: random.Random, bf16: bool = False, low_res_steps: int = 0,
                 rate: float = 1.0) -> dict:  # fmt: skip
    """Train the vision path alone (`vision_step`) for `steps` steps of `scenes` scenes from `rng`, cycling
    through `tasks` (--mix), with its own warmup and cosine decay at `rate` times the optimizer's rates; the
    first `low_res_steps` show the images at num_crops=1, the rest at NUM_CROPS. Returns its seconds and, per
    task, the `patch_accuracy` at its end on 32 held-out scenes.

    Phi-3-V's tower came pretrained; this one starts from noise, and within the full training it learns
    the OCR task's characters slowly: `phi3v.pocket.glyphs --text` needs about 2000 steps of the tower
    alone to name half of them, which the full training's shared gradient never gives it (docs/pocket.md).
    Without the decoder a step at NUM_CROPS costs about a third of a low-resolution training step, and one
    at num_crops=1 a quarter of that (one crop an image to encode, `encode_once`, against five), so most of
    the phase runs there and its end at NUM_CROPS, where the 2x2 tiles show everything at twice the size.
    The optimizer's state carries on into the main training."""
    from tqdm import tqdm

    side = model.config.vision.tokens_per_side
    t0, smooth = time.perf_counter(), [0.0, 0.0]

    def batch(step: int) -> dict:
        return scene_batch(draw_scenes(rng, tasks, scenes), side, crops_at(step, low_res_steps))

    bar = tqdm(prefetched(batch, steps), total=steps, desc="vision phase", unit="step")
    for step, b in enumerate(bar):
        got = optimizer_step(model, opt, step, steps, lambda: vision_step(model, probes, b, bf16),
                             warmup=min(100, steps // 5), rate=rate)  # fmt: skip
        smooth = [x if step == 0 else 0.95 * s + 0.05 * x for s, x in zip(smooth, got)]
        bar.set_postfix(facts=f"{smooth[0]:.2f}", patches=f"{smooth[1]:.3f}")
    seconds = time.perf_counter() - t0
    held = random.Random(VISION_HELD_OUT_SEED)
    accuracy = {t: patch_accuracy(model, probes, scene_batch(draw_scenes(held, [t], 32), side)) for t in TASKS}
    print(f"vision phase: {seconds:.0f} s, held-out patch accuracy {accuracy}", flush=True)
    return {"vision_seconds": round(seconds, 3), "vision_patch_accuracy": accuracy}


def prefetched(make: Callable[[int], T], n: int) -> Iterator[T]:
    """make(0) ... make(n - 1), each made on a thread while the caller works on the one before (Pillow and
    PyTorch release the GIL; drawing and preprocessing cost a fifth of a full-resolution step otherwise).
    Made in order, so a run stays reproducible."""
    if n <= 0:
        return
    with ThreadPoolExecutor(1) as pool:
        upcoming = pool.submit(make, 0)
        for i in range(n):
            ready = upcoming.result()
            if i + 1 < n:
                upcoming = pool.submit(make, i + 1)
            yield ready


def save(model: Phi3VForCausalLM, folder: Path, info: dict) -> None:
    """config.json, generation/preprocessor configs, bf16 model.safetensors and pocket.json (with its sha256)."""
    write_configs(folder, model.config, NUM_CROPS)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    info["sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "pocket.json").write_text(json.dumps(info, indent=2) + "\n")


def check_recipe(batch_size: int, mix: tuple[int, ...], vision_steps: int, vision_scenes: int,
                 vision_low_res_steps: int = 0, phase_lr: float = 1.0) -> None:  # fmt: skip
    """Raise ValueError, naming the options, unless `mix` can fill a batch and the vision phase's scenes, and
    the phase's low-resolution steps and rate make sense."""
    if len(mix) != len(TASKS) or min(mix) < 0 or sum(mix) == 0 or batch_size % sum(mix):
        raise ValueError(f"--mix {' '.join(map(str, mix))}: one count per task ({', '.join(TASKS)}), none "
                         f"negative, adding up to a divisor of the batch size {batch_size}")  # fmt: skip
    if vision_steps < 0 or (vision_steps and (vision_scenes < 1 or vision_scenes % sum(mix))):
        raise ValueError(f"--vision-steps {vision_steps} --vision-scenes {vision_scenes}: the vision phase needs "
                         f"0 or more steps of a positive multiple of {sum(mix)} scenes (the sum of --mix)")  # fmt: skip
    if not 0 <= vision_low_res_steps <= vision_steps:
        raise ValueError(f"--vision-low-res-steps {vision_low_res_steps}: 0 up to --vision-steps ({vision_steps})")
    if not phase_lr > 0:
        raise ValueError(f"--phase-lr {phase_lr}: a multiple of the rates must be positive")


def train(
    out: Path, steps: int, batch_size: int, lr: float, seed: int, eval_n: int, save_every: int = 0,
    vision_lr: float = 1.0, low_res_steps: int = 0, bf16: bool = False, drills: bool = False,
    norm_probe: bool = False, patch: int = PATCH, patch_weight: float = 0.0, mix: tuple[int, ...] = EVEN_MIX,
    vision_steps: int = 0, vision_scenes: int = VISION_SCENES, vision_low_res_steps: int = 0,
    phase_lr: float = 1.0,
) -> dict:
    """Train from `seed` for `steps` steps of `batch_size` conversations; write the files into `out` (also
    every `save_every` steps); score `eval_n` held-out examples at the end. The vision path and the fact
    probe learn at `vision_lr` times `lr`. The first `low_res_steps` steps show the images at num_crops=1
    (one tile and the global view: a step costs about half), the rest at NUM_CROPS. `bf16`: bfloat16
    autocast; `drills`: the training-only questions too (`data.Example.drill`); `norm_probe`: the fact probe
    reads layer-normed features (`fact_probe`); `patch`: the tower's patch size; `patch_weight`: of the
    per-patch loss (`patch_loss`; 0: none); `mix`: conversations of each of TASKS per `sum(mix)` of a batch.
    `vision_steps`: first train the vision path alone (`vision_phase`) for that many steps of `vision_scenes`
    scenes, drawn from their own random stream so that the rest of the run sees the same data, the first
    `vision_low_res_steps` of them at num_crops=1, at `phase_lr` times the rates; its time counts in
    `train_seconds`. Returns pocket.json's content."""
    from tqdm import tqdm

    check_recipe(batch_size, mix, vision_steps, vision_scenes, vision_low_res_steps, phase_lr)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, seed, drills)
    model, probes = new_model(tok, seed, patch, norm_probe)
    side = model.config.vision.tokens_per_side
    params = sum(p.numel() for p in model.parameters())
    opt = optimizer(model, probes, lr, vision_lr)
    tasks = task_cycle(mix)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    smooth = [0.0, 0.0, 0.0]
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "parameters": params,
            "threads": torch.get_num_threads()}  # fmt: skip
    if vision_lr != 1.0:
        info["vision_lr"] = vision_lr
    if low_res_steps:
        info["low_res_steps"] = low_res_steps
    if bf16:
        info["autocast"] = "bfloat16"
    if drills:
        info["drills"] = True
    if norm_probe:
        info["norm_probe"] = True
    if patch != PATCH:
        info["patch"] = patch
    if patch_weight:
        info["patch_weight"] = patch_weight
    if mix != EVEN_MIX:
        info["mix"] = dict(zip(TASKS, mix))
    if vision_steps:
        info |= {"vision_steps": vision_steps, "vision_scenes": vision_scenes}
        if vision_low_res_steps:
            info["vision_low_res_steps"] = vision_low_res_steps
        if phase_lr != 1.0:
            info["phase_lr"] = phase_lr
        info |= vision_phase(model, probes, opt, vision_steps, vision_scenes, tasks, random.Random(seed + 3), bf16,
                             vision_low_res_steps, phase_lr)  # fmt: skip

    def batches(step: int) -> list[dict]:  # drawn in step order, so prefetching keeps the run reproducible
        convs = [conversation(tasks[i % len(tasks)], rng, drills=drills) for i in range(batch_size)]
        return micro_batches(tok, convs, side, crops_at(step, low_res_steps))

    bar = tqdm(prefetched(batches, steps), total=steps, desc=f"training {params / 1e6:.1f}M params", unit="step")
    for step, ready in enumerate(bar):
        got = optimizer_step(model, opt, step, steps, lambda: train_step(model, probes, ready, bf16, patch_weight))
        smooth = [x if step == 0 else 0.95 * s + 0.05 * x for s, x in zip(smooth, got)]
        shown = {"loss": f"{smooth[0]:.3f}", "facts": f"{smooth[1]:.2f}"}
        bar.set_postfix(shown | ({"patches": f"{smooth[2]:.2f}"} if patch_weight else {}))
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(model, out, {**info, "steps_done": step + 1})
    info |= {"train_seconds": round(time.perf_counter() - t0, 1), "final_loss": round(smooth[0], 4)}
    model.eval()
    save(model, out, info)
    if eval_n:
        from phi3v.pocket.evaluate import evaluate, held_out

        import phi3v

        acc = evaluate(phi3v.load(out, device="cpu", dtype="float32"), held_out(eval_n))
        info["accuracy"] = acc
        save(model, out, info)
    return info


def main() -> None:
    # the defaults are the shipped weights' recipe (docs/pocket.md, "How it is trained")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=FOLDER)
    ap.add_argument("--steps", type=int, default=2300)
    ap.add_argument("--batch-size", type=int, default=18)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vision-lr", type=float, default=1.0, help="multiple of --lr for the vision path and the probes")
    ap.add_argument("--low-res-steps", type=int, default=1590, help="the first N steps show images at num_crops=1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=400, help="held-out examples to score at the end (0: none)")
    ap.add_argument("--save-every", type=int, default=200,
                    help="also write the files every N steps (0: only at the end)")  # fmt: skip
    ap.add_argument("--bf16", action="store_true",
                    help="bfloat16 autocast (1.2x as fast on an AVX512-BF16 EPYC, slower with AMX; docs/pocket.md)")
    ap.add_argument("--drills", action="store_true", help="also the training-only questions (docs/pocket.md)")
    ap.add_argument("--norm-probe", action="store_true", help="the fact probe reads layer-normed features")
    ap.add_argument("--patch", type=int, default=PATCH, help="the tower's patch size, px (336 / patch even)")
    ap.add_argument("--patch-weight", type=float, default=1.0,
                    help="weight of the per-patch loss: what lies under each patch (0: none)")  # fmt: skip
    ap.add_argument("--mix", type=int, nargs=len(TASKS), default=(1, 3, 2, 3), metavar="N",
                    help=f"conversations of each task ({', '.join(TASKS)}) per sum of them in a batch")  # fmt: skip
    ap.add_argument("--vision-steps", type=int, default=1000,
                    help="first train the vision path alone for N steps, on the facts and per-patch targets")
    ap.add_argument("--vision-scenes", type=int, default=9, help="scenes per step of the vision phase")
    ap.add_argument("--vision-low-res-steps", type=int, default=0,
                    help="the vision phase's first N steps show images at num_crops=1 (a quarter of the cost)")
    ap.add_argument("--phase-lr", type=float, default=1.0, help="multiple of the rates during the vision phase")
    a = ap.parse_args()
    try:
        check_recipe(a.batch_size, tuple(a.mix), a.vision_steps, a.vision_scenes, a.vision_low_res_steps, a.phase_lr)
    except ValueError as e:
        ap.error(str(e))
    info = train(a.out, a.steps, a.batch_size, a.lr, a.seed, a.eval, a.save_every, a.vision_lr, a.low_res_steps,
                 a.bf16, a.drills, a.norm_probe, a.patch, a.patch_weight, tuple(a.mix), a.vision_steps,
                 a.vision_scenes, a.vision_low_res_steps, a.phase_lr)  # fmt: skip
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
