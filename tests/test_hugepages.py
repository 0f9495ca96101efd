"""Huge-page memory for what decoding streams (src/phi3v/hugepages.py)."""

import platform

import pytest
import torch

from phi3v import hugepages
from phi3v.hugepages import HugePages
from phi3v.kv_cache import KVCache

from .conftest import huge_page_advised

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not hugepages.AVAILABLE,
                                reason="Linux's madvise(MADV_HUGEPAGE) and /proc/self/smaps")  # fmt: skip


def test_huge_pages_hold_exact_copies():
    """Pieces of one mapping, page-aligned, each an exact copy; a tensor bigger than a chunk gets its own."""
    arena = HugePages()
    ts = [torch.randn(300, 7), torch.arange(10, dtype=torch.int8), torch.randn(5, 5).bfloat16()]
    copies = [arena.copy(t) for t in ts]
    for t, c in zip(ts, copies):
        assert torch.equal(t, c) and c.dtype == t.dtype and c.data_ptr() != t.data_ptr()
        assert c.data_ptr() % 4096 == 0
    assert copies[1].data_ptr() - copies[0].data_ptr() == 3 * 4096  # 8400 bytes, rounded up to pages
    big = torch.zeros(HugePages.CHUNK + 1, dtype=torch.int8)
    assert torch.equal(arena.copy(big), big)
    assert all(huge_page_advised(c) for c in copies)


def test_zeros_are_zeros_in_huge_pages_of_their_own():
    z = hugepages.zeros((3, 1000, 7), torch.bfloat16, torch.device("cpu"))
    assert z.shape == (3, 1000, 7) and z.dtype == torch.bfloat16 and not z.any() and huge_page_advised(z)
    z[1, 2, 3] = 5  # writable
    assert z.sum() == 5
    assert hugepages.zeros((0, 4), torch.float32, torch.device("cpu")).shape == (0, 4)


def test_the_kv_cache_lives_in_huge_pages_and_keeps_its_entries_as_it_grows():
    cache = KVCache(2, 3, 8, torch.bfloat16, torch.device("cpu"))
    cache.reserve(1, 5)
    k = torch.randn(1, 3, 5, 8)
    cache.write(1, slice(0, 1), torch.arange(5)[None], k, -k, 5)
    cache.reserve(2, 40)
    assert huge_page_advised(cache.k) and huge_page_advised(cache.v)
    assert torch.equal(cache.k[1, :1, :, :5], k.bfloat16()) and torch.equal(cache.v[1, :1, :, :5], -k.bfloat16())
    assert not cache.k[:, :, :, 5:].any() and not cache.k[0].any() and not cache.k[:, 1].any()
