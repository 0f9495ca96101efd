"""Images -> pixel_values, image_sizes and token counts, bit-identical to HF `Phi3VImageProcessor` (spec §5).

PIL + numpy + torch only: the reference's torchvision calls are re-done with the PIL and torch operations
they wrap (`resize` -> `Image.resize(BILINEAR)`, `pad` -> paste on a white canvas, `ToTensor`/`Normalize` ->
the same float32 ops), so results match to the bit.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from phi3v.errors import Phi3VError, TooLarge

CROP = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS default

ImageSource = Image.Image | str | bytes | bytearray | os.PathLike


@dataclass(frozen=True)
class ImageInputs:
    """The processor's output for N images (spec §5.5)."""

    pixel_values: torch.Tensor  # [N, num_crops+1, 3, 336, 336] float32
    image_sizes: torch.Tensor  # [N, 2] int64 (H_pad, W_pad)
    num_img_tokens: list[int]


def num_image_tokens(h_pad: int, w_pad: int, side: int = 12) -> int:
    """T_img for a padded HD size: side^2 = 144 per crop (tiles + global), `side` row separators per tile
    row and for the global view, and glb_GN (spec §4.3 step 6, §5.5). `side` is 12 for Phi-3-V."""
    h_c, w_c = h_pad // CROP, w_pad // CROP
    return (h_c * w_c + 1) * side * side + 1 + (h_c + 1) * side


def _check_num_crops(num_crops: int) -> None:
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1:
        raise Phi3VError(f"num_crops must be an integer >= 1 (16 for Phi-3-V, 4 for Phi-3.5-V), "
                         f"got {num_crops!r}")


