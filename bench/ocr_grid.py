"""Issue 6 diagnostic: the OCR task typeset on the tower's patch grid, and where reading then fails.

    python bench/ocr_grid.py train --mix 1 0 0 0 --batch-size 16 --vision-scenes 16 --vision-steps 400 \\
        --steps 300 --low-res-steps 0 --eval 0 --out /tmp/grid     # phi3v.pocket.train's own options
    python bench/ocr_grid.py train --chars ...    # the same with a tokenizer of single characters
    python bench/ocr_grid.py score /tmp/grid      # exact match, and teacher-forced accuracy per kind of token
    python bench/ocr_grid.py probe /tmp/grid      # can a small probe read one word from the image tokens?
    python bench/ocr_grid.py score /tmp/ocr-only free   # the same on the package's own (free) OCR images

Free text sits at every offset inside the tower's 42 px patches, which a tower trained from scratch hardly
learns (`phi3v.pocket.glyphs`). Here each character gets a cell of the patch grid instead: one patch of the
global view, 2x2 patches of a tile at num_crops=4, and so exactly one merged image token of the 2x2 grid.
`grid_ocr` replaces `phi3v.pocket.data.ocr` in this process only (training, held-out sets and all): the
package is unchanged. Results: docs/pocket.md, "OCR on the patch grid".
"""

from __future__ import annotations

import json
import random
import sys

import torch
import torch.nn.functional as F
from PIL import ImageFont
from torch import nn

import phi3v
from phi3v.checkpoint import write_byte_tokenizer
from phi3v.pocket import data, train
from phi3v.pocket.evaluate import HELD_OUT_SEED, evaluate
from phi3v.pocket.train import IGNORE, collate, encode_once, scene_batch
from phi3v.prompt import Tokenizer

CELL = 42  # px of the 336 px image: one patch of the global view
COLS = data.SIZE // CELL
FONT_SIZES = (26, 40)


def grid_ocr(rng: random.Random, n_words: int | None = None) -> list[data.Example]:
    """The OCR task's question (no drills), its text a character to each CELL, lines at random rows and
    columns; sizes, colours and backgrounds drawn as the task draws them."""
    n = n_words or rng.randint(1, 4)
    words = [rng.choice(data.WORDS) if rng.random() < 0.75 else str(rng.randint(0, 999)) for _ in range(n)]
    img, draw, label_map, mark = data._canvas(rng)
    colour = rng.choice(data.INK)
    font = ImageFont.load_default(size=rng.randint(*FONT_SIZES))
    lines: list[str] = []
    for w in words:  # the longest word has 6 characters, so 4 words always fit in 8 lines of 8
        if lines and len(lines[-1]) + 1 + len(w) <= COLS:
            lines[-1] += " " + w
        else:
            lines.append(w)
    row = rng.randint(0, COLS - len(lines))
    for line in lines:
        col = rng.randint(0, COLS - len(line))
        for i, ch in enumerate(line):
            if ch != " ":
                xy = ((col + i + 0.5) * CELL, (row + 0.5) * CELL)
                draw.text(xy, ch, fill=colour, font=font, anchor="mm")
                data._label_text(mark, xy, ch, font, anchor="mm")
        row += 1
    text = " ".join(words)
    facts = {f"{n} words"} | {f"word {w}" for w in words if not w.isdigit()}
    facts |= {f"char {c}" for c in text if c.isdigit()}
    return [data.Example("ocr", [img], "What text is written in the image?", text, f"{n}w",
                         (frozenset(facts),), (label_map,))]  # fmt: skip


LAYOUTS = {"grid": grid_ocr, "free": data.ocr}  # "free": the package's own OCR task, for comparison
data.ocr = grid_ocr  # `questions` looks the task up by name at each call


def held_out(n: int, layout: str = "grid") -> list[data.Example]:
    rng = random.Random(HELD_OUT_SEED)
    return [LAYOUTS[layout](rng)[0] for _ in range(n)]


