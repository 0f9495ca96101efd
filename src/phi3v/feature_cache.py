"""An LRU cache of projected image features, so a second question about the same image skips the image
processor and the vision tower (chat turns, repeated server requests, batch items sharing an image).

Keys are the SHA-256 of the decoded RGB pixels plus `num_crops`; the cache is bounded in bytes and safe to
use from several threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from PIL import Image
from torch import Tensor


def image_key(img: Image.Image, num_crops: int) -> str:
    """Content hash of an RGB image and the crop setting that shapes its features."""
    h = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:{num_crops}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


class FeatureCache:
    """Least-recently-used features, at most `max_bytes` of tensors (0 disables the cache)."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> Tensor | None:
        with self.lock:
            t = self.entries.get(key)
            if t is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return t

    def put(self, key: str, t: Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = t
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
