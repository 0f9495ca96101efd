"""Synthetic tasks for the pocket model, generated on the fly from a seed: no downloads (issue 6).

Four families, the uses people put Phi-3-Vision to, shrunk to what a small model can learn in an hour:
- ocr: 1-4 words or numbers in Pillow's built-in font -> the text, verbatim;
- shapes: 1-5 coloured shapes -> how many, what colour is the X, describe;
- chart: a bar chart with labelled bars -> which bar is tallest, what is the value of X;
- change: two scenes that differ in one thing -> what changed (two images in one prompt).

`questions(task, rng)` draws one scene and returns every question it answers (training asks several in
one conversation: many answers per image encoded); `sample(task, rng)` picks one of them. Answers are
canonical strings, so accuracy is exact match. Each image comes with a label map (`Example.label_maps`):
what every pixel shows, a character's box, a shape or a bar, as an index into PIXEL_CLASSES; training
reads it under each patch of the vision tower (`train.patch_targets`).

Some questions are drills (`Example.drill`): training-only questions that break a hard answer into the
facts it rests on (which shape is the red one, the first word, what each image of a pair shows). They are
built from the scene without drawing from the random stream, and `sample` never picks them, so the
held-out sets are the same with or without them.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

SIZE = 336  # one crop; the image processor upsamples it to a 2x2 grid at num_crops=4
TASKS = ("ocr", "shapes", "chart", "change")
WORDS = (
    "apple banana cat dog red blue green house river stone cloud light music paper water bread chair table "
    "window garden summer winter silver golden bird fish tree road city train plane ship north south east "
    "west hello world open close stop start learn read write small large happy quiet fast slow seven eleven "
    "phone clock orange tiger lion bear horse"
).split()
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (245, 130, 20), "black": (20, 20, 20)}  # fmt: skip
INK = [c for name, c in COLOURS.items() if name != "yellow"]  # the colours text is drawn in
SHAPES = ("circle", "square", "triangle")
# What each image shows, as named facts: the training script's auxiliary target for the vision tower.
FACTS = (
    *(f"{c} {k}" for c in COLOURS for k in SHAPES), *(f"{n} shapes" for n in range(1, 6)),
    *(f"bar {b} {v}" for b in "ABCDE" for v in range(1, 10)), *(f"tallest {b}" for b in "ABCDE"),
    *(f"{n} bars" for n in range(3, 6)), *(f"word {w}" for w in WORDS), *(f"char {c}" for c in "0123456789"),
    *(f"{n} words" for n in range(1, 5)),
)  # fmt: skip
BACKGROUNDS = ((255, 255, 255), (245, 240, 225), (225, 235, 245), (235, 235, 235), (250, 230, 230))
# What each pixel shows, for the tower's per-patch target: 0 is background, then a character's box, a shape
# by colour and kind, a bar.
CHARS = string.ascii_lowercase + string.digits  # what the OCR task writes
PIXEL_CLASSES = ("", *CHARS, *"ABCDE", *(f"{c} {k}" for c in COLOURS for k in SHAPES), "bar")
PIXEL_CLASS = {name: i for i, name in enumerate(PIXEL_CLASSES)}


@dataclass(frozen=True)
class Example:
    """One question about one or more images, with its canonical answer."""

    task: str
    images: list[Image.Image]
    question: str
    answer: str
    kind: str = ""  # the question type inside the task, for per-type accuracy
    facts: tuple[frozenset[str], ...] = field(default=(), compare=False)  # per image, names from FACTS
    # Per image, an "L" image of PIXEL_CLASSES indices: what each pixel shows (training only).
    label_maps: tuple[Image.Image, ...] = field(default=(), compare=False, repr=False)
    drill: bool = False  # a training-only question (never sampled for evaluation)


def questions(task: str, rng: random.Random) -> list[Example]:
    """Every question about one freshly drawn scene of `task` (see TASKS); they share the images."""
    return {"ocr": ocr, "shapes": shapes, "chart": chart, "change": change}[task](rng)


def sample(task: str, rng: random.Random) -> Example:
    """One question about one scene of `task`, never a drill: a question kind uniformly, then one question
    of that kind."""
    qs = [q for q in questions(task, rng) if not q.drill]
    kind = rng.choice(sorted({q.kind for q in qs}))
    return rng.choice([q for q in qs if q.kind == kind])


def dataset(n: int, seed: int, tasks: tuple[str, ...] = TASKS) -> list[Example]:
    """n examples cycling through `tasks`, reproducible from `seed`."""
    rng = random.Random(seed)
    return [sample(tasks[i % len(tasks)], rng) for i in range(n)]


def _canvas(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw, Image.Image, ImageDraw.ImageDraw]:
    """An image with a random background, and its blank label map."""
    img = Image.new("RGB", (SIZE, SIZE), rng.choice(BACKGROUNDS))
    label_map = Image.new("L", (SIZE, SIZE), 0)
    return img, ImageDraw.Draw(img), label_map, ImageDraw.Draw(label_map)


def _label_text(mark: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, anchor: str = "la") -> None:
    """Mark the ink box of each character of `text`, drawn at `xy` as `draw.text` places it, with the
    character's class; spaces stay background. Centred anchors are for single characters only."""
    if anchor[0] != "l" and len(text) > 1:
        raise ValueError("a centred anchor places a string's characters only as a whole")
    for i, ch in enumerate(text):
        if ch != " ":
            box = mark.textbbox((xy[0] + font.getlength(text[:i]), xy[1]), ch, font=font, anchor=anchor)
            mark.rectangle(box, fill=PIXEL_CLASS[ch])


