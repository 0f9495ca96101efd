"""`phi3v demo`: the official tutorial's three tasks, answered by the pocket model on freshly drawn images.

Analyse a chart, read a text image, compare two images: each image is generated anew (from `seed`),
saved, and asked about through the same `phi3v.load(...).chat(...)` a real checkpoint uses; the demo
prints the answer and whether it is right.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

from phi3v.pocket.data import Example, change, chart, ocr


def tasks(seed: int) -> list[tuple[str, Example]]:
    """The three tutorial tasks, drawn from `seed`."""
    rng = random.Random(seed)
    return [
        ("analyse a chart", chart(rng)[0]),  # "which bar is the tallest?"
        ("read a text image", ocr(rng, n_words=rng.randint(1, 3))[0]),
        ("compare two images", change(rng)[0]),
    ]


def run(folder: Path, seed: int, model: str = "pocket", say: Callable[[str], None] = print, **options) -> int:
    """Run the three tasks, saving their images into `folder`; returns how many answers were right."""
    import phi3v

    t0 = time.perf_counter()
    m = phi3v.load(model, device="cpu")
    say(f"model: {model} (loaded in {time.perf_counter() - t0:.1f} s); images from seed {seed} in {folder}")
    right = 0
    for i, (title, ex) in enumerate(tasks(seed), 1):
        paths = []
        for j, img in enumerate(ex.images):
            paths.append(folder / f"{i}-{ex.task}{'-' + 'ab'[j] if len(ex.images) > 1 else ''}.png")
            img.save(paths[-1])
        t0 = time.perf_counter()
        text = m.chat(ex.question, images=paths, max_new_tokens=32, **options).strip()
        ok = text == ex.answer
        right += ok
        verdict = "right" if ok else f"wrong, expected {ex.answer!r}"
        say(f"\n[{i}/3] {title}\n  image{'s' if len(paths) > 1 else ''}: {', '.join(map(str, paths))}\n"
            f"  question: {ex.question}\n  answer:   {text}   ({verdict}; {time.perf_counter() - t0:.2f} s)")  # fmt: skip
    return right


def accuracy_line() -> str:
    """The shipped pocket model's held-out accuracy per task, from its training report."""
    from phi3v.pocket import FOLDER

    acc = json.loads((FOLDER / "pocket.json").read_text()).get("accuracy", {})
    shown = ", ".join(f"{task} {kinds['all']:.0%}" for task, kinds in acc.items())
    return f"The pocket model's exact-match accuracy on held-out images: {shown} (docs/pocket.md)."
