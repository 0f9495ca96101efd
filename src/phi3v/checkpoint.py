"""Random-weight checkpoints in exactly the official folder layout (spec §2), for tests, demos and benchmarks.

`tiny` is a few MB and runs the whole pipeline in a second; `full` has the real dimensions (8.3 GB of
bf16, 592 tensors) for benchmarks. Random weights produce noise, not answers.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from phi3v.config import Phi3VConfig, TextConfig, VisionConfig
from phi3v.model import Phi3VForCausalLM
from phi3v.weights import CLIP_PREFIX, INDEX_FILE, expected_keys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)


def _ramp(n: int, lo: float, hi: float) -> tuple[float, ...]:
    """A non-decreasing factor list like the official ones (spec §1)."""
    return tuple(lo + (hi - lo) * i / max(n - 1, 1) for i in range(n))


def preset(name: str) -> Phi3VConfig:
    """`full`: the official dimensions; `tiny`: the same structure, shrunk (real 336 px crop geometry)."""
    if name == "full":
        text = TextConfig(
            max_position_embeddings=131072, short_factor=_ramp(48, 1.05, 3.05), long_factor=_ramp(48, 1.03, 64.81)
        )
        return Phi3VConfig(text=text, vision=VisionConfig())
    if name == "tiny":
        text = TextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=131072,
            short_factor=_ramp(8, 1.05, 3.05), long_factor=_ramp(8, 1.03, 64.81),
        )  # fmt: skip
        vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
        return Phi3VConfig(text=text, vision=vision)
    raise ValueError(f"unknown preset {name!r}; use 'tiny' or 'full'")


def random_tensor(name: str, shape: torch.Size, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Norm weights near 1, everything else N(0, 0.02): values that keep activations in range.

    Each tensor's values depend only on (seed, name), so any subset can be made in any order.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    if "norm" in name and name.endswith("weight") or "layrnorm.weight" in name:
        return (1.0 + 0.1 * t).to(dtype)
    return (0.02 * t).to(dtype)


def checkpoint_shapes(cfg: Phi3VConfig) -> dict[str, torch.Size]:
    """Every tensor an official checkpoint with this config stores, including the unused ones (spec §2.2)."""
    with torch.device("meta"):
        shapes = expected_keys(Phi3VForCausalLM(cfg))
    run, total = cfg.vision.layers_to_run, cfg.vision.num_hidden_layers
    template = {k: s for k, s in shapes.items() if k.startswith(f"{CLIP_PREFIX}encoder.layers.0.")}
    for j in range(run, total):  # layers past the selected hidden state: stored, never run
        for k, s in template.items():
            shapes[k.replace("encoder.layers.0.", f"encoder.layers.{j}.")] = s
    for part in ("weight", "bias"):
        shapes[f"{CLIP_PREFIX}post_layernorm.{part}"] = torch.Size([cfg.vision.hidden_size])
    return shapes


def random_model(cfg: Phi3VConfig | str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> Phi3VForCausalLM:
    """A model with the same random weights `write_checkpoint` would store for this config and seed."""
    cfg = preset(cfg) if isinstance(cfg, str) else cfg
    with torch.device("meta"):
        model = Phi3VForCausalLM(cfg)
    shapes = expected_keys(model)
    state = {k: random_tensor(k, shapes[k], seed, dtype) for k in shapes}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def write_checkpoint(
    folder: str | Path,
    cfg: Phi3VConfig | str = "tiny",
    *,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    num_crops: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int | None = None,
) -> Path:
    """Write config, generation and preprocessor configs, tokenizer files, the index and >= 2 shards.

    The tokenizer is copied from `tokenizer_dir` (a folder with the real Phi-3-Vision tokenizer.json)
    or, without one, a byte-level tokenizer with the same chat special tokens is generated.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(cfg, str):
        name, cfg = cfg, preset(cfg)
        num_crops = num_crops or (16 if name == "full" else 4)
    shapes = checkpoint_shapes(cfg)
    total = sum(s.numel() for s in shapes.values()) * dtype.itemsize
    shard_bytes = shard_bytes or min(2 << 30, total // 2 + 1)
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(shapes):  # sorted order keeps the shard split deterministic
        n = shapes[name].numel() * dtype.itemsize
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map = {}
    for i, names in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: random_tensor(k, shapes[k], seed, dtype) for k in names}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
        del tensors
    _dump(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    write_configs(folder, cfg, num_crops or 16)
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).exists():
                shutil.copyfile(Path(tokenizer_dir) / f, folder / f)
    else:
        write_byte_tokenizer(folder)
    return folder


def write_configs(folder: Path, cfg: Phi3VConfig, num_crops: int) -> None:
    """config.json, generation_config.json and preprocessor_config.json of a phi3v-made checkpoint."""
    _dump(folder / "config.json", cfg.to_dict())
    _dump(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "_from_model_config": True})
    _dump(folder / "preprocessor_config.json", {
        "image_processor_type": "Phi3VImageProcessor", "processor_class": "Phi3VProcessor",
        "num_crops": num_crops, "num_img_tokens": cfg.num_img_tokens,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    })  # fmt: skip


def write_byte_tokenizer(folder: Path, corpus: Iterable[str] = (), vocab_size: int = 0) -> None:
    """A Llama-style tokenizer with Phi-3's chat special tokens: byte fallback, optionally BPE merges.

    Every UTF-8 byte has its own id (as in SentencePiece's byte fallback), so any text round-trips; the
    special tokens keep their strings and flags (spec §6.1) but not Phi-3's ids. With a `corpus`, BPE
    merges up to `vocab_size` are learned from it (the pocket model's own tokenizer).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab["▁"] = len(vocab)
    merges: list[tuple[str, str]] = []
    corpus = list(corpus)
    if corpus:
        learner = Tokenizer(BPE(unk_token="<unk>"))
        learner.normalizer = normalizer
        # Learn merges inside words only, and none between digits (as Llama's tokenizer), so that the
        # greedy merges of the final tokenizer never cross a word and numbers read digit by digit.
        learner.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split("▁", behavior="merged_with_next"), pre_tokenizers.Digits(individual_digits=True)]
        )
        learner.train_from_iterator(corpus, BpeTrainer(vocab_size=vocab_size, show_progress=False))
        learned = json.loads(learner.to_str())["model"]
        for piece in sorted(learned["vocab"], key=learned["vocab"].get):
            vocab.setdefault(piece, len(vocab))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in ("<unk>", "<s>")])
    specials = [("<|endoftext|>", False), ("<|assistant|>", True), ("<|system|>", False), ("<|end|>", False),
                ("<|user|>", False), ("<|image|>", True)]  # fmt: skip
    tok.add_special_tokens([AddedToken(t, rstrip=r, normalized=False) for t, r in specials])
    tok.save(str(folder / "tokenizer.json"))
    _dump(folder / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": 131072,
    })  # fmt: skip


def _dump(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