def score(folder: str, layout: str = "grid") -> dict:
    """Greedy exact match on 96 held-out images of `layout`, and teacher-forced top-1 accuracy of each answer
    token by kind (a word, a digit, a space, <|end|>) and place (the answer's first token or a later one)."""
    m = phi3v.load(folder, dtype=torch.float32)
    model, tok, examples = m.model, m.tokenizer, held_out(96, layout)
    tally: dict[str, list[int]] = {}
    with torch.no_grad():
        for i in range(0, len(examples), 16):
            b = collate(tok, [[ex] for ex in examples[i : i + 16]], side=4)  # right-padded: no mask needed
            logits = model(b["ids"], b["pixel_values"], b["image_sizes"])
            guess, target = logits[:, :-1].argmax(-1), b["labels"][:, 1:]
            for row in range(len(target)):
                for j, k in enumerate((target[row] != IGNORE).nonzero().flatten().tolist()):
                    t = int(target[row, k])
                    s = tok.decode([t]).strip()
                    kind = "digit" if s.isdigit() else "word" if s else "space"
                    kind = "end" if t == tok.end_token_id else kind
                    right = tally.setdefault(f"{kind} {'first' if j == 0 else 'later'}", [0, 0])
                    right[0] += int(guess[row, k] == t)
                    right[1] += 1
    return {"exact_match": evaluate(m, examples)["ocr"],
            "teacher_forced": {k: f"{a}/{n}" for k, (a, n) in sorted(tally.items())}}  # fmt: skip


class AttentionProbe(nn.Module):
    """Four learned queries attend over an image's tokens; a linear layer names the word from what they read."""

    def __init__(self, dim: int, classes: int, heads: int = 4) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(heads, dim) / dim**0.5)
        self.k, self.v, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(heads * dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.einsum("hd,btd->bht", self.q, self.k(x)).softmax(-1)
        return self.out(torch.einsum("bht,btd->bhd", weights, self.v(x)).flatten(1))


def probe(folder: str, layout: str = "grid", steps: int = 300) -> dict:
    """With the tower and projector frozen, train probes on one-word images' tokens to name the word (60
    words, or "a number": 25% of them): the mean of the tokens through a linear layer, and `AttentionProbe`.
    Held-out accuracy every 100 steps of 32 images."""
    model = phi3v.load(folder, dtype=torch.float32).model

    def batch(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        examples = [LAYOUTS[layout](rng, 1)[0] for _ in range(n)]
        numbers = len(data.WORDS)  # the class of every number
        words = torch.tensor(
            [numbers if e.answer.isdigit() else data.WORDS.index(e.answer) for e in examples]
        )
        b = scene_batch(examples, side=4)
        with torch.no_grad():
            feats, _ = encode_once(model, b["pixel_values"], b["image_sizes"])
        return feats.view(n, -1, feats.shape[-1]), words

    held = [batch(random.Random(HELD_OUT_SEED + 7 + i), 64) for i in range(2)]
    torch.manual_seed(0)  # the probes' initial weights
    dim, classes = held[0][0].shape[-1], len(data.WORDS) + 1
    probes = {"mean, linear": nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes)),
              "attention": AttentionProbe(dim, classes)}  # fmt: skip
    reads = {"mean, linear": lambda x: x.mean(1), "attention": lambda x: x}
    opts = {name: torch.optim.AdamW(p.parameters(), 1e-3) for name, p in probes.items()}
    out: dict[str, list[float]] = {name: [] for name in probes}
    rng = random.Random(0)
    for step in range(steps):
        x, y = batch(rng, 32)  # both probes learn from the same images: the tower's work is most of a step
        for name, p in probes.items():
            loss = F.cross_entropy(p(reads[name](x)), y)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                for name, p in probes.items():
                    right = sum(int((p(reads[name](hx)).argmax(-1) == hy).sum()) for hx, hy in held)
                    out[name].append(round(right / sum(len(hy) for _, hy in held), 3))
            print(f"step {step + 1}: held-out {out}", file=sys.stderr, flush=True)
    return out


def spelled_tokenizer(folder, seed: int, drills: bool = False) -> Tokenizer:
    """`train.build_tokenizer` without merges: the byte-fallback tokenizer, every character one token."""
    write_byte_tokenizer(folder)
    return Tokenizer.from_dir(folder)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "score", "probe"):
        sys.exit(__doc__)
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "train":
        if "--chars" in rest:  # no BPE merges: every character its own token, so an answer copies them
            rest.remove("--chars")
            train.build_tokenizer = spelled_tokenizer
        sys.argv = ["phi3v.pocket.train", *rest]
        train.main()
    else:
        print(json.dumps((score if command == "score" else probe)(*rest), indent=1))


if __name__ == "__main__":
    main()
