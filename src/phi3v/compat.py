"""A drop-in for the official notebook code: only the imports and the two load lines change.

    from phi3v import Phi3VForCausalLM, Phi3VProcessor
    model = Phi3VForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    processor = Phi3VProcessor.from_pretrained(path, num_crops=4)
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(prompt, [image], return_tensors="pt").to("cuda")
    ids = model.generate(**inputs, max_new_tokens=1000, eos_token_id=processor.tokenizer.eos_token_id)
    ids = ids[:, inputs["input_ids"].shape[1]:]
    text = processor.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from phi3v import model as _model
from phi3v.api import options_from, pick_device, pick_dtype
from phi3v.errors import Phi3VError
from phi3v.generate import Request, generate
from phi3v.processing import process, read_num_crops, read_tokens_per_side
from phi3v.prompt import IMAGE_TAG, Tokenizer
from phi3v.weights import checkpoint_bytes, load_model, resolve_checkpoint


class BatchFeature(dict):
    """The processor's output: a dict of tensors with attribute access and `.to(device)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchFeature:
        return BatchFeature({k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.items()})


class Phi3VProcessor:
    """Prompt tokenization and image preprocessing, as `AutoProcessor` returns for the official models."""

    def __init__(self, tokenizer: Tokenizer, num_crops: int = 16, side: int = 12):
        self.tokenizer, self.num_crops, self.side = tokenizer, num_crops, side

    @classmethod
    def from_pretrained(cls, path: str | Path, num_crops: int | None = None, **_: Any) -> Phi3VProcessor:
        """Load from a checkpoint folder or cached hub id; `trust_remote_code` and the like are ignored."""
        folder = resolve_checkpoint(path)
        return cls(Tokenizer.from_dir(folder), num_crops or read_num_crops(folder), read_tokens_per_side(folder))

    def __call__(self, text: str | Sequence[str], images: Any = None, return_tensors: str | None = "pt",
                 num_crops: int | None = None, **_: Any) -> BatchFeature:  # fmt: skip
        """input_ids, attention_mask, and with images pixel_values and image_sizes.

        A list of prompts is left-padded; each numbers its own images from <|image_1|>, and `images` holds
        all of them in prompt order.
        """
        if return_tensors not in ("pt", None):
            raise Phi3VError(f"return_tensors={return_tensors!r} is not supported; phi3v returns PyTorch tensors")
        prompts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else [images] if not isinstance(images, (list, tuple)) else list(images)
        parts, start = [], 0
        for p in prompts:
            k = len(set(IMAGE_TAG.findall(p))) if images else 0
            parts.append(process(self.tokenizer, p, images[start : start + k], num_crops or self.num_crops, self.side))
            start += k
        if start != len(images):
            raise Phi3VError(f"{len(images)} images were given but the prompts' <|image_N|> tags use {start}")
        width = max(p.input_ids.numel() for p in parts)
        ids = torch.full((len(parts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(parts), width), dtype=torch.long)
        for i, p in enumerate(parts):
            ids[i, width - p.input_ids.numel() :] = p.input_ids
            mask[i, width - p.input_ids.numel() :] = 1
        out = BatchFeature(input_ids=ids, attention_mask=mask)
        with_images = [p.images for p in parts if p.images is not None]
        if with_images:
            out["pixel_values"] = torch.cat([im.pixel_values for im in with_images])
            out["image_sizes"] = torch.cat([im.image_sizes for im in with_images])
        return out

    def batch_decode(self, ids: Tensor | Sequence[Sequence[int]], **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(ids.tolist() if isinstance(ids, Tensor) else ids, **kwargs)

    def decode(self, ids: Tensor | Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(ids.tolist() if isinstance(ids, Tensor) else list(ids), **kwargs)


@dataclass
class CausalLMOutput:
    logits: Tensor


class Phi3VForCausalLM(_model.Phi3VForCausalLM):
    """The model with the `from_pretrained` / `__call__` / `generate` surface of the official remote code."""

    tokenizer: Tokenizer | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = None, torch_dtype: Any = None, device_map: Any = None,
                        quantize: str | None = None, **_: Any) -> Phi3VForCausalLM:  # fmt: skip
        """Load weights; `dtype`/`torch_dtype` ("auto" = bfloat16), `device_map` ("cuda", "cpu", "auto"),
        `quantize` (None, "int8", "int4": phi3v's own extension)."""
        folder = resolve_checkpoint(path)
        device = pick_device(device_map if isinstance(device_map, str) else "cpu")
        dtype = pick_dtype(dtype or torch_dtype, device, checkpoint_bytes(folder) if quantize is None else 0)
        model = load_model(folder, device=device, dtype=dtype, cls=cls, quantize=quantize)
        if (folder / "tokenizer.json").exists():
            model.tokenizer = Tokenizer.from_dir(folder)
        return model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_sizes: Tensor | None = None, **_: Any) -> CausalLMOutput:  # fmt: skip
        return CausalLMOutput(super().forward(input_ids, pixel_values, image_sizes, attention_mask))

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                 image_sizes: Tensor | None = None, max_new_tokens: int = 20, eos_token_id: int | list[int] | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
                 **_: Any) -> Tensor:  # fmt: skip
        """Prompt ids followed by the new ids, right-padded with the pad id after each row's stop.

        Stops on <|end|> and <|endoftext|> always (spec §6.5), plus any `eos_token_id` given.
        """
        if self.tokenizer is None:
            raise Phi3VError("this model was loaded without tokenizer files; load it from a full checkpoint folder")
        extra = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        opts = options_from(max_new_tokens, temperature if do_sample else 0.0, top_p if do_sample else 1.0,
                            top_k if do_sample else 0, stop_token_ids=extra)  # fmt: skip
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        feats = None if pixel_values is None else self.encode_images(pixel_values, image_sizes)
        reqs, used = [], 0
        for row, row_mask in zip(input_ids, mask):
            ids = row[row_mask.bool()].cpu()
            n = int((ids < 0).sum())
            reqs.append(Request(ids, None if feats is None or not n else feats[used : used + n], opts))
            used += n
        for _ in generate(self, self.tokenizer, reqs):
            pass
        width = max(len(r.tokens) for r in reqs)
        new = torch.full((len(reqs), width), self.tokenizer.pad_token_id, dtype=input_ids.dtype)
        for i, r in enumerate(reqs):
            new[i, : len(r.tokens)] = torch.tensor(r.tokens, dtype=input_ids.dtype)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
