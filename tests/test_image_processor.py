"""Image processor tests: the spec's reference numbers and an independent re-computation (spec §5, §9)."""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from phi3v.errors import Phi3VError
from phi3v.image_processor import (
    CROP,
    ImageInputs,
    hd_size,
    hd_transform,
    load_image,
    num_image_tokens,
    preprocess,
)

GREY = (128, 128, 128)
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

# Spec §9 table: (W, H, n, resized (W, H), padding before/after on the short side, image_sizes (H, W),
# grid (h_c, w_c), T_img)
TABLE = [
    (336, 336, 16, (1344, 1344), (0, 0), (1344, 1344), (4, 4), 2509),
    (336, 336, 4, (672, 672), (0, 0), (672, 672), (2, 2), 757),
    (1344, 1344, 16, (1344, 1344), (0, 0), (1344, 1344), (4, 4), 2509),
    (1344, 1344, 4, (672, 672), (0, 0), (672, 672), (2, 2), 757),
    (640, 480, 16, (1344, 1008), (0, 0), (1008, 1344), (3, 4), 1921),
    (640, 480, 4, (672, 504), (84, 84), (672, 672), (2, 2), 757),
    (480, 640, 16, (1008, 1344), (0, 0), (1344, 1008), (4, 3), 1933),
    (480, 640, 4, (504, 672), (84, 84), (672, 672), (2, 2), 757),
    (1024, 768, 16, (1344, 1008), (0, 0), (1008, 1344), (3, 4), 1921),
    (1024, 768, 4, (672, 504), (84, 84), (672, 672), (2, 2), 757),
    (1920, 1080, 16, (1680, 945), (31, 32), (1008, 1680), (3, 5), 2353),
    (1920, 1080, 4, (672, 378), (147, 147), (672, 672), (2, 2), 757),
    (1080, 1920, 16, (945, 1680), (31, 32), (1680, 1008), (5, 3), 2377),
    (2000, 1000, 4, (672, 336), (0, 0), (336, 672), (1, 2), 457),
    (1000, 100, 16, (3360, 336), (0, 0), (336, 3360), (1, 10), 1609),
    (1000, 100, 4, (1344, 134), (101, 101), (336, 1344), (1, 4), 745),
    (100, 1000, 4, (134, 1344), (101, 101), (1344, 336), (4, 1), 781),
    (50, 8000, 16, (33, 5376), (151, 152), (5376, 336), (16, 1), 2653),
]


TABLE_IDS = [f"{r[0]}x{r[1]}-n{r[2]}" for r in TABLE]


def _noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB").convert(mode)


def _content_span(mask: np.ndarray) -> tuple[int, int]:
    """(first, count) of the True entries of a 1-D mask, which must be one contiguous run."""
    idx = np.flatnonzero(mask)
    assert idx.size and idx[-1] - idx[0] + 1 == idx.size, "content is not one contiguous run"
    return int(idx[0]), int(idx.size)


