"""Phi3VForCausalLM: the module tree mirrors the checkpoint, so `state_dict()` keys are the official ones.

Data flow (spec §0): token embeddings, with image tokens written in at the negative-id placeholders
(§4.5) -> decoder layers with LongRoPE (§3) -> RMSNorm -> lm_head -> float32 logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from phi3v.config import Phi3VConfig
from phi3v.errors import Phi3VError
from phi3v.image_embedding import ImageEmbedding
from phi3v.kv_cache import KVCache
from phi3v.language import AttentionInputs, DecoderLayer, RMSNorm
from phi3v.linear import Linear
from phi3v.rope import cos_sin


class Phi3VModel(nn.Module):
    """`model.*`: embeddings, the vision path, the decoder layers and the final norm."""

    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        t = cfg.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.vision_embed_tokens = ImageEmbedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(t, i) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)


class Phi3VForCausalLM(nn.Module):
    """The whole model. `forward` is a plain full-sequence pass; generation uses `forward_cached`."""

    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        self.config = cfg
        self.model = Phi3VModel(cfg)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.kv_dtype: torch.dtype | None = None  # the KV cache's dtype when not the compute dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype. (The token embedding may be stored narrower: see `weights.load_model`.)"""
        return self.model.norm.weight.dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype generation keeps keys and values in: `kv_dtype`, else the compute dtype."""
        return self.kv_dtype or self.dtype

    def encode_images(self, pixel_values: Tensor, image_sizes: Tensor) -> Tensor:
        """Projected image tokens of all images, in image order: (sum of T_img, hidden) (spec §4)."""
        crop = self.config.vision.image_size
        n_slots = pixel_values.shape[1]
        for h, w in image_sizes.tolist():
            if h % crop or w % crop or h <= 0 or w <= 0 or (h // crop) * (w // crop) + 1 > n_slots:
                raise Phi3VError(
                    f"image_sizes entry ({h}, {w}) does not fit pixel_values with {n_slots} crops of {crop} px; "
                    "pass the image_sizes returned by the processor together with its pixel_values"
                )
        return self.model.vision_embed_tokens(pixel_values.to(self.device), image_sizes)

    def embed(self, input_ids: Tensor, image_features: Tensor | None = None) -> Tensor:
        """Token embeddings with image rows written at the placeholders, row-major over (B, T) (spec §3.7, §4.5)."""
        vocab = self.config.text.vocab_size
        if input_ids.numel() and int(input_ids.max()) >= vocab:
            raise Phi3VError(f"input_ids contain id {int(input_ids.max())} >= vocab size {vocab}; check the tokenizer")
        is_image = input_ids < 0
        x = self.model.embed_tokens(input_ids.clamp_min(0)).to(self.dtype)  # placeholders are never looked up
        n_slots, n_rows = int(is_image.sum()), 0 if image_features is None else image_features.shape[0]
        if n_slots != n_rows:
            raise Phi3VError(
                f"the prompt has {n_slots} image placeholder tokens but the images give {n_rows} image tokens; "
                "build input_ids and pixel_values with the same processor call and num_crops"
            )
        if n_rows:
            x = x.index_put((is_image,), image_features.to(x.dtype))
        return x

    def logits(self, h: Tensor) -> Tensor:
        """Final norm, lm_head, float32 (spec §3.1)."""
        return self.lm_head(self.model.norm(h)).float()

    def decode_layers(self, x: Tensor, attn: AttentionInputs) -> Tensor:
        for layer in self.model.layers:
            x = layer(x, attn)
        return x

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        image_sizes: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Full pass without a cache: (B, T) ids (left padding allowed via attention_mask) -> (B, T, vocab)."""
        input_ids = input_ids.to(self.device)
        feats = None if pixel_values is None else self.encode_images(pixel_values, image_sizes)
        x = self.embed(input_ids, feats)
        B, T = input_ids.shape
        idx = torch.arange(T, device=self.device)
        if attention_mask is None or bool(attention_mask.all()):
            positions, mask = idx.expand(B, T), None
        else:  # spec §3.8: positions = cumsum(mask) - 1, padded slots get 1
            valid = attention_mask.to(self.device).bool()
            positions = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
            # causal over the padded layout; a padding query sees itself so that no softmax row is empty
            mask = (idx[None, :] <= idx[:, None]) & (valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=self.device))
            mask = mask[:, None]  # (B, 1, T, T)
        cos, sin = cos_sin(self.config.text, positions, x.dtype, positions.amax(dim=1) + 1)
        return self.logits(self.decode_layers(x, AttentionInputs(cos, sin, mask, positions)))

    def forward_cached(
        self, x: Tensor, positions: Tensor, cache: KVCache, rows: slice, kv_len: int, lengths: Tensor | None = None
    ) -> Tensor:
        """Pass over new tokens of cache rows `rows`: x (B, T, hidden) embeddings at `positions` (B, T).

        Each row's tokens are stored at their positions and attend to entries 0..position of their own row.
        `lengths` (B,), for right-padded prefills, gives each row's real token count: the LongRoPE factor
        list follows it and the logits are taken at its last real token. Returns float32 (B, vocab).
        """
        B, T, _ = x.shape
        if B == 1 and T == kv_len:  # a whole row from position 0: plain causal attention
            mask = None
        else:
            mask = torch.arange(kv_len, device=x.device)[None, None, :] <= positions[:, :, None]  # (B, T, S)
            mask = mask[:, None]
        seq_lens = lengths if lengths is not None else positions.amax(dim=1) + 1
        cos, sin = cos_sin(self.config.text, positions, x.dtype, seq_lens)
        kv_lens = positions[:, 0] + 1 if T == 1 else None  # a decoding step: row b attends to keys 0..position
        h = self.decode_layers(x, AttentionInputs(cos, sin, mask, positions, cache, rows, kv_len, kv_lens))
        last = (lengths - 1) if lengths is not None else torch.full((B,), T - 1, device=x.device)
        return self.logits(h[torch.arange(B, device=x.device), last])