# --- OCR -------------------------------------------------------------------------------------------------


def ocr(rng: random.Random, n_words: int | None = None) -> list[Example]:
    n = n_words or rng.randint(1, 4)
    words = [rng.choice(WORDS) if rng.random() < 0.75 else str(rng.randint(0, 999)) for _ in range(n)]
    text = " ".join(words)
    img, draw, label_map, mark = _canvas(rng)
    colour = rng.choice(INK)
    # A random size, shrunk until the wrapped lines fit: small text must be read too.
    size = rng.randint(22, 56)
    font = ImageFont.load_default(size=size)
    lines = _wrap(words, font, SIZE - 24)
    while len(lines) * size * 1.3 > SIZE - 24:
        size -= 4
        font = ImageFont.load_default(size=size)
        lines = _wrap(words, font, SIZE - 24)
    height = int(len(lines) * size * 1.3)
    y = rng.randint(12, max(12, SIZE - 12 - height))
    for line in lines:
        w = draw.textlength(line, font=font)
        x = rng.randint(12, max(12, int(SIZE - 12 - w)))
        draw.text((x, y), line, fill=colour, font=font)
        _label_text(mark, (x, y), line, font)
        y += int(size * 1.3)
    facts = {f"{n} words"} | {f"word {w}" for w in words if not w.isdigit()}
    facts |= {f"char {c}" for c in text if c.isdigit()}
    f, m = (frozenset(facts),), (label_map,)
    drills = [Example("ocr", [img], "How many words are there?", str(n), "words", f, m, drill=True)]
    if n > 1:  # single words out of the line: where reading starts and ends
        drills += [Example("ocr", [img], "What is the first word?", words[0], "first", f, m, drill=True),
                   Example("ocr", [img], "What is the last word?", words[-1], "last", f, m, drill=True)]  # fmt: skip
    return [Example("ocr", [img], "What text is written in the image?", text, f"{n}w", f, m), *drills]


def _wrap(words: list[str], font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines: list[str] = []
    for w in words:
        if lines and font.getlength(lines[-1] + " " + w) <= width:
            lines[-1] += " " + w
        else:
            lines.append(w)
    return lines


# --- shapes ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: int  # centre
    y: int
    r: int  # half-size

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def random_scene(rng: random.Random, n: int | None = None) -> list[Shape]:
    """1-5 non-overlapping shapes, each (kind, colour) pair at most once, sorted left to right."""
    n = n or rng.randint(1, 5)
    pairs = rng.sample([(k, c) for k in SHAPES for c in COLOURS], n)
    placed: list[Shape] = []
    for kind, colour in pairs:
        for _ in range(200):
            r = rng.randint(22, 40)
            x, y = rng.randint(r + 6, SIZE - r - 6), rng.randint(r + 6, SIZE - r - 6)
            if all(abs(x - s.x) > r + s.r + 8 or abs(y - s.y) > r + s.r + 8 for s in placed):
                placed.append(Shape(kind, colour, x, y, r))
                break
    return sorted(placed, key=lambda s: (s.x, s.y))


def draw_scene(scene: list[Shape], background: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), background)
    _draw_shapes(ImageDraw.Draw(img), scene, lambda s: COLOURS[s.colour])
    return img


def scene_labels(scene: list[Shape]) -> Image.Image:
    """The scene's label map: each shape's pixels hold its PIXEL_CLASSES index."""
    label_map = Image.new("L", (SIZE, SIZE), 0)
    _draw_shapes(ImageDraw.Draw(label_map), scene, lambda s: PIXEL_CLASS[s.name])
    return label_map


def _draw_shapes(draw: ImageDraw.ImageDraw, scene: list[Shape], fill_of) -> None:
    for s in scene:
        fill = fill_of(s)
        box = (s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r)
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.x, s.y - s.r), (s.x - s.r, s.y + s.r), (s.x + s.r, s.y + s.r)], fill=fill)


