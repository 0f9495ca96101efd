"""From CLIP crop features to image tokens: the HD transform and the projector (spec §4.3-4.4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from phi3v.config import Phi3VConfig
from phi3v.linear import Linear
from phi3v.vision import CLIPVisionModel


def merge_2x2(f: Tensor) -> Tensor:
    """Space-to-depth: (N, 24*24, C) -> (N, 12, 12, 4C), channel blocks TL, TR, BL, BR (spec §4.3 step 1)."""
    n, t, c = f.shape
    g = int(t**0.5)  # 24
    f = f.view(n, g // 2, 2, g // 2, 2, c)  # (N, 12, 2, 12, 2, C): row pair, column pair
    return f.permute(0, 1, 3, 2, 4, 5).reshape(n, g // 2, g // 2, 4 * c)  # (N, 12, 12, 4C)


def add_row_separator(grid: Tensor, sep: Tensor) -> Tensor:
    """(R, W, C) -> (R * (W+1), C): `sep` appended as a last column on every row, then flattened."""
    r, _, c = grid.shape
    return torch.cat([grid, sep.reshape(1, 1, c).expand(r, 1, c)], dim=1).reshape(-1, c)


def hd_feature_transform(merged: Tensor, h_c: int, w_c: int, sub_gn: Tensor, glb_gn: Tensor) -> Tensor:
    """One image's merged crops (1 + h_c*w_c, 12, 12, 4C) -> (T_img, 4C) in `sub_glb` order (spec §4.3).

    Tiles are laid out row-major into a (12h_c, 12w_c) grid, each grid row closed by sub_GN; then glb_GN;
    then the global view, whose rows are also closed by sub_GN.
    """
    _, m, _, c = merged.shape  # m = 12
    tiles = merged[1:].view(h_c, w_c, m, m, c).permute(0, 2, 1, 3, 4).reshape(h_c * m, w_c * m, c)
    return torch.cat([add_row_separator(tiles, sub_gn), glb_gn.reshape(1, c), add_row_separator(merged[0], sub_gn)])


class ImageEmbedding(nn.Module):
    """`model.vision_embed_tokens`: CLIP tower, learnable separators and the 2-layer MLP projector."""

    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        c4 = 4 * cfg.vision.hidden_size
        self.crop = cfg.vision.image_size
        self.img_processor = CLIPVisionModel(cfg.vision)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, c4))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, c4))
        # Sequential so that the keys are img_projection.0 / .2 (index 1 is the parameter-free GELU).
        self.img_projection = nn.Sequential(
            Linear(c4, cfg.text.hidden_size), nn.GELU(), Linear(cfg.text.hidden_size, cfg.text.hidden_size)
        )

    def forward(self, pixel_values: Tensor, image_sizes: Tensor) -> Tensor:
        """pixel_values (N, num_crops+1, 3, 336, 336), image_sizes (N, 2) -> (sum of T_img, hidden).

        Only real crops go through CLIP, all images' crops in one batch; padded slots are skipped (spec §5.5).
        """
        return self.encode(pixel_values, image_sizes)[0]

    def encode(self, pixel_values: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        """`forward`'s image tokens, and the CLIP patch features they came from: (sum of crops, P, C) for the
        P patches of each real crop, in `real_crops` order (training reads them; spec §4.2)."""
        patches = self.img_processor(self.real_crops(pixel_values, image_sizes))
        return self.project(patches, image_sizes), patches

    def crop_grids(self, image_sizes: Tensor) -> list[tuple[int, int]]:
        """Each image's tile grid (rows, columns); its real crops are the global view and these tiles."""
        return [(int(h) // self.crop, int(w) // self.crop) for h, w in image_sizes.tolist()]

    def real_crops(self, pixel_values: Tensor, image_sizes: Tensor) -> Tensor:
        """All images' real crops, global view first and then the tiles row-major, image after image."""
        grids = self.crop_grids(image_sizes)
        return torch.cat([pixel_values[i, : 1 + h * w] for i, (h, w) in enumerate(grids)])

    def project(self, patches: Tensor, image_sizes: Tensor) -> Tensor:
        """CLIP patch features of every image's real crops (sum(1 + h*w), P, C), in `real_crops` order ->
        image tokens (sum of T_img, hidden): 2x2 merge, HD transform with separators, projector."""
        merged = merge_2x2(patches)  # (sum(1 + h*w), 12, 12, 4C)
        seqs, start = [], 0
        for h, w in self.crop_grids(image_sizes):
            seqs.append(hd_feature_transform(merged[start : start + 1 + h * w], h, w, self.sub_GN, self.glb_GN))
            start += 1 + h * w
        x = torch.cat(seqs)
        return self.img_projection(x.to(self.sub_GN.dtype))
