"""The Python API: `phi3v.load(...)` returns a `Phi3V` that answers OpenAI-style chat messages."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from phi3v.errors import Phi3VError
from phi3v.generate import Batch, Event, GenerationOptions, Request, generate
from phi3v.model import Phi3VForCausalLM
from phi3v.feature_cache import FeatureCache, image_key
from phi3v.linear import cpu_has_fast_bf16
from phi3v.image_processor import hd_size, load_image, num_image_tokens, preprocess
from phi3v.processing import process, read_num_crops
from phi3v.prompt import Tokenizer, build_input_ids, chat_prompt
from phi3v.sampling import SamplingParams
from phi3v.sources import resolve_image
from phi3v.weights import checkpoint_bytes, load_model, resolve_checkpoint

DEFAULT_MODEL = "microsoft/Phi-3.5-vision-instruct"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' is the first CUDA GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise Phi3VError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Phi3VError("device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise Phi3VError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def available_memory() -> int | None:
    """MemAvailable in bytes (Linux), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None, bf16_bytes: int = 0) -> torch.dtype:
    """The requested dtype, or for "auto"/None: bfloat16 (the weights' own dtype) on GPUs and on CPUs with
    bfloat16 instructions; float32 on other CPUs (prefill runs ~6x faster there) when twice the bf16
    weights plus 2 GiB fit in free memory."""
    if dtype is None or dtype == "auto":
        if device is not None and device.type == "cpu" and not cpu_has_fast_bf16():
            free = available_memory()
            if free is None or 2 * bf16_bytes + (2 << 30) < free:  # float32 weights plus room to run
                return torch.float32
        return torch.bfloat16
    return _parse_dtype(dtype, "dtype")


def pick_kv_dtype(
    kv_dtype: str | torch.dtype | None, dtype: torch.dtype, device: torch.device, quantize: str | None
) -> torch.dtype:
    """The KV cache's dtype: the requested one, or for "auto"/None bfloat16 where a quantized model computes
    in float32 on the CPU (half the cache's memory, and half the bytes each decoding step reads; its
    weights are approximate already), else the compute dtype `dtype`."""
    if kv_dtype is None or kv_dtype == "auto":
        return torch.bfloat16 if device.type == "cpu" and quantize and dtype == torch.float32 else dtype
    return _parse_dtype(kv_dtype, "kv_dtype")