def describe(scene: list[Shape]) -> str:
    """'a red circle, a blue square and a green triangle' (left to right)."""
    names = [f"a {s.name}" for s in scene]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def shapes(rng: random.Random) -> list[Example]:
    """How many, the colour of each kind of shape that occurs once, and a description."""
    scene = random_scene(rng)
    img = draw_scene(scene, rng.choice(BACKGROUNDS))
    kinds = [s.kind for s in scene]
    f, m = (scene_facts(scene),), (scene_labels(scene),)
    qs = [Example("shapes", [img], "How many shapes are there?", str(len(scene)), "count", f, m)]
    for kind in (k for k in SHAPES if kinds.count(k) == 1):
        colour = next(s.colour for s in scene if s.kind == kind)
        qs.append(Example("shapes", [img], f"What colour is the {kind}?", colour, "colour", f, m))
    qs.append(Example("shapes", [img], "Describe the image.", describe(scene), "describe", f, m))
    # The kind of each uniquely coloured shape: no other question's answer is a kind on its own.
    colours = [s.colour for s in scene]
    return qs + [Example("shapes", [img], f"What shape is the {s.colour} one?", s.kind, "shape", f, m, drill=True)
                 for s in scene if colours.count(s.colour) == 1]  # fmt: skip


def scene_facts(scene: list[Shape]) -> frozenset[str]:
    """The FACTS a scene shows: each shape by colour and kind, and how many there are."""
    return frozenset({s.name for s in scene} | {f"{len(scene)} shapes"})


# --- bar chart -------------------------------------------------------------------------------------------


def chart(rng: random.Random) -> list[Example]:
    """Which bar is the tallest, and the value of each bar."""
    n = rng.randint(3, 5)
    labels = "ABCDE"[:n]
    values = rng.sample(range(1, 10), n)  # distinct, so "tallest" has one answer
    img, draw, label_map, mark = _canvas(rng)
    font = ImageFont.load_default(size=22)
    base, top, left = SIZE - 40, 40, 30
    slot = (SIZE - 2 * left) // n
    colour = COLOURS[rng.choice(["blue", "green", "red", "purple", "orange"])]
    draw.line((left - 6, base, SIZE - left + 6, base), fill=(0, 0, 0), width=2)
    for i, (lab, v) in enumerate(zip(labels, values)):
        x0 = left + i * slot + slot // 5
        x1 = left + (i + 1) * slot - slot // 5
        y = base - (base - top) * v // 9
        draw.rectangle((x0, y, x1, base), fill=colour)
        mark.rectangle((x0, y, x1, base), fill=PIXEL_CLASS["bar"])
        cx = (x0 + x1) // 2
        for text, xy, anchor in ((lab, (cx, base + 4), "mt"), (str(v), (cx, y - 4), "mb")):
            draw.text(xy, text, fill=(0, 0, 0), font=font, anchor=anchor)
            _label_text(mark, xy, text, font, anchor)
    top = labels[values.index(max(values))]
    f = (frozenset({f"bar {lab} {v}" for lab, v in zip(labels, values)} | {f"tallest {top}", f"{n} bars"}),)
    m = (label_map,)
    tallest = Example("chart", [img], "Which bar is the tallest?", top, "tallest", f, m)
    return [tallest] + [Example("chart", [img], f"What is the value of bar {lab}?", str(v), "value", f, m)
                        for lab, v in zip(labels, values)]  # fmt: skip


# --- what changed ----------------------------------------------------------------------------------------


def change(rng: random.Random) -> list[Example]:
    """Two scenes; the second recolours, adds or removes one shape."""
    scene = random_scene(rng, rng.randint(2, 4))
    background = rng.choice(BACKGROUNDS)
    how = rng.choice(["colour", "added", "removed"])
    after = list(scene)
    if how == "colour":
        i = rng.randrange(len(scene))
        s = scene[i]
        taken = {t.colour for t in scene if t.kind == s.kind}
        new = rng.choice([c for c in COLOURS if c not in taken])
        after[i] = Shape(s.kind, new, s.x, s.y, s.r)
        answer = f"the {s.kind} changed from {s.colour} to {new}"
    elif how == "added":
        extra = random_scene(rng, 5)
        fresh = [t for t in extra if (t.kind, t.colour) not in {(u.kind, u.colour) for u in scene}
                 and all(abs(t.x - u.x) > t.r + u.r + 8 or abs(t.y - u.y) > t.r + u.r + 8 for u in scene)]  # fmt: skip
        if not fresh:  # rare: no room; fall back to a removal
            return change(rng)
        t = fresh[0]
        after = sorted(scene + [t], key=lambda s: (s.x, s.y))
        answer = f"a {t.name} was added"
    else:
        t = scene[rng.randrange(len(scene))]
        after = [s for s in scene if s is not t]
        answer = f"the {t.name} was removed"
    images = [draw_scene(scene, background), draw_scene(after, background)]
    facts, m = (scene_facts(scene), scene_facts(after)), (scene_labels(scene), scene_labels(after))
    drills = [Example("change", images, f"How many shapes are in the {nth} image?", str(len(sc)), "count", facts, m, drill=True)
              for nth, sc in (("first", scene), ("second", after))]  # fmt: skip
    drills += [Example("change", images, f"Describe the {nth} image.", describe(sc), "describe", facts, m, drill=True)
               for nth, sc in (("first", scene), ("second", after))]  # fmt: skip
    return [Example("change", images, "What changed between the two images?", answer, how, facts, m), *drills]
