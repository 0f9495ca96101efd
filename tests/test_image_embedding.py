"""HD feature transform and merge order on hand-built feature maps (spec §4.3-4.5)."""

import pytest
import torch

from phi3v.checkpoint import random_model
from phi3v.errors import Phi3VError
from phi3v.image_embedding import hd_feature_transform, merge_2x2


def coded_features(n_crops: int) -> torch.Tensor:
    """(n, 576, 3) whose channels encode (crop, patch row, patch col)."""
    r, c = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    f = torch.stack([torch.zeros(24, 24), r.float(), c.float()], dim=-1).reshape(576, 3)
    f = f.expand(n_crops, 576, 3).clone()
    f[:, :, 0] = torch.arange(n_crops).float()[:, None]
    return f


def test_merge_2x2_channel_order():
    """M[i, j] = concat(G[2i,2j], G[2i,2j+1], G[2i+1,2j], G[2i+1,2j+1]) (spec §4.3 step 1)."""
    m = merge_2x2(coded_features(1))
    assert m.shape == (1, 12, 12, 12)
    i, j = 5, 7
    blocks = m[0, i, j].view(4, 3)
    assert blocks[:, 1:].tolist() == [[2 * i, 2 * j], [2 * i, 2 * j + 1], [2 * i + 1, 2 * j], [2 * i + 1, 2 * j + 1]]


@pytest.mark.parametrize("h_c,w_c", [(3, 4), (4, 3), (1, 2), (2, 1)])
def test_hd_transform_layout(h_c, w_c):
    """Tiles row-major into a (12h_c, 12w_c) grid, sub_GN closing each row, then glb_GN, then the global view."""
    n = 1 + h_c * w_c
    merged = merge_2x2(coded_features(n))  # (n, 12, 12, 12)
    sub, glb = torch.full((1, 1, 1, 12), -1.0), torch.full((1, 1, 12), -2.0)
    seq = hd_feature_transform(merged, h_c, w_c, sub, glb)
    width = 12 * w_c + 1
    assert seq.shape[0] == 144 * (h_c * w_c + 1) + 12 * (h_c + 1) + 1  # T_img formula, spec §9
    sub_rows = 12 * h_c * width
    grid = seq[:sub_rows].view(12 * h_c, width, 12)
    assert (grid[:, -1] == -1).all()  # separator column on every grid row
    for gr in range(12 * h_c):
        for gc in range(12 * w_c):
            a, b = gr // 12, gc // 12
            tok = grid[gr, gc].view(4, 3)[0]  # top-left block: (crop, patch row, patch col)
            assert tok.tolist() == [1 + a * w_c + b, 2 * (gr % 12), 2 * (gc % 12)]
    assert (seq[sub_rows] == -2).all()  # glb_GN
    glob = seq[sub_rows + 1 :].view(12, 13, 12)
    assert (glob[:, -1] == -1).all()  # the global view's rows end with sub_GN too, not glb_GN
    assert (glob[:, :12].reshape(-1, 4, 3)[:, 0, 0] == 0).all()


def test_image_tokens_written_in_order_at_placeholders():
    """Projected rows fill the negative-id positions row-major, in image order (spec §4.5)."""
    model = random_model("tiny", seed=0)
    feats = torch.arange(5 * 64, dtype=torch.float32).view(5, 64)
    ids = torch.tensor([[1, -1, -1, 5, 6], [-2, -2, -2, 7, 8]])
    x = model.embed(ids, feats)
    assert torch.equal(x[0, 1], feats[0]) and torch.equal(x[0, 2], feats[1])
    assert torch.equal(x[1, :3], feats[2:5])
    assert torch.equal(x[0, 3], model.model.embed_tokens.weight[5])
    with pytest.raises(Phi3VError, match="placeholder"):
        model.embed(ids, feats[:4])


def test_encode_images_token_count_and_padded_crops_ignored():
    """T_img rows per image; zero-padded crop slots do not change the result (spec §5.5)."""
    model = random_model("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    pv = torch.randn(2, 5, 3, 336, 336, generator=g)
    sizes = torch.tensor([[336, 672], [672, 672]])
    out = model.encode_images(pv, sizes)
    assert out.shape == (457 + 757, 64)
    pv2 = pv.clone()
    pv2[0, 3:] = 7.0  # slots past 1 + 1*2 crops of image 0
    assert torch.equal(model.encode_images(pv2, sizes), out)
    alone = model.encode_images(pv[1:], sizes[1:])
    assert (out[457:] - alone).abs().max() <= 1e-5
    with pytest.raises(Phi3VError, match="image_sizes"):
        model.encode_images(pv, torch.tensor([[1344, 1344], [672, 672]]))
