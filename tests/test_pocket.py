"""The shipped pocket model (issue 6): its files, its accuracy on held-out images, and the demo."""

import hashlib
import json
import subprocess
import sys

import pytest

import phi3v
from phi3v.pocket import FOLDER
from phi3v.pocket.evaluate import HELD_OUT_SEED, answer, evaluate, held_out

# Per-task floors for the small CI set (48 examples, 12 per task); the targets are measured on 400 examples
# in the training report (pocket.json) and docs/benchmarks.md.
FLOORS = {"ocr": 0.75, "shapes": 0.75, "chart": 0.75, "change": 0.6}


@pytest.fixture(scope="module")
def pocket():
    return phi3v.load("pocket", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def examples():
    return held_out(48, seed=HELD_OUT_SEED + 1)


def test_shipped_files_are_whole_and_small():
    info = json.loads((FOLDER / "pocket.json").read_text())
    assert hashlib.sha256((FOLDER / "model.safetensors").read_bytes()).hexdigest() == info["sha256"]
    assert sum(p.stat().st_size for p in FOLDER.iterdir()) <= 20 * 1024 * 1024
    assert info["train_seconds"] <= 3600


def test_own_tokenizer_with_the_chat_special_tokens(pocket):
    tok = pocket.tokenizer
    assert tok.vocab_size < 2000  # its own, not Phi-3's 32k
    ids = {t: tok.token_to_id(t) for t in ("<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")}
    assert None not in ids.values()
    assert ids["<|end|>"] != 32007  # Phi-3's id: nothing may rely on it
    assert pocket.model.config.vision.tokens_per_side == 4  # its own crop grid, through the same code


def test_held_out_accuracy(pocket, examples):
    acc = evaluate(pocket, examples)
    for task, floor in FLOORS.items():
        assert acc[task]["all"] >= floor, (task, acc[task])


def test_batched_single_and_cached_give_the_same_answers(pocket, examples):
    subset = examples[:12]
    batched = answer(pocket, subset, batch_size=12)
    assert answer(pocket, subset, batch_size=1) == batched
    fresh = phi3v.load("pocket", device="cpu", dtype="float32", feature_cache_bytes=0)
    assert answer(fresh, subset, batch_size=12) == batched
    assert answer(pocket, subset, batch_size=12) == batched  # now from the feature cache


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_accuracy_stays_close(pocket, examples, mode):
    base = evaluate(pocket, examples)
    quant = evaluate(phi3v.load("pocket", device="cpu", dtype="float32", quantize=mode), examples)
    for task in FLOORS:
        assert quant[task]["all"] >= base[task]["all"] - 0.1, (mode, task, base[task], quant[task])


def test_demo_answers_the_three_tasks(tmp_path):
    r = subprocess.run([sys.executable, "-m", "phi3v", "demo", "--seed", "7", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    for title in ("analyse a chart", "read a text image", "compare two images"):
        assert title in r.stdout
    assert r.stdout.count("question:") == 3 and "/3 right" in r.stdout
    assert len(list(tmp_path.glob("*.png"))) == 4