@pytest.mark.parametrize("w,h,n,resized,pad,sizes,grid,tokens", TABLE, ids=TABLE_IDS)
def test_reference_table(w, h, n, resized, pad, sizes, grid, tokens):
    """Every row of the spec §9 table: resize target, centred white padding, image_sizes, grid, T_img."""
    hd = hd_transform(Image.new("RGB", (w, h), GREY), n)
    assert (hd.height, hd.width) == sizes
    portrait = w < h
    a = np.asarray(hd)
    if portrait:
        a = a.transpose(1, 0, 2)  # short side on axis 0, as in spec §5.1 before the transpose back
    first, count = _content_span((a != 255).any(axis=(1, 2)))  # grey content rows vs white padding rows
    assert (first, a.shape[0] - first - count) == pad
    assert (count, a.shape[1]) == ((resized[0], resized[1]) if portrait else (resized[1], resized[0]))
    assert (a[first:first + count] == GREY).all(), "the first/last content rows must be the image, not white"
    assert (a[:first] == 255).all() and (a[first + count:] == 255).all()

    assert hd_size(w, h, n) == sizes
    assert (sizes[0] // CROP, sizes[1] // CROP) == grid
    assert num_image_tokens(*sizes) == tokens

    out = preprocess([Image.new("RGB", (w, h), GREY)], n)
    assert isinstance(out, ImageInputs)
    assert out.pixel_values.shape == (1, n + 1, 3, CROP, CROP) and out.pixel_values.dtype == torch.float32
    assert out.image_sizes.dtype == torch.int64 and out.image_sizes.tolist() == [list(sizes)]
    assert out.num_img_tokens == [tokens]
    n_tiles = grid[0] * grid[1]
    assert not (out.pixel_values[0, 1:1 + n_tiles] == 0).all(dim=(1, 2, 3)).any(), "real tiles are non-zero"
    assert (out.pixel_values[0, 1 + n_tiles:] == 0).all()


def test_token_maxima():
    """Spec §9 maxima: n=16 -> 2653 (16x1), 2509 (4x4), 2473 (1x16); n=4 -> 781 (4x1), 757 (2x2),
    745 (1x4)."""
    def grid_tokens(h_c: int, w_c: int) -> int:
        return num_image_tokens(h_c * CROP, w_c * CROP)

    assert [grid_tokens(16, 1), grid_tokens(4, 4), grid_tokens(1, 16)] == [2653, 2509, 2473]
    assert [grid_tokens(4, 1), grid_tokens(2, 2), grid_tokens(1, 4)] == [781, 757, 745]
    assert grid_tokens(3, 4) == 1921 and grid_tokens(4, 3) == 1933
    for n, best in ((16, 2653), (4, 781)):
        sides = range(2, 6000, 7)
        sizes = [hd_size(w, 100, n) for w in sides] + [hd_size(100, w, n) for w in sides]
        assert max(num_image_tokens(*s) for s in sizes) == best
        assert all((h // CROP) * (w // CROP) <= n for h, w in sizes)


def _expected(img: Image.Image, n: int) -> torch.Tensor:
    """Independent re-computation of spec §5.1-5.5 for one RGB image: [n+1, 3, 336, 336]."""
    portrait = img.width < img.height
    if portrait:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    ratio = img.width / img.height
    scale = max(s for s in range(1, n + 1) if s * math.ceil(s / ratio) <= n)
    new_w = scale * 336
    new_h = int(new_w / ratio)
    resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BILINEAR))
    tar = -(-new_h // 336) * 336
    top = (tar - new_h) // 2
    canvas = np.full((tar, new_w, 3), 255, dtype=np.uint8)
    canvas[top:top + new_h] = resized
    if portrait:
        canvas = canvas.transpose(1, 0, 2)
    x = (canvas.astype(np.float32) / np.float32(255) - MEAN) / STD
    hd = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
    glob = F.interpolate(hd[None], size=(336, 336), mode="bicubic", align_corners=False)[0]
    h_c, w_c = hd.shape[1] // 336, hd.shape[2] // 336
    tiles = [hd[:, 336 * a:336 * (a + 1), 336 * b:336 * (b + 1)] for a in range(h_c) for b in range(w_c)]
    crops = [glob] + tiles
    crops += [torch.zeros(3, 336, 336)] * (n + 1 - len(crops))
    return torch.stack(crops)


@pytest.mark.parametrize("w,h,n", [(640, 360, 4), (270, 480, 16), (500, 300, 16), (300, 300, 1)])
def test_pixel_values_exact(w, h, n):
    """Spec §5.1-5.5: bit-identical to a straightforward re-computation (landscape, portrait, odd padding, and a
    square image at num_crops=1, whose global view skips the identity resize)."""
    img = _noise(w, h, seed=w)
    out = preprocess([img], n)
    expected = _expected(img, n)
    assert torch.equal(out.pixel_values[0], expected)


def test_normalised_constants():
    """Spec §5.2/§9: white -> (1.9303363, 2.0748838, 2.1458970), black -> (-1.7922625, -1.7520971,
    -1.4802198)."""
    for colour, want in (((255, 255, 255), [1.9303363, 2.0748838, 2.1458970]),
                         ((0, 0, 0), [-1.7922625, -1.7520971, -1.4802198])):
        pv = preprocess([Image.new("RGB", (336, 336), colour)], 1).pixel_values[0]
        want_t = torch.tensor(want).view(3, 1, 1).expand(3, 336, 336)
        torch.testing.assert_close(pv[1], want_t, atol=1e-6, rtol=0)
        torch.testing.assert_close(pv[0], want_t, atol=1e-5, rtol=0)  # bicubic of a constant is that constant


def test_white_padding_normalised():
    """Spec §8 pitfall 11: height padding is white before normalisation, crop padding is zeros after it."""
    pv = preprocess([Image.new("RGB", (640, 360), (0, 0, 0))], 4).pixel_values[0]  # 672x378 + 147/147 padding
    white = torch.tensor([1.9303363, 2.0748838, 2.1458970]).view(3, 1, 1)
    torch.testing.assert_close(pv[1, :, :147], white.expand(3, 147, 336), atol=1e-6, rtol=0)
    assert (pv[1, :, 147:] < 0).all()  # black content starts right after the padding


def test_tiles_row_major_and_zero_padding():
    """Spec §5.4/§5.5: tiles in row-major order (a 2x3 grid of distinct colours), then exactly-zero slots."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    a = np.zeros((2 * CROP, 3 * CROP, 3), dtype=np.uint8)
    for t, c in enumerate(colours):
        a[CROP * (t // 3):CROP * (t // 3 + 1), CROP * (t % 3):CROP * (t % 3 + 1)] = c
    out = preprocess([Image.fromarray(a)], 8)  # 1008x672 keeps its size at n=8: scale 3, 2x3 grid
    assert out.image_sizes.tolist() == [[672, 1008]]
    pv = out.pixel_values[0]
    for t, c in enumerate(colours):
        want = torch.from_numpy((np.array(c, dtype=np.float32) / np.float32(255) - MEAN) / STD).view(3, 1, 1)
        assert torch.equal(pv[1 + t], want.expand(3, CROP, CROP)), f"tile {t} is out of row-major order"
    assert pv.shape[0] == 9 and torch.equal(pv[7:], torch.zeros(2, 3, CROP, CROP))


def test_empty_batch_and_single_image():
    """Spec §5.5 shapes: no images -> [0, n+1, 3, 336, 336]; a bare image counts as a batch of one."""
    out = preprocess([], 4)
    assert out.pixel_values.shape == (0, 5, 3, CROP, CROP) and out.image_sizes.shape == (0, 2)
    assert out.num_img_tokens == []
    img = _noise(64, 48)
    assert torch.equal(preprocess(img, 4).pixel_values, preprocess([img], 4).pixel_values)


def test_batch_stacks_in_order():
    """Spec §5.5: pixel_values, image_sizes and num_img_tokens follow the input order."""
    a, b = Image.new("RGB", (640, 480), GREY), Image.new("RGB", (480, 640), GREY)
    out = preprocess([a, b], 16)
    assert out.pixel_values.shape == (2, 17, 3, CROP, CROP)
    assert out.image_sizes.tolist() == [[1008, 1344], [1344, 1008]] and out.num_img_tokens == [1921, 1933]


SHARED_IMAGES = ["exceltable.png", "passport.png", "australia.jpg", "standard_s.jpg", "canoe.tif"]


@pytest.mark.parametrize("name", SHARED_IMAGES)
def test_shared_images(images_dir: Path, name: str):
    """Spec §5/§9 on real files: each loads and processes at n=4 and n=16 with consistent counts."""
    path = images_dir / name
    with Image.open(path) as raw:
        size = raw.size
    for n in (4, 16):
        out = preprocess([path], n)
        h, w = out.image_sizes[0].tolist()
        assert (h, w) == hd_size(*size, n) and h % CROP == 0 and w % CROP == 0
        assert (h // CROP) * (w // CROP) <= n
        assert out.num_img_tokens == [num_image_tokens(h, w)]
        assert out.pixel_values.shape == (1, n + 1, 3, CROP, CROP)
        assert torch.isfinite(out.pixel_values).all()
        assert out.pixel_values[0, 0].std() > 0.05, "the global view should show the picture"
    if name == "standard_s.jpg":
        assert out.image_sizes.tolist() == [[1344, 1344]] and out.num_img_tokens == [2509]


def test_ort_extensions_cross_check(images_dir: Path):
    """Spec §9 cross-check: ORT-extensions' TestPhi3VImageProcessing batch at n=16."""
    out = preprocess([images_dir / f for f in ("standard_s.jpg", "australia.jpg", "exceltable.png")], 16)
    assert out.pixel_values.shape == (3, 17, 3, CROP, CROP)
    assert out.image_sizes.tolist() == [[1344, 1344], [1008, 1344], [1008, 1680]]
    assert out.num_img_tokens == [2509, 1921, 2353]


def test_palette_image_matches_reference_conversion(images_dir: Path):
    """Spec §5: P-mode input goes through RGBA composited on white (transformers' convert_to_rgb)."""
    with Image.open(images_dir / "exceltable.png") as raw:
        assert raw.mode == "P"
        rgba = raw.convert("RGBA")
    want = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    got = load_image(images_dir / "exceltable.png")
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want))


