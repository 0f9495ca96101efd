"""Where images come from: local paths, `-` (standard input), http(s) URLs, data: URIs and file:// URLs.

Every source ends as a path, PIL image or bytes that `image_processor.load_image` decodes. Remote
fetches have a timeout and a size cap, and a failure is a one-line `Phi3VError`.
"""

from __future__ import annotations

import base64
import binascii
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from phi3v.errors import Phi3VError, TooLarge

MAX_IMAGE_BYTES = 20 * 1024 * 1024
FETCH_TIMEOUT = 15.0


def fetch_url(url: str, timeout: float = FETCH_TIMEOUT, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """GET an http(s) URL, refusing bodies over `max_bytes`."""
    req = urllib.request.Request(url, headers={"User-Agent": "phi3v"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - scheme checked by the caller
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise TooLarge(f"{url} is {int(declared)} bytes, over the {max_bytes}-byte image limit")
            data = resp.read(max_bytes + 1)
    except Phi3VError:
        raise
    except urllib.error.HTTPError as e:
        raise Phi3VError(f"could not fetch {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise Phi3VError(f"could not fetch {url}: {reason}; check the URL and your network") from None
    if len(data) > max_bytes:
        raise TooLarge(f"{url} is over the {max_bytes}-byte image limit")
    return data


def decode_data_uri(uri: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a `data:image/...;base64,...` URI."""
    head, sep, payload = uri.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise Phi3VError("a data URI image must look like data:image/png;base64,<base64 data>")
    if len(payload) * 3 // 4 > max_bytes:
        raise TooLarge(f"the data URI image is over the {max_bytes}-byte limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Phi3VError("the data URI image is not valid base64") from None


def resolve_image(src: Any, *, allow_remote: bool = True, allowed_dir: Path | None = None,
                  allow_local: bool = True, max_bytes: int = MAX_IMAGE_BYTES) -> Any:  # fmt: skip
    """Turn a user-given image reference into something `load_image` reads; non-strings pass through."""
    if not isinstance(src, str):
        return src
    if src == "-":
        data = sys.stdin.buffer.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise TooLarge(f"the image on standard input is over the {max_bytes}-byte limit")
        return data
    if src.startswith("data:"):
        return decode_data_uri(src, max_bytes)
    scheme = urlparse(src).scheme.lower()
    if scheme in ("http", "https"):
        if not allow_remote:
            raise Phi3VError(f"remote images are not allowed here: {src}")
        return fetch_url(src, max_bytes=max_bytes)
    if scheme == "file":
        path = Path(unquote(urlparse(src).path))
    elif len(scheme) > 1:  # (one letter is a Windows drive)
        raise Phi3VError(f"unsupported image URL scheme {scheme!r} in {src}; use a path, http(s)://, data: or file://")
    else:
        path = Path(src).expanduser()
    if not allow_local and allowed_dir is None:
        raise Phi3VError("local image files are not allowed here")
    if allowed_dir is not None:
        real, root = path.resolve(), allowed_dir.resolve()
        if not real.is_relative_to(root):
            raise Phi3VError(f"{src} is outside the allowed image folder")
        return real
    return path
