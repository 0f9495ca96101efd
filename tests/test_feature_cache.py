"""The image-feature cache: hits skip the vision path, eviction is LRU by bytes, results are unchanged."""

import torch
from PIL import Image

import phi3v
from phi3v.feature_cache import FeatureCache, image_key


def test_lru_eviction_by_bytes():
    cache = FeatureCache(max_bytes=3 * 400)  # room for three 100-float tensors
    for k in "abc":
        cache.put(k, torch.zeros(100))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(100))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.bytes == 1200
    cache.put("huge", torch.zeros(1000))  # larger than the whole cache: not stored
    assert cache.get("huge") is None and cache.bytes == 1200


def test_keys_follow_pixels_and_num_crops():
    a, b = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (40, 30), "red")
    assert image_key(a, 4) == image_key(b, 4) != image_key(a, 16)
    b.putpixel((0, 0), (254, 0, 0))
    assert image_key(a, 4) != image_key(b, 4)


def test_second_question_skips_vision_and_gives_same_tokens(tiny_checkpoint, monkeypatch):
    cached = phi3v.load(tiny_checkpoint, device="cpu", dtype="float32")
    uncached = phi3v.load(tiny_checkpoint, device="cpu", dtype="float32", feature_cache_bytes=0)
    calls = []
    encode = cached.model.encode_images
    monkeypatch.setattr(cached.model, "encode_images", lambda *a: calls.append(a[0].shape[0]) or encode(*a))
    img = Image.new("RGB", (500, 300), "orange")
    other = Image.new("RGB", (300, 500), "navy")
    first = cached.chat("What colour?", images=[img], max_new_tokens=8)
    again = cached.chat("And the shape?", images=[img.copy()], max_new_tokens=8)
    mixed = cached.chat("Compare.", images=[img, other], max_new_tokens=8)
    assert calls == [1, 1]  # the second question encoded nothing; the third only the new image
    assert cached.cache.hits == 2
    assert first == uncached.chat("What colour?", images=[img], max_new_tokens=8)
    assert again == uncached.chat("And the shape?", images=[img], max_new_tokens=8)
    assert mixed == uncached.chat("Compare.", images=[img, other], max_new_tokens=8)
    assert cached.chat("What colour?", images=[img], max_new_tokens=8, num_crops=2) is not None
    assert calls == [1, 1, 1]  # another num_crops is another key
