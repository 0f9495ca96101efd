"""Model configuration, parsed from a checkpoint's `config.json` (spec §1).

The official files carry only the text model and a few vision keys; the CLIP tower's numbers are
hard-coded in the reference (ViT-L/14-336). Small checkpoints made by phi3v (tests, the demo) carry an
extension key, `"phi3v_vision_config"`, with the fields of `VisionConfig`; the official files never have it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from phi3v.errors import Phi3VError

VISION_CONFIG_KEY = "phi3v_vision_config"


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower. Defaults are ViT-L/14 at 336 px, as hard-coded in the reference (spec §1)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    layer_idx: int = -2  # features are the hidden state of this layer (spec §4.2)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_even_grid(self) -> bool:
        """Whether a 336 px crop splits into an even grid of whole patches, as the 2x2 merge needs (spec §4.3)."""
        grid, rest = divmod(self.image_size, self.patch_size)
        return self.image_size == 336 and rest == 0 and grid % 2 == 0

    @property
    def tokens_per_side(self) -> int:
        """Merged tokens along a crop's side after the 2x2 merge: 12 for Phi-3-V (spec §4.3)."""
        return self.image_size // self.patch_size // 2

    @property
    def layers_to_run(self) -> int:
        """Encoder layers needed to reach `layer_idx`; later layers are never built (spec §4.2)."""
        # hidden_states has num_layers+1 entries (the embeddings first), so index -2 is layer L-1's output.
        n = self.layer_idx if self.layer_idx >= 0 else self.num_hidden_layers + 1 + self.layer_idx
        if not 0 <= n <= self.num_hidden_layers:
            raise Phi3VError(f"img_processor.layer_idx {self.layer_idx} is outside the CLIP tower's layers")
        return n


@dataclass(frozen=True)
class TextConfig:
    """Phi-3-mini decoder (spec §1, §3)."""

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    short_factor: tuple[float, ...] | None = None  # None: plain RoPE, no LongRoPE scaling
    long_factor: tuple[float, ...] | None = None
    pad_token_id: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_scale(self) -> float:
        """LongRoPE attention scaling applied to cos and sin at every position (spec §3.5)."""
        ratio = self.max_position_embeddings / self.original_max_position_embeddings
        if self.short_factor is None or ratio <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(ratio) / math.log(self.original_max_position_embeddings))


