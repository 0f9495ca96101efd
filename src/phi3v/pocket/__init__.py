"""The pocket model: a small Phi3VForCausalLM trained by this project on synthetic tasks (issue 6).

Same architecture and code path as Phi-3-Vision (CLIP tower, HD transform on a 2x2 tile grid with
sub_GN/glb_GN, projector, su-RoPE decoder), shrunk so that it trains in under an hour on a 2-core CPU,
with its own tokenizer. Its files ship inside the package: `phi3v.load("pocket")`, `--model pocket`.
Train it again with `python -m phi3v.pocket.train`.
"""

from __future__ import annotations

from pathlib import Path

from phi3v.errors import Phi3VError

FOLDER = Path(__file__).resolve().parent / "weights"
NAME = "pocket"


def folder() -> Path:
    """The shipped checkpoint folder (official layout: config.json, model.safetensors, tokenizer files)."""
    if not (FOLDER / "model.safetensors").exists():
        raise Phi3VError(f"the pocket model's weights are missing from {FOLDER}; "
                         "train them with `python -m phi3v.pocket.train`")  # fmt: skip
    return FOLDER
