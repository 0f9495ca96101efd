"""Checkpoint layout and loading (spec §2)."""

import json
import mmap
import os
import platform

import pytest
import torch
from safetensors.torch import load_file, save_file

from phi3v.checkpoint import checkpoint_shapes, preset, random_model
from phi3v.errors import Phi3VError
from phi3v import hugepages, linear, weights
from phi3v.linear import Int4Linear, Int8Linear
from phi3v.weights import INDEX_FILE, load_model, resolve_checkpoint

from .conftest import huge_page_advised, resident_bytes


def test_full_checkpoint_has_exactly_the_official_keys_and_size(official_dir):
    """592 tensors, same names, 8,293,242,880 bytes of bf16 (spec §2)."""
    index = json.loads((official_dir / INDEX_FILE).read_text())
    shapes = checkpoint_shapes(preset("full"))
    assert set(shapes) == set(index["weight_map"])
    assert sum(s.numel() for s in shapes.values()) * 2 == index["metadata"]["total_size"]
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (9216, 3072)
    assert shapes["model.vision_embed_tokens.sub_GN"] == (1, 1, 1, 4096)
    assert shapes["model.vision_embed_tokens.img_processor.vision_model.embeddings.position_embedding.weight"] == (577, 1024)


def test_tiny_checkpoint_layout(tiny_checkpoint):
    files = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
            "tokenizer_config.json", INDEX_FILE} <= files  # fmt: skip
    index = json.loads((tiny_checkpoint / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and shards <= files
    assert any("encoder.layers.2." in k for k in index["weight_map"])  # the unused last CLIP layer is stored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_equals_written_weights(tiny_checkpoint, dtype):
    """Loaded tensors are the stored ones, converted to the requested dtype; in a float32 load the token
    embedding keeps the file's bf16 (only looked-up rows are widened) and the model still computes in float32."""
    model = load_model(tiny_checkpoint, dtype=dtype)
    ref = random_model("tiny", seed=0, dtype=torch.bfloat16)  # write_checkpoint's default seed and dtype
    got = model.state_dict()
    assert set(got) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        want = torch.bfloat16 if k == "model.embed_tokens.weight" else dtype
        assert got[k].dtype == want and torch.equal(got[k], v.to(want)), k
    ids = torch.tensor([[1, 5, 7]])
    assert model.dtype == dtype and model.embed(ids).dtype == dtype
    assert torch.equal(model.embed(ids), ref.model.embed_tokens(ids).to(dtype))


def file_mapped_bytes(model, folder) -> dict[str, int]:
    """Parameter name -> bytes, for the parameters whose data lies in a memory map of a file in `folder`."""
    spans = []
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip().startswith(str(folder)):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((lo, hi))
    return {name: p.nbytes for name, p in model.state_dict().items()
            if any(lo <= p.data_ptr() < hi for lo, hi in spans)}  # fmt: skip


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_only_big_tensors_stay_in_the_file_map(monkeypatch, tiny_checkpoint):
    """Right-dtype tensors of MAPPED_FROM_BYTES and up are used from the map, smaller ones are copied (a
    mapped page brings the page cache's whole folio into the resident set)."""
    assert not file_mapped_bytes(load_model(tiny_checkpoint, dtype=torch.bfloat16), tiny_checkpoint)  # all < 4 MiB
    monkeypatch.setattr(weights, "MAPPED_FROM_BYTES", 0)
    all_mapped = file_mapped_bytes(load_model(tiny_checkpoint, dtype=torch.bfloat16), tiny_checkpoint)
    assert "model.embed_tokens.weight" in all_mapped and "model.norm.weight" in all_mapped
    cut = sorted(all_mapped.values())[len(all_mapped) // 2]
    monkeypatch.setattr(weights, "MAPPED_FROM_BYTES", cut)
    some = file_mapped_bytes(load_model(tiny_checkpoint, dtype=torch.bfloat16), tiny_checkpoint)
    assert some and set(some) == {k for k, n in all_mapped.items() if n >= cut}


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/smaps")
def test_streamed_weights_get_huge_pages(monkeypatch, tiny_checkpoint):
    """Views kept in the file map are advised for huge pages, the token embedding (read a row at a time)
    is not; int8 weights and blocked int4 ones are copied into huge-page memory (HugePages)."""
    monkeypatch.setattr(weights, "MAPPED_FROM_BYTES", 0)
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert huge_page_advised(model.model.layers[0].mlp.down_proj.weight)
    assert not huge_page_advised(model.model.embed_tokens.weight)
    # Which tensors were copied is judged by the HugePages mappings' own address ranges, not by "hg": in
    # one full run on the AVX2 EPYC a tensor PyTorch allocated itself sat in an "hg" mapping (cause not found).
    arenas = []
    make_arena = hugepages._mapping

    def recorded(nbytes):
        mm, offset = make_arena(nbytes)
        start = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
        arenas.append((start, start + len(mm)))
        return mm, offset

    monkeypatch.setattr(hugepages, "_mapping", recorded)
    model = load_model(tiny_checkpoint, quantize="int4")

    def in_arena(t):
        return any(lo <= t.data_ptr() < hi for lo, hi in arenas)

    int4 = [m for m in model.model.layers.modules() if isinstance(m, Int4Linear)]
    for m in int4:  # those phi3v's 64-row kernel runs (blocked scales), where it can run
        assert in_arena(m.qweight) == in_arena(m.scales_and_zeros) == m.blocked
        if m.blocked:
            assert huge_page_advised(m.qweight) and huge_page_advised(m.scales_and_zeros)
    if linear._runs_blocked(64, 32):
        assert any(m.blocked for m in int4)
    assert isinstance(model.lm_head, Int8Linear) and huge_page_advised(model.lm_head.qweight)
    assert in_arena(model.lm_head.qweight)
    ref = load_model(tiny_checkpoint, quantize="int8")
    for m in ref.model.layers[0].modules():
        if isinstance(m, Int8Linear):
            assert huge_page_advised(m.qweight) and in_arena(m.qweight)


def kernel_at_least(major: int, minor: int) -> bool:
    release = platform.release().split(".")
    return platform.system() == "Linux" and tuple(int(x) for x in release[:2]) >= (major, minor)


@pytest.mark.skipif(not kernel_at_least(5, 14), reason="MADV_POPULATE_READ needs Linux 5.14")
def test_populate_maps_the_bytes_in(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(1 << 20))
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable, for frombuffer; never written
    address = torch.frombuffer(mm, dtype=torch.uint8).data_ptr()  # reads nothing
    before = resident_bytes(address)
    weights.populate(mm, 0, 1 << 20)
    assert before < (1 << 20) <= resident_bytes(address)


def test_streamed_weights_are_read_in_while_loading(monkeypatch, tiny_checkpoint):
    """Every view kept in the file map but the token embedding (read by rows) is populated at load, so a
    first prompt does not wait on its disk reads."""
    monkeypatch.setattr(weights, "MAPPED_FROM_BYTES", 0)
    spans = []
    monkeypatch.setattr(weights, "populate", lambda mm, start, length: spans.append(length))
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    kept = [t for t in model.state_dict().values() if t.nbytes]
    emb = model.model.embed_tokens.weight
    assert len(spans) == len(kept) - 1
    assert sum(spans) >= sum(t.nbytes for t in kept) - emb.nbytes


def test_single_file_and_alias(tmp_path, tiny_checkpoint):
    """One model.safetensors works; `vision_embed_tokens.wte` is read as embed_tokens (spec §2.2)."""
    state = {}
    for shard in set(json.loads((tiny_checkpoint / INDEX_FILE).read_text())["weight_map"].values()):
        state.update(load_file(tiny_checkpoint / shard))
    emb = state.pop("model.embed_tokens.weight")
    state["model.vision_embed_tokens.wte.weight"] = emb
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # ignored buffer
    folder = tmp_path / "single"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    save_file(state, folder / "model.safetensors")
    model = load_model(folder, dtype=torch.bfloat16)
    assert torch.equal(model.model.embed_tokens.weight, emb)


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_checkpoint):
    state = {}
    for shard in set(json.loads((tiny_checkpoint / INDEX_FILE).read_text())["weight_map"].values()):
        state.update(load_file(tiny_checkpoint / shard))
    del state["lm_head.weight"]
    state["model.extra.weight"] = torch.zeros(2)
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    save_file(state, folder / "model.safetensors")
    with pytest.raises(Phi3VError, match=r"missing keys \[lm_head.weight\], unexpected keys \[model.extra.weight\]"):
        load_model(folder)


def test_wrong_shape_and_missing_shard(tmp_path, tiny_checkpoint):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Phi3VError, match="shape"):
        load_model(folder)
    next(folder.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(Phi3VError, match="missing; the download is incomplete"):
        load_model(folder)


def test_resolve_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Phi3VError, match="not in the local Hugging Face cache"):
        resolve_checkpoint("microsoft/Phi-3.5-vision-instruct")
    with pytest.raises(Phi3VError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope" / "deeper" / "x"))
    with pytest.raises(Phi3VError, match="config.json"):
        load_model(tmp_path)


def test_hub_id_resolves_from_local_cache(tmp_path, monkeypatch, tiny_checkpoint):
    """A hub id found in the HF cache layout (models--org--name/snapshots/REV) loads without network."""
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--microsoft--Phi-3.5-vision-instruct"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    assert resolve_checkpoint("microsoft/Phi-3.5-vision-instruct") == repo / "snapshots" / "abc123"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_load(tiny_checkpoint, mode):
    """Decoder linears get `mode`, lm_head and the vision side int8; the rest is as stored. The logits stay
    close to the unquantized model's on the same input (issue 5)."""
    from phi3v.linear import Int4Linear, Int8Linear

    ref = load_model(tiny_checkpoint, dtype=torch.float32)
    model = load_model(tiny_checkpoint, dtype=torch.float32, quantize=mode)
    decoder_type = Int8Linear if mode == "int8" else Int4Linear
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, decoder_type)
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, decoder_type)
    assert isinstance(model.lm_head, Int8Linear)
    clip_layer = model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[0]
    assert isinstance(clip_layer.self_attn.q_proj, Int8Linear)
    assert torch.equal(clip_layer.self_attn.q_proj.bias, ref.model.vision_embed_tokens.img_processor.vision_model
                       .encoder.layers[0].self_attn.q_proj.bias)  # fmt: skip
    assert isinstance(model.model.vision_embed_tokens.img_projection[2], Int8Linear)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    want, got = ref(ids), model(ids)
    err = ((got - want).norm() / want.norm()).item()
    assert err < (0.03 if mode == "int8" else 0.2), err  # a layout or scale bug gives ~1


