"""CLIP tower parity with transformers' CLIPVisionModel hidden_states[-2] (spec §4.1-4.2)."""

import pytest
import torch

from phi3v.checkpoint import random_model
from phi3v.weights import CLIP_PREFIX

transformers = pytest.importorskip("transformers")
from .hf_reference import clip_config  # noqa: E402


def test_clip_matches_transformers_layer_minus_2():
    model = random_model("tiny", seed=2)
    v = model.config.vision
    hf_cfg = clip_config(v)
    hf = transformers.CLIPVisionModel(hf_cfg).eval()
    ours = {k[len(CLIP_PREFIX) :]: t for k, t in model.state_dict().items() if k.startswith(CLIP_PREFIX)}
    # transformers 4 nests the tower under `vision_model`; 5 does not.
    missing, unexpected = getattr(hf, "vision_model", hf).load_state_dict(ours, strict=False)
    # Only the last layer and post_layernorm are absent from ours: they are never run (spec §4.2).
    assert unexpected == []
    assert all(f"encoder.layers.{v.num_hidden_layers - 1}." in k or "post_layernorm" in k for k in missing)
    assert len(model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers) == v.num_hidden_layers - 1

    pixels = torch.randn(3, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    got = model.model.vision_embed_tokens.img_processor(pixels)
    assert got.shape == (3, 576, v.hidden_size)
    assert (got - ref).abs().max().item() <= 1e-4
