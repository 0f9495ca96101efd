"""Huge-page memory for the quantized weights (src/phi3v/hugepages.py)."""

import platform

import pytest
import torch

from phi3v import hugepages
from phi3v.hugepages import HugePages

from .conftest import huge_page_advised

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not hugepages.AVAILABLE,
                                reason="Linux's madvise(MADV_HUGEPAGE) and /proc/self/smaps")  # fmt: skip


def test_huge_pages_hold_exact_copies(monkeypatch):
    """Pieces of one mapping, page-aligned, each an exact copy; a tensor bigger than a chunk gets its own."""
    monkeypatch.setattr(HugePages, "CHUNK", 4 << 20)
    arena = HugePages()
    ts = [torch.randn(300, 7), torch.arange(10, dtype=torch.int8), torch.randn(5, 5).bfloat16()]
    copies = [arena.copy(t) for t in ts]
    for t, c in zip(ts, copies):
        assert torch.equal(t, c) and c.dtype == t.dtype and c.data_ptr() != t.data_ptr()
        assert c.data_ptr() % 4096 == 0
    assert copies[1].data_ptr() - copies[0].data_ptr() == 3 * 4096  # 8400 bytes, rounded up to pages
    big = torch.ones(HugePages.CHUNK + hugepages.HUGE_PAGE + 1, dtype=torch.int8)  # past any chunk's slack
    copy = arena.copy(big)
    assert torch.equal(copy, big) and copy.data_ptr() % hugepages.HUGE_PAGE == 0  # a new mapping, aligned
    empty = torch.empty(0, 3)
    assert arena.copy(empty).shape == (0, 3)
    assert all(huge_page_advised(c) for c in copies)