@dataclass(frozen=True)
class Phi3VConfig:
    """The whole model: decoder, CLIP tower and the image embedding between them."""

    text: TextConfig
    vision: VisionConfig
    num_img_tokens: int = 144  # merged tokens per 336 px crop (spec §4.3)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phi3VConfig:
        """Read the named keys of an official (or phi3v-made) config.json; ignore the rest."""
        text = _text_config(d)
        img = d.get("img_processor") or {}
        vision_kw = dict(d.get(VISION_CONFIG_KEY) or {})
        if "hidden_size" not in vision_kw and "image_dim_out" in img:
            vision_kw["hidden_size"] = img["image_dim_out"]
        if "layer_idx" in img:
            vision_kw.setdefault("layer_idx", img["layer_idx"])
        vision = VisionConfig(**_known(VisionConfig, vision_kw, VISION_CONFIG_KEY))
        _check_embedding(d, img, vision)
        tokens = int(img.get("num_img_tokens", vision.tokens_per_side**2))
        if tokens != vision.tokens_per_side**2:
            raise Phi3VError(f"config.json img_processor.num_img_tokens is {tokens}, but the vision tower gives "
                             f"{vision.tokens_per_side**2} per crop")  # fmt: skip
        return cls(text=text, vision=vision, num_img_tokens=tokens)

    @classmethod
    def from_file(cls, path: str | Path) -> Phi3VConfig:
        """Parse a config.json file."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise Phi3VError(f"{path} is not valid JSON ({e}); restore the checkpoint's config.json") from None

    def to_dict(self) -> dict[str, Any]:
        """The config.json of a phi3v-made checkpoint: official keys plus the vision extension key."""
        t, v = self.text, self.vision
        d: dict[str, Any] = {
            "architectures": ["Phi3VForCausalLM"],
            "model_type": "phi3_v",
            "bos_token_id": 1,
            "eos_token_id": 2,  # the official files carry this stale id too; phi3v stops on <|end|> anyway
            "embd_layer": {
                "embedding_cls": "image",
                "hd_transform_order": "sub_glb",
                "projection_cls": "mlp",
                "use_hd_transform": True,
                "with_learnable_separator": True,
            },
            "hidden_act": "silu",
            "hidden_size": t.hidden_size,
            "img_processor": {
                "image_dim_out": v.hidden_size,
                "model_name": "openai/clip-vit-large-patch14-336",
                "name": "clip_vision_model",
                "num_img_tokens": self.num_img_tokens,
            },
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "original_max_position_embeddings": t.original_max_position_embeddings,
            "pad_token_id": t.pad_token_id,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "vocab_size": t.vocab_size,
        }
        if t.short_factor is not None:
            d["rope_scaling"] = {
                "type": "su",
                "short_factor": list(t.short_factor),
                "long_factor": list(t.long_factor or t.short_factor),
            }
        if v != VisionConfig():
            d[VISION_CONFIG_KEY] = {f.name: getattr(v, f.name) for f in fields(v)}
        return d


def _known(cls: type, d: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise Phi3VError(f"unknown keys in config.json {where}: {sorted(unknown)}")
    return d


def _text_config(d: dict[str, Any]) -> TextConfig:
    arch = d.get("architectures") or ["Phi3VForCausalLM"]
    if "Phi3VForCausalLM" not in arch and d.get("model_type") != "phi3_v":
        raise Phi3VError(f"config.json describes {arch}, not Phi3VForCausalLM; point phi3v at a Phi-3-Vision checkpoint")
    default = TextConfig()
    kw = {f.name: d.get(f.name, getattr(default, f.name)) for f in fields(TextConfig) if not f.name.endswith("_factor")}
    kw["num_key_value_heads"] = d.get("num_key_value_heads") or kw["num_attention_heads"]
    kw["pad_token_id"] = d.get("pad_token_id") if d.get("pad_token_id") is not None else default.pad_token_id
    text = TextConfig(**kw, **_rope_factors(d.get("rope_scaling"), kw))
    if text.hidden_size % text.num_attention_heads or text.head_dim % 2:
        raise Phi3VError("config.json: hidden_size must split into num_attention_heads heads of even size")
    if text.num_attention_heads % text.num_key_value_heads:
        raise Phi3VError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
    return text


def _rope_factors(rs: dict[str, Any] | None, kw: dict[str, Any]) -> dict[str, Any]:
    """LongRoPE factor lists from `rope_scaling` (spec §1, §3.5): type "su" (or "longrope")."""
    if not rs:
        return {"short_factor": None, "long_factor": None}
    kind = rs.get("type") or rs.get("rope_type")
    if kind not in ("su", "longrope"):
        raise Phi3VError(f'config.json rope_scaling type {kind!r} is not supported; Phi-3-Vision uses "su"')
    half = kw["hidden_size"] // kw["num_attention_heads"] // 2
    out = {}
    for name in ("short_factor", "long_factor"):
        vals = rs.get(name)
        if not isinstance(vals, list) or len(vals) != half:
            raise Phi3VError(f"config.json rope_scaling.{name} must be a list of head_dim/2 = {half} numbers")
        out[name] = tuple(float(x) for x in vals)
    return out


def _check_embedding(d: dict[str, Any], img: dict[str, Any], vision: VisionConfig) -> None:
    emb = d.get("embd_layer") or {}
    if emb.get("hd_transform_order", "sub_glb") != "sub_glb" or emb.get("use_hd_transform", True) is not True:
        raise Phi3VError("config.json embd_layer: only the HD transform in 'sub_glb' order is supported (spec §4.3)")
    if img.get("type_feature", "patch") != "patch":
        raise Phi3VError("config.json img_processor.type_feature must be 'patch' (spec §4.2)")
    # Phi-3-V has 24x24 patches per 336 px crop; phi3v also runs other even grids (the pocket model's 8x8).
    if not vision.has_even_grid:
        raise Phi3VError("the vision tower must see an even grid of patches per 336 px crop, 24x24 for Phi-3-V (spec §4.1)")
