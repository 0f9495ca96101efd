"""One image prompt run stage by stage, for the benchmarks that time or measure each stage (speed.py,
first_prompt.py, rss_stages.py): the same steps as `phi3v.api.Phi3V.request` and a Batch, with the
image-feature cache out of the way and a hook after each stage."""

from __future__ import annotations

from typing import Callable

import torch

from phi3v.api import options_from
from phi3v.generate import Batch, Request
from phi3v.image_processor import preprocess
from phi3v.prompt import build_input_ids, chat_prompt


def staged_prompt(m, image, num_crops: int, text: str, max_new_tokens: int,
                  mark: Callable[[str], None] = lambda stage: None):  # fmt: skip
    """Preprocess `image` (a PIL image), encode it, build the chat prompt `text` about it and prefill it
    into a new Batch of `m` (a loaded `phi3v.api.Phi3V`), greedy with EOS ignored, calling `mark` with
    "preprocess", "vision" and "prefill" as each ends. Returns (batch, request, feats, ids): the caller
    steps the batch to decode."""
    inputs = preprocess([image], num_crops)
    mark("preprocess")
    feats = m.model.encode_images(inputs.pixel_values, inputs.image_sizes)
    mark("vision")
    prompt, _ = chat_prompt([{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": text}]}])  # fmt: skip
    ids = torch.tensor(build_input_ids(m.tokenizer, prompt, inputs.num_img_tokens), dtype=torch.long)
    req = Request(ids, feats, options_from(max_new_tokens=max_new_tokens, ignore_eos=True))
    batch = Batch(m.model, m.tokenizer)
    batch.add(req)
    mark("prefill")
    return batch, req, feats, ids