def _parse_dtype(value: str | torch.dtype, name: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
    elif value in _DTYPES:
        return _DTYPES[value]
    raise Phi3VError(f"unsupported {name} {value!r}; use auto, bfloat16, float16 or float32")


def options_from(
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
) -> GenerationOptions:
    """GenerationOptions from plain keyword arguments (greedy by default, as the model cards use)."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return GenerationOptions(
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
        stop_token_ids=tuple(stop_token_ids),
        stop=tuple(s for s in stops if s),
        ignore_eos=ignore_eos,
    )


@dataclass(frozen=True)
class Completion:
    """An answer with its accounting: tokens in and out, total seconds and seconds to the first token
    (both counting image encoding)."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    first_token_seconds: float


class Phi3V:
    """A loaded model with its tokenizer and image settings."""

    def __init__(self, model: Phi3VForCausalLM, tokenizer: Tokenizer, num_crops: int = 16,
                 feature_cache_bytes: int = 512 << 20):  # fmt: skip
        self.model, self.tokenizer, self.num_crops = model, tokenizer, num_crops
        self.cache = FeatureCache(feature_cache_bytes)

    def request(self, messages: str | list[dict[str, Any]], images: Sequence[Any] = (), num_crops: int | None = None,
                **options: Any) -> Request:  # fmt: skip
        """Build a generation request from chat messages (see `chat`). With `images=` and messages whose text
        carries its own <|image_N|> tags (the official notebook style), the images fill those tags."""
        if isinstance(messages, str):
            parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": messages}]
            messages, images = [{"role": "user", "content": parts}], ()
        prompt, found = chat_prompt(messages)
        if images and found:
            raise Phi3VError("images are both in the messages and in images=; pass them one way only")
        found = found or list(images)
        n = num_crops or self.num_crops
        if not found:
            return Request(process(self.tokenizer, prompt, (), n).input_ids, None, options_from(**options))
        imgs = [load_image(resolve_image(im)) for im in found]  # paths, bytes, PIL, data: and http(s) URLs
        # token counts need no pixels: check the prompt's tags before any vision work
        side = self.model.config.vision.tokens_per_side
        counts = [num_image_tokens(*hd_size(im.width, im.height, n), side) for im in imgs]
        ids = torch.tensor(build_input_ids(self.tokenizer, prompt, counts), dtype=torch.long)
        return Request(ids, self.image_features(imgs, n), options_from(**options))

    def image_features(self, images: Sequence[Image.Image], num_crops: int) -> torch.Tensor:
        """Projected features of decoded RGB images, in order: from the feature cache where possible, the
        rest through the image processor and the vision tower in one batch."""
        keys = [image_key(im, num_crops) for im in images]
        found = [self.cache.get(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            inputs = preprocess([images[i] for i in todo], num_crops, side=self.model.config.vision.tokens_per_side)
            with torch.inference_mode():
                new = self.model.encode_images(inputs.pixel_values, inputs.image_sizes)
            for i, f in zip(todo, new.split(inputs.num_img_tokens)):
                found[i] = f
                self.cache.put(keys[i], f)
        return torch.cat(found)

    def chat(self, messages: str | list[dict[str, Any]], images: Sequence[Any] = (), **options: Any) -> str:
        """Answer a conversation. `messages` are OpenAI-style dicts whose content is a string or a list of
        parts ({"type": "text", "text": ...}, {"type": "image", "image": path | PIL image | bytes}); a plain
        string is one user turn, with `images` placed before it. Options: max_new_tokens, temperature,
        top_p, top_k, seed, stop, num_crops."""
        return "".join(self.stream(messages, images, **options))

    def stream(self, messages: str | list[dict[str, Any]], images: Sequence[Any] = (), **options: Any) -> Iterator[str]:
        """Like `chat`, yielding text deltas as they are generated (never a split UTF-8 character)."""
        for event in self._events(self.request(messages, images, **options)):
            if event.text:
                yield event.text

    def run(self, messages: str | list[dict[str, Any]], images: Sequence[Any] = (),
            on_text: Callable[[str], None] | None = None, **options: Any) -> Completion:  # fmt: skip
        """Like `chat`, with token counts and timings; `on_text` receives each text delta as it comes."""
        t0 = time.perf_counter()
        req = self.request(messages, images, **options)
        first = None
        for event in self._events(req):
            first = first or time.perf_counter() - t0
            if event.text and on_text is not None:
                on_text(event.text)
        return Completion(req.text, req.finish_reason or "stop", req.prompt_tokens, len(req.tokens),
                          time.perf_counter() - t0, first or 0.0)  # fmt: skip

    def _events(self, req: Request) -> Iterator[Event]:
        batch = Batch(self.model, self.tokenizer)
        event = batch.add(req)
        yield event
        while event.finish_reason is None:
            (event,) = batch.step()
            yield event

    def chat_batch(self, conversations: Sequence[str | list[dict[str, Any]]], **options: Any) -> list[str]:
        """Answer several conversations at once, decoding them together; each answer equals its own `chat`."""
        reqs = [self.request(c, **options) for c in conversations]
        for _ in generate(self.model, self.tokenizer, reqs):
            pass
        return [r.text for r in reqs]


def load(
    model: str | Path = DEFAULT_MODEL,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    num_crops: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    feature_cache_bytes: int = 512 << 20,
    quantize: str | None = None,
    group_size: int | None = None,
    kv_dtype: str | torch.dtype | None = None,
) -> Phi3V:
    """Load a checkpoint folder, or a hub id from the local Hugging Face cache, onto a device.

    device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N". dtype: "auto" (see `pick_dtype`),
    "bfloat16", "float16" or "float32". num_crops: image tiles, default from preprocessor_config.json.
    feature_cache_bytes: memory for the features of recently seen images (0 turns the cache off).
    quantize: None, "int8" or "int4" (groups of `group_size` inputs, 128 by default): weight-only
    quantization of the linear layers while loading; about 2x / 3.5x less memory and faster decoding
    (docs/benchmarks.md). kv_dtype: the KV cache's dtype, "auto" (see `pick_kv_dtype`) or as dtype.
    """
    folder = resolve_checkpoint(model)
    dev = pick_device(device)
    quantize = None if quantize in (None, "none") else quantize
    dt = pick_dtype(dtype, dev, checkpoint_bytes(folder) if quantize is None else 0)
    kv = pick_kv_dtype(kv_dtype, dt, dev, quantize)  # before loading: a bad value costs no time
    tokenizer = Tokenizer.from_dir(folder)
    net = load_model(folder, device=dev, dtype=dt, progress=progress, quantize=quantize, group_size=group_size)
    net.kv_dtype = None if kv == dt else kv
    return Phi3V(net, tokenizer, num_crops or read_num_crops(folder), feature_cache_bytes)
