"""Accuracy of a model on freshly generated held-out examples: exact match of the greedy answer."""

from __future__ import annotations

from collections.abc import Sequence

from phi3v.pocket.data import TASKS, Example, dataset

HELD_OUT_SEED = 10_000  # training draws from seeds < 10_000; this set is never trained on


def held_out(n: int, seed: int = HELD_OUT_SEED) -> list[Example]:
    """n examples cycling through the tasks, from a seed training never uses."""
    return dataset(n, seed, TASKS)


def answer(model, examples: Sequence[Example], batch_size: int = 16, **options) -> list[str]:
    """Greedy answers, `batch_size` conversations decoded together."""
    out: list[str] = []
    for i in range(0, len(examples), batch_size):
        convs = [[{"role": "user", "content": [*({"type": "image", "image": im} for im in ex.images),
                                               {"type": "text", "text": ex.question}]}]
                 for ex in examples[i : i + batch_size]]  # fmt: skip
        out += model.chat_batch(convs, max_new_tokens=32, **options)
    return out


def evaluate(model, examples: Sequence[Example], **options) -> dict[str, dict[str, float]]:
    """{task: {kind: accuracy, ..., "all": accuracy}} with kinds such as ocr "1w".."4w", shapes "count"."""
    got = answer(model, examples, **options)
    tally: dict[str, dict[str, list[int]]] = {}
    for ex, text in zip(examples, got):
        ok = int(text.strip() == ex.answer)
        for kind in (ex.kind, "all"):
            tally.setdefault(ex.task, {}).setdefault(kind, [0, 0])
            tally[ex.task][kind][0] += ok
            tally[ex.task][kind][1] += 1
    return {t: {k: round(c / n, 4) for k, (c, n) in sorted(kinds.items())} for t, kinds in tally.items()}
