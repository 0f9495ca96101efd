"""Decoder parity with transformers' native Phi3ForCausalLM on the same random weights (spec §3)."""

import pytest
import torch

from phi3v.checkpoint import random_model
from phi3v.kv_cache import KVCache
from phi3v.rope import cos_sin, inv_freq

from .conftest import crossing_config

transformers = pytest.importorskip("transformers")
from .hf_reference import phi3_config  # noqa: E402

ATOL = 1e-4


def hf_twin(model):
    """transformers' Phi3ForCausalLM with our text weights (same key names: no renaming)."""
    cfg = phi3_config(model.config.text)
    hf = transformers.Phi3ForCausalLM(cfg).eval()
    text_state = {k: v for k, v in model.state_dict().items() if "vision_embed_tokens" not in k}
    hf.load_state_dict(text_state, strict=True)
    return hf


@pytest.fixture(scope="module")
def pair():
    model = random_model(crossing_config(32), seed=1)
    return model, hf_twin(model)


@pytest.mark.parametrize("length", [5, 32, 33, 50])  # 33 and 50 cross original_max_position_embeddings=32
def test_full_forward_matches_transformers(pair, length):
    """Logits of a full pass, short and long factor lists (spec §3.5: long iff max(pos)+1 > orig)."""
    model, hf = pair
    ids = torch.randint(0, 32000, (2, length), generator=torch.Generator().manual_seed(length))
    ours = model(ids)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= ATOL


def test_left_padded_batch_matches_transformers(pair):
    """Left padding with positions cumsum(mask)-1 (spec §3.8, pitfall 9): real tokens match HF and running alone."""
    model, hf = pair
    ids = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    ours = model(ids, attention_mask=mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits.float()
    assert (ours[mask.bool()] - ref[mask.bool()]).abs().max().item() <= ATOL
    alone = model(ids[1:, 5:])
    assert (ours[1, 5:] - alone[0]).abs().max().item() <= ATOL


def test_cached_decode_matches_full_recompute(pair):
    """Prefill then one-token steps through the KV cache equal full passes, in two independent rows."""
    model, _ = pair
    t = model.config.text
    seqs = torch.randint(0, 32000, (2, 30), generator=torch.Generator().manual_seed(3))
    cache = KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, torch.float32, torch.device("cpu"))
    cache.reserve(2, 32)
    lens = [10, 16]  # rows of different lengths share each decode step
    for row, n in enumerate(lens):
        x = model.embed(seqs[row : row + 1, :n])
        model.forward_cached(x, torch.arange(n)[None], cache, slice(row, row + 1), n)
    for _ in range(8):
        pos = torch.tensor(lens)[:, None]
        x = model.embed(seqs[torch.arange(2)[:, None], pos])
        step = model.forward_cached(x, pos, cache, slice(0, 2), max(lens) + 1)
        for row in range(2):
            full = model(seqs[row : row + 1, : lens[row] + 1])[0, -1]
            assert (step[row] - full).abs().max().item() <= ATOL
        lens = [n + 1 for n in lens]


def test_cache_writes_of_a_prefill_and_of_single_positions_agree():
    """A prefill (T tokens at positions 0..T-1: a plain copy) and the same keys written one position at a
    time (indexed) leave the same cache, and hand back the same first kv_len entries."""
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 3, 6, 8, generator=g), torch.randn(2, 3, 6, 8, generator=g)
    whole, steps = (KVCache(2, 3, 8, torch.bfloat16, torch.device("cpu")) for _ in range(2))
    for c in (whole, steps):
        c.reserve(3, 10)
    got = whole.write(1, slice(1, 3), torch.arange(6)[None].expand(2, 6), k, v, 6)
    for t in range(6):
        want = steps.write(1, slice(1, 3), torch.full((2, 1), t), k[:, :, t : t + 1], v[:, :, t : t + 1], t + 1)
    assert torch.equal(whole.k, steps.k) and torch.equal(whole.v, steps.v)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(got[0], k.bfloat16()) and not whole.k[:, 0].any() and not whole.k[0].any()


def test_rope_reference_numbers():
    """Spec §9: inv_freq with factor 1 is 10000^(-2i/96); scale sqrt(17/12) for the official lengths."""
    from phi3v.checkpoint import preset

    t = preset("full").text
    f = inv_freq(t, None)
    assert f[0].item() == 1.0
    assert abs(f[1].item() - 0.825404) < 1e-6
    assert abs(f[47].item() - 1.2115e-4) < 1e-8
    assert abs(t.rope_scale - 1.1902380714238083) < 1e-12
    cos, _ = cos_sin(t, torch.tensor([[0]]), torch.float32, torch.tensor([1]))
    assert torch.allclose(cos, torch.full_like(cos, 1.1902380714238083))  # the scale applies at position 0 too


def test_factor_list_chosen_per_row():
    """A batch row uses long factors only if its own length exceeds orig (spec §3.5)."""
    t = crossing_config(32).text
    pos = torch.stack([torch.arange(40), torch.arange(40)])  # row 1 is a length-32 row right-padded to 40
    cos, _ = cos_sin(t, pos, torch.float32, torch.tensor([40, 32]))
    long_only, _ = cos_sin(t, torch.arange(40)[None], torch.float32, torch.tensor([40]))
    short_only, _ = cos_sin(t, torch.arange(32)[None], torch.float32, torch.tensor([32]))
    assert torch.equal(cos[0], long_only[0])
    assert torch.equal(cos[1, :, :32], short_only[0])


def test_cache_grows_only_where_short():
    cache = KVCache(1, 2, 4, torch.float32, torch.device("cpu"))
    cache.reserve(1, 100)
    for rows in range(2, 40):
        cache.reserve(rows, 100)
    assert cache.capacity == 100 and 39 <= cache.rows < 60
    cache.k[0, 0, 0, 5] = 7.0
    cache.reserve(1, 101)
    assert cache.capacity >= 150 and cache.k[0, 0, 0, 5, 0] == 7.0  # contents kept


@pytest.mark.parametrize("rows", [1, 5, 256, 300])
def test_linear_fast_path_matches_f_linear(rows):
    """The few-rows CPU route of Linear computes the same product as F.linear (float32)."""
    from phi3v.language import Linear

    lin = Linear(48, 80, bias=True)
    x = torch.randn(rows, 1, 48)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    out = lin(x)
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-5
