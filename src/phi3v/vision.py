"""CLIP ViT vision tower in the HF `CLIPVisionModel` layout (spec §4.1-4.2).

Only the layers up to the selected hidden state (layer -2: 23 of 24 for ViT-L/14) are built: the last
layer and `post_layernorm` would be computed and thrown away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi3v import cpu_kernels
from phi3v.config import VisionConfig
from phi3v.linear import Linear


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        """(N, 3, 336, 336) -> (N, 577, C): CLS token first, patches row-major."""
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (N, C, 24, 24)
        x = x.flatten(2).transpose(1, 2)  # (N, 576, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        c = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj = Linear(c, c), Linear(c, c), Linear(c, c)
        self.out_proj = Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        N, T, C = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(N, T, self.n_heads, self.head_dim).transpose(1, 2)  # (N, H, T, D)

        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(y.transpose(1, 2).reshape(N, T, C))  # bidirectional: no mask


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        if (kernels := cpu_kernels.fused(x)) is not None:
            return self.fc2(cpu_kernels.run(kernels.quick_gelu_, x))  # in place: x is fc1's fresh output
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers_to_run))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint's spelling
        self.encoder = CLIPEncoder(cfg)

    def forward(self, pixels: Tensor) -> Tensor:
        """(N, 3, 336, 336) crops -> (N, 576, C) patch features of the selected layer, CLS dropped."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return x[:, 1:]


class CLIPVisionModel(nn.Module):
    """Wrapper that gives the `img_processor.vision_model.*` key prefix."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.vision_model(pixels)