def _resize_target(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(new_w, new_h) of the landscape-oriented image, W >= H, with the reference's float arithmetic and
    `int()` truncations (spec §5.1 steps 2-4)."""
    _check_num_crops(num_crops)
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    new_h = int(new_w / ratio)
    if new_h < 1:
        # The reference would ask PIL for a zero-height resize here and crash.
        raise Phi3VError(f"image with sides {width} and {height} is too elongated for num_crops={num_crops} "
                         f"(its short side would shrink to 0 pixels); crop it or raise num_crops")
    return new_w, new_h


def _pad_target(new_h: int) -> tuple[int, int]:
    """(tar, top) of the centred white height padding (spec §5.1 step 6)."""
    tar = math.ceil(new_h / CROP) * CROP
    return tar, int((tar - new_h) / 2)


def hd_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(H_pad, W_pad) that `hd_transform` produces, without touching pixels (`calc_hd_transform_size`,
    spec §5.5)."""
    if width < 1 or height < 1:
        raise Phi3VError(f"image size {width}x{height} is empty; pass an image with pixels")
    portrait = width < height
    long_side, short_side = (height, width) if portrait else (width, height)
    new_w, new_h = _resize_target(long_side, short_side, num_crops)
    tar, _ = _pad_target(new_h)
    return (new_w, tar) if portrait else (tar, new_w)


def hd_transform(img: Image.Image, num_crops: int) -> Image.Image:
    """Resize to fill the crop budget and pad the short side with white to a multiple of 336 (spec §5.1)."""
    if img.mode != "RGB":
        img = _to_rgb(img, "image")
    # Literal transposes, not a direct portrait resize: PIL resamples horizontally then vertically, rounding
    # to 8 bits in between, so swapping the axes changes low bits of the result.
    portrait = img.width < img.height
    if portrait:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = _resize_target(img.width, img.height, num_crops)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    tar, top = _pad_target(new_h)
    canvas = Image.new("RGB", (new_w, tar), (255, 255, 255))
    canvas.paste(img, (0, top))
    return canvas.transpose(Image.Transpose.TRANSPOSE) if portrait else canvas


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grey -> L (spec §8 pitfall 11). A deliberate deviation from the reference, whose PIL
    conversion clips everything above 255 to white: I;16* keep their top 8 bits (value >> 8). I and F carry no
    bit depth, so their range decides: above 255 -> 16-bit data (>> 8); F within [0, 1] -> x 255; otherwise
    8-bit data, kept as PIL would."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        return Image.fromarray((a.astype(np.uint16) >> 8).astype(np.uint8), mode="L")
    a = np.nan_to_num(a.astype(np.float64), nan=0.0)
    peak = a.max(initial=0.0)
    if peak > 255:
        a = np.floor(np.clip(a, 0, 65535) / 256)
    elif img.mode == "F" and peak <= 1.0:
        a = np.rint(np.clip(a, 0, 1) * 255)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """transformers' `convert_to_rgb`: any non-RGB mode -> RGBA, composited onto white, -> RGB (spec §5,
    §8 pitfall 11)."""
    if img.mode == "RGB":
        return img
    try:
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            img = _to_8bit(img)
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    except (ValueError, OSError, TypeError) as e:
        raise Phi3VError(f"{name}: cannot convert image mode {img.mode!r} to RGB ({_one_line(e)}); "
                         f"save it as an RGB PNG or JPEG") from None


def _one_line(e: BaseException) -> str:
    """An exception's text squeezed onto one line: messages must stay single-line for the CLI and server."""
    return " ".join(str(e).split()) or type(e).__name__


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise Phi3VError(f"{name}: image is empty ({w}x{h} pixels); pass an image with pixels")
    if w * h > max_pixels:
        raise TooLarge(f"{name}: image of {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} "
                         f"(decompression-bomb guard); downscale it or raise max_pixels")


def _label(src: ImageSource) -> str:
    """How error messages name an input: its file name where there is one."""
    if isinstance(src, (str, os.PathLike)):
        return f"'{Path(src)}'"
    if isinstance(src, Image.Image):
        return f"'{src.filename}'" if getattr(src, "filename", "") else "PIL image"
    return "image bytes"


def _open(src: str | os.PathLike | bytes | bytearray, max_pixels: int) -> Image.Image:
    """Open and fully decode a path or encoded bytes; every failure becomes one Phi3VError line."""
    name = _label(src)
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    else:
        path = Path(src)
        if not path.exists():
            raise Phi3VError(f"{name}: no such file; check the image path")
        if path.is_dir():
            raise Phi3VError(f"{name}: is a directory, not an image file; pass the path of an image file")
        try:
            # Read up front so no file handle outlives this call (multi-frame formats keep theirs open).
            data = path.read_bytes()
        except OSError as e:
            raise Phi3VError(f"{name}: cannot read the file ({e.strerror}); check its permissions") from None
    if not data:
        raise Phi3VError(f"{name}: empty (0 bytes); pass a valid image file")
    img, limit = None, Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Escalated locally so an over-budget header is refused before any pixel is decoded; ignored
            # when the caller deliberately allows more than PIL's own limit.
            bomb = "ignore" if limit is None or max_pixels > limit else "error"
            warnings.simplefilter(bomb, Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(img, name, max_pixels)
            img.load()
        return img
    except Phi3VError:  # already one line, naming the file
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooLarge(f"{name}: refused as a possible decompression bomb ({_one_line(e)}); "
                         f"downscale the image or raise max_pixels") from None
    except Image.UnidentifiedImageError:
        raise Phi3VError(f"{name}: not a readable image (unknown or unsupported format); pass a PNG, JPEG, "
                         f"TIFF, ... file") from None
    except Exception as e:  # noqa: BLE001 - PIL plugins raise OSError, SyntaxError, struct.error, ...
        what = "not a readable image" if img is None else "truncated or corrupt image"
        raise Phi3VError(f"{name}: {what} ({_one_line(e)}); pass a valid PNG, JPEG, TIFF, ... file") from None


def load_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A PIL image, a path or encoded bytes -> a fully decoded RGB PIL image (spec §5, §8 pitfall 11)."""
    name = _label(src)
    if isinstance(src, Image.Image):
        _check_size(src, name, max_pixels)
        try:
            src.load()
        except Exception as e:  # noqa: BLE001 - a lazily opened PIL image decodes here
            raise Phi3VError(f"{name}: truncated or corrupt image ({_one_line(e)}); "
                             f"pass a valid image") from None
        img = src
    elif isinstance(src, (str, os.PathLike, bytes, bytearray)):
        img = _open(src, max_pixels)
    else:
        raise Phi3VError(f"unsupported image type {type(src).__name__}; pass a PIL image, a file path "
                         f"or the bytes of an image file")
    return _to_rgb(img, name)


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> [3, H, W] float32: torchvision `ToTensor` then `Normalize`, op for op (spec §5.2)."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # [H, W, 3]
    x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # [3, H, W]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub(mean).div(std)


def crops_of(hd: torch.Tensor, num_crops: int) -> torch.Tensor:
    """[3, H_pad, W_pad] -> [num_crops+1, 3, 336, 336]: global view, row-major tiles, zero slots
    (spec §5.3-5.5)."""
    _, h, w = hd.shape
    h_c, w_c = h // CROP, w // CROP
    # From the normalised tensor, no antialias, no clamp: what the reference does (PIL bicubic would differ).
    # At 336 x 336 already the resize is the identity, exactly (cubic weights 0, 1, 0, 0), so it is skipped.
    same = (h, w) == (CROP, CROP)
    glob = hd[None] if same else F.interpolate(hd[None], size=(CROP, CROP), mode="bicubic", align_corners=False)
    tiles = hd.reshape(3, h_c, CROP, w_c, CROP).permute(1, 3, 0, 2, 4).reshape(h_c * w_c, 3, CROP, CROP)
    pad = hd.new_zeros(num_crops - h_c * w_c, 3, CROP, CROP)  # zeros = the mean colour after Normalize
    return torch.cat([glob, tiles, pad])


def preprocess(images: Sequence[ImageSource] | ImageSource, num_crops: int = 16, *,
               max_pixels: int = DEFAULT_MAX_PIXELS, side: int = 12) -> ImageInputs:
    """`Phi3VImageProcessor.preprocess` (spec §5): load, HD-transform, normalise, crop, zero-pad, stack.

    A single image (not in a list) is accepted as a batch of one. `side`: the model's merged tokens per
    crop side (`VisionConfig.tokens_per_side`), which only changes the token counts.
    """
    _check_num_crops(num_crops)
    if isinstance(images, (Image.Image, str, bytes, bytearray, os.PathLike)):
        images = [images]
    pixel_values, sizes, tokens = [], [], []
    for src in images:
        img = load_image(src, max_pixels=max_pixels)
        try:
            hd = to_normalized_tensor(hd_transform(img, num_crops))
        except Phi3VError as e:  # load_image names the file itself; hd_transform cannot
            raise Phi3VError(f"{_label(src)}: {e}") from None
        _, h, w = hd.shape
        pixel_values.append(crops_of(hd, num_crops))
        sizes.append((h, w))
        tokens.append(num_image_tokens(h, w, side))
    empty = torch.zeros(0, num_crops + 1, 3, CROP, CROP)
    return ImageInputs(
        pixel_values=torch.stack(pixel_values) if pixel_values else empty,
        image_sizes=torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
        num_img_tokens=tokens,
    )
