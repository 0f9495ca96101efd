"""Seconds per training step of the pocket model, float32 against bfloat16 autocast, in the same run.

    python bench/pocket_step.py [--steps 5] [--repeats 2] [--batch-size 18] [--mix 1 3 2 3]

The steps of `python -m phi3v.pocket.train` (its default recipe: per-patch loss on, one micro-batch per
task), at num_crops 1 (the low-resolution steps) and 4, on batches drawn beforehand so that only the
forward, backward and AdamW update are timed. The two settings alternate `--repeats` times, each after
two warm-up steps, and the median of each is reported with their ratio: on these VMs the speed drifts
within minutes, so a ratio from one run of each would say little.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from phi3v.cpu_kernels import cpu_flags
from phi3v.pocket import FOLDER
from phi3v.pocket import train as T
from phi3v.prompt import Tokenizer


def seconds_per_step(tok: Tokenizer, num_crops: int, bf16: bool, steps: int, batch_size: int,
                     mix: tuple[int, ...]) -> float:  # fmt: skip
    """Mean seconds of `steps` timed training steps (after two untimed ones) of a freshly initialised model."""
    torch.manual_seed(0)
    model, probes = T.new_model(tok, seed=0)
    opt = T.optimizer(model, probes, 1e-3)
    tasks = T.task_cycle(mix)
    rng = random.Random(0)
    batches = [T.micro_batches(tok, [T.conversation(tasks[i % len(tasks)], rng) for i in range(batch_size)],
                               model.config.vision.tokens_per_side, num_crops) for _ in range(steps + 2)]  # fmt: skip

    def step(i: int) -> None:
        T.optimizer_step(model, opt, i, 100, lambda: T.train_step(model, probes, batches[i], bf16, 1.0))

    step(0), step(1)
    t0 = time.perf_counter()
    for i in range(2, steps + 2):
        step(i)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=2, help="measurements of each setting, alternated")
    ap.add_argument("--batch-size", type=int, default=18)
    ap.add_argument("--mix", type=int, nargs=len(T.TASKS), default=(1, 3, 2, 3), metavar="N")
    a = ap.parse_args()
    tok = Tokenizer.from_dir(FOLDER)  # the shipped one: the training script's seed-0 tokenizer, byte for byte
    flags = cpu_flags() or frozenset()
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                         f"avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, amx {'yes' if 'amx_bf16' in flags else 'no'}",
              "batch_size": a.batch_size, "mix": list(a.mix), "steps": a.steps, "repeats": a.repeats}  # fmt: skip
    for num_crops in (1, 4):
        runs: dict[str, list[float]] = {"float32": [], "bfloat16 autocast": []}
        for _ in range(a.repeats):
            for name in runs:
                runs[name].append(seconds_per_step(tok, num_crops, name != "float32", a.steps, a.batch_size, tuple(a.mix)))
        med = {name: statistics.median(v) for name, v in runs.items()}
        report[f"num_crops={num_crops}"] = {
            "seconds_per_step": {name: [round(x, 3) for x in v] for name, v in runs.items()},
            "median": {name: round(x, 3) for name, x in med.items()},
            "bf16_speedup": round(med["float32"] / med["bfloat16 autocast"], 2),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