def test_mode_conversions():
    """Spec §5/§8 pitfall 11: every common mode converts to RGB; transparency becomes white."""
    rgba = Image.new("RGBA", (8, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    got = np.asarray(load_image(rgba))
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [10, 20, 30]

    la = Image.new("LA", (4, 4), (50, 255))
    la.putpixel((1, 1), (50, 0))
    got = np.asarray(load_image(la))
    assert got[1, 1].tolist() == [255] * 3 and got[0, 0].tolist() == [50] * 3

    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.putpixel((2, 2), 0)
    assert np.asarray(load_image(p))[2, 2].tolist() == [0, 0, 0]
    p.info["transparency"] = 0
    got = np.asarray(load_image(p))
    assert got[2, 2].tolist() == [255, 255, 255] and got[0, 0].tolist() == [200, 100, 50]

    assert np.asarray(load_image(Image.new("L", (4, 4), 77)))[0, 0].tolist() == [77] * 3
    one = Image.new("1", (4, 4), 0)
    one.putpixel((3, 3), 1)
    got = np.asarray(load_image(one))
    assert got[0, 0].tolist() == [0] * 3 and got[3, 3].tolist() == [255] * 3
    cmyk = load_image(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[0, 0].tolist() == [255, 0, 0]
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert load_image(rgb).mode == "RGB" and np.asarray(load_image(rgb))[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I", "F"])
def test_high_bit_depth_grey_keeps_gradient(mode: str):
    """Spec §5 (documented deviation): 16-bit data is scaled to 8 bits, not clipped to white by PIL."""
    values = np.arange(0, 65536, 256, dtype=np.uint16).reshape(1, 256).repeat(3, axis=0)  # 0 .. 65280
    if mode.startswith("I;16"):
        img = Image.frombytes(mode, (256, 3), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    else:
        img = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode=mode)
    assert img.mode == mode
    got = np.asarray(load_image(img))
    assert got.shape == (3, 256, 3)
    assert np.array_equal(got[0, :, 0], np.arange(256)), "the gradient must survive as value >> 8"


def test_high_bit_depth_png_file(tmp_path: Path):
    """Spec §5: a real 16-bit greyscale PNG on disk is not washed out to white."""
    path = tmp_path / "grey16.png"
    Image.fromarray(np.linspace(0, 65535, 64 * 8, dtype=np.uint16).reshape(8, 64)).save(path)
    got = np.asarray(load_image(path))
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 100


def test_eight_bit_range_int_and_float_kept():
    """Spec §5 (documented deviation, bounded): I and F data already in 0..255 convert as PIL would."""
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(1, 256), mode="L")
    want = np.asarray(load_image(grey))
    for mode in ("I", "F"):
        assert np.array_equal(np.asarray(load_image(grey.convert(mode))), want), mode


def test_float_unit_range():
    """Spec §5 (documented deviation): float images in [0, 1] map to 0..255."""
    img = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 16), mode="F")
    got = np.asarray(load_image(img))[0, :, 0]
    assert got[0] == 0 and got[-1] == 255 and (np.diff(got.astype(int)) > 0).all()


def test_input_kinds_identical(tmp_path: Path):
    """Spec §5: a path (str or Path), the file's bytes and the PIL image give identical outputs."""
    img = _noise(300, 200, seed=3)
    path = tmp_path / "noise.png"
    img.save(path)
    data = path.read_bytes()
    outs = [preprocess([src], 4) for src in (img, path, str(path), data, bytearray(data), Image.open(path))]
    for o in outs[1:]:
        assert torch.equal(o.pixel_values, outs[0].pixel_values)
        assert torch.equal(o.image_sizes, outs[0].image_sizes) and o.num_img_tokens == outs[0].num_img_tokens


def _png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression-bomb shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _error(src, *words: str, **kw) -> str:
    with pytest.raises(Phi3VError) as info:
        preprocess([src], 4, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg
    for word in words:
        assert word.lower() in msg.lower(), msg
    return msg


def test_error_missing_dir_text_empty(tmp_path: Path):
    """Spec §5 input errors: missing file, a directory, a non-image, a 0-byte file -> one-line Phi3VError."""
    _error(tmp_path / "nope.png", "nope.png", "no such file")
    _error(str(tmp_path / "nope.png"), "nope.png", "no such file")
    _error(tmp_path, str(tmp_path.name), "directory")
    (tmp_path / "notes.txt").write_text("just text\nover two lines\n")
    _error(tmp_path / "notes.txt", "notes.txt", "not a readable image")
    _error(b"just text", "not a readable image")
    (tmp_path / "zero.png").write_bytes(b"")
    _error(tmp_path / "zero.png", "zero.png", "empty")
    _error(b"", "empty")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_error_truncated(tmp_path: Path, fmt: str):
    """Spec §5 input errors: a file cut in half raises Phi3VError, not PIL's OSError; no global changes."""
    buf = io.BytesIO()
    _noise(400, 300, seed=1).save(buf, fmt)
    half = buf.getvalue()[: len(buf.getvalue()) // 2]
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(half)
    _error(path, f"cut.{fmt.lower()}", "truncated")
    _error(half, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_error_zero_size_image():
    """Spec §5 input errors: 0x0 and 0xN images are refused."""
    _error(Image.new("RGB", (0, 0)), "empty")
    _error(Image.new("RGB", (0, 5)), "empty")
    with pytest.raises(Phi3VError):
        hd_size(0, 10, 4)


def test_error_decompression_bomb(tmp_path: Path):
    """Spec §5 input errors: sizes over max_pixels are refused from the header, PIL's own bomb guards too."""
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 2000), GREY).save(path)
    assert path.stat().st_size < 100_000
    _error(path, "big.png", "max_pixels", max_pixels=1000)
    _error(path.read_bytes(), "max_pixels", max_pixels=1000)
    _error(Image.new("RGB", (100, 100)), "max_pixels", max_pixels=1000)
    filters, limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _error(_png_header_only(10_000, 10_000), "decompression bomb")  # PIL warns (> limit): escalated
        _error(_png_header_only(20_000, 20_000), "decompression bomb")  # PIL raises (> 2x limit)
        # A caller allowing more than PIL's limit gets past the header check; this file then fails to decode.
        _error(_png_header_only(10_000, 10_000), "truncated", max_pixels=150_000_000)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == limit


def test_error_wrong_type_and_num_crops():
    """Spec §5 input errors: unsupported input types and num_crops < 1 or non-int raise Phi3VError."""
    for bad in (42, None, 3.5, {"a": 1}):
        _error(bad, "unsupported image type")
        with pytest.raises(Phi3VError):
            load_image(bad)
    img = Image.new("RGB", (10, 10))
    for n in (0, -1, 2.5, True, "16"):
        with pytest.raises(Phi3VError, match="num_crops") as info:
            preprocess([img], n)
        assert "\n" not in str(info.value)


def test_error_too_elongated():
    """Spec §5.1: a short side that would resize to 0 pixels (ratio > 336*scale) is refused, no crash."""
    _error(Image.new("RGB", (1, 5000)), "PIL image", "elongated", "5000")
    with pytest.raises(Phi3VError, match="elongated"):
        hd_size(20_000, 1, 16)


def test_num_crops_validated_everywhere():
    """Spec §5.1: hd_size and hd_transform refuse num_crops < 1 too (the scale loop would give width 0)."""
    with pytest.raises(Phi3VError, match="num_crops"):
        hd_size(100, 100, 0)
    with pytest.raises(Phi3VError, match="num_crops"):
        hd_transform(Image.new("RGB", (10, 10)), 0)
    with pytest.raises(Phi3VError, match="num_crops"):
        preprocess([], 0)
