"""Prompt + images -> model inputs: the image processor and the prompt builder together (spec §5-6)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from phi3v.config import Phi3VConfig
from phi3v.errors import Phi3VError
from phi3v.image_processor import ImageInputs, preprocess
from phi3v.prompt import IMAGE_TAG, Tokenizer, build_input_ids


@dataclass(frozen=True)
class ProcessedPrompt:
    """input_ids (L,) with a run of -k per <|image_k|> tag, and the images' tensors (None without images)."""

    input_ids: Tensor
    images: ImageInputs | None


def read_tokens_per_side(folder: Path) -> int:
    """The checkpoint's merged tokens per crop side (12 for Phi-3-V), from config.json."""
    path = folder / "config.json"
    return Phi3VConfig.from_file(path).vision.tokens_per_side if path.exists() else 12


def read_num_crops(folder: Path, default: int = 16) -> int:
    """num_crops from preprocessor_config.json: 16 for Phi-3-V, 4 for Phi-3.5-V (spec §1)."""
    path = folder / "preprocessor_config.json"
    if not path.exists():
        return default
    return int(json.loads(path.read_text()).get("num_crops", default))


def process(tokenizer: Tokenizer, prompt: str, images: Sequence[Any] = (), num_crops: int = 16,
            side: int = 12) -> ProcessedPrompt:  # fmt: skip
    """Tokenize a formatted prompt and preprocess its images, checking that tags and images agree.
    `side` is the model's `VisionConfig.tokens_per_side` (12 for Phi-3-V)."""
    if not isinstance(prompt, str):
        raise Phi3VError(f"the prompt must be a string, got {type(prompt).__name__}")
    if not images and IMAGE_TAG.search(prompt):
        raise Phi3VError("the prompt has <|image_N|> tags but no images were given; pass one image per tag")
    inputs = preprocess(list(images), num_crops, side=side) if images else None
    ids = build_input_ids(tokenizer, prompt, inputs.num_img_tokens if inputs else [])
    return ProcessedPrompt(torch.tensor(ids, dtype=torch.long), inputs)