def test_quantize_vision_off_keeps_dense_vision(tiny_checkpoint):
    from phi3v.linear import Int8Linear, Linear

    model = load_model(tiny_checkpoint, dtype=torch.float32, quantize="int8", quantize_vision=False)
    assert type(model.model.vision_embed_tokens.img_projection[0]) is Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)


def test_quantize_errors(tiny_checkpoint):
    with pytest.raises(Phi3VError, match="unknown quantization 'int2'"):
        load_model(tiny_checkpoint, quantize="int2")
    with pytest.raises(Phi3VError, match="group size 128 does not divide in_features 64"):
        load_model(tiny_checkpoint, quantize="int4", group_size=128)


def test_freed_memory_goes_back_to_the_os_while_quantizing_unless_the_user_tuned_malloc(monkeypatch, tiny_checkpoint):
    """A quantized CPU load maps blocks of 1 MiB and up on their own while it quantizes, then lets prompts use
    the heap up to 16 MiB (weights.freed_memory_returned); other loads and a user's own setting are left alone."""
    calls = []
    monkeypatch.setattr(weights, "_mallopt", lambda param, value: calls.append((param, value)) or True)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    load_model(tiny_checkpoint, quantize="int8")
    assert calls == [(weights.M_MMAP_THRESHOLD, 1 << 20), (weights.M_MMAP_THRESHOLD, 16 << 20)]
    calls.clear()
    load_model(tiny_checkpoint)
    assert calls == []
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    load_model(tiny_checkpoint, quantize="int4", group_size=32)
    assert calls == []


def test_the_threshold_is_restored_when_a_quantized_load_fails(monkeypatch):
    calls = []
    monkeypatch.setattr(weights, "_mallopt", lambda param, value: calls.append(value) or True)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with pytest.raises(RuntimeError), weights.freed_memory_returned():
        raise RuntimeError("a shard cannot be read")
    assert calls == [1 << 20, 16 << 20]


def test_mallopt_is_real_on_glibc():
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert weights._mallopt(weights.M_MMAP_THRESHOLD, weights.AFTER_QUANTIZING) is True
