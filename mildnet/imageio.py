"""Image decoding and its safety checks: the ONE function that turns untrusted bytes into pixels.

Used by training data, the Triton ``preprocess`` model and the client alike, so a photo is read the same
way everywhere: size-checked before decoding, EXIF orientation applied, any mode (greyscale, CMYK, 16-bit,
palette, alpha, animated) turned into 8-bit RGB.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .spec import PreprocessSpec

MAX_BYTES = 50 * 1024 * 1024  # 50 MiB of encoded image
MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; decoded RGB would be 120 MB
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike]


class ImageDecodeError(ValueError):
    """An input could not be turned into an image; the message says why."""


def decode_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES,
                 name: str | None = None) -> Image.Image:
    """Decode encoded bytes (or a file path) into an 8-bit RGB PIL image, refusing anything unsafe.

    Raises :class:`ImageDecodeError` naming the problem (empty, too large, not an image, corrupt, too many
    pixels, ...). ``name`` is used in messages (e.g. a catalogue row).
    """
    label = name
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = label or str(path)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ImageDecodeError(f"{label}: cannot read file ({e.strerror or e})") from None
        if size > max_bytes:
            raise ImageDecodeError(f"{label}: file is {size} bytes, more than the {max_bytes} allowed")
        data = path.read_bytes()
    else:
        data = bytes(source)
    label = label or "image"
    if len(data) == 0:
        raise ImageDecodeError(f"{label}: empty input (0 bytes)")
    if len(data) > max_bytes:
        raise ImageDecodeError(f"{label}: {len(data)} bytes, more than the {max_bytes} allowed")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{label}: refused, too many pixels ({e})") from None
    except Exception:
        head = data[:16].lstrip().lower()
        kind = "text/HTML" if head.startswith((b"<", b"{", b"[")) or data[:64].isascii() else "unknown data"
        raise ImageDecodeError(f"{label}: not a recognised image format ({kind}, {len(data)} bytes)") from None

    if img.format not in ALLOWED_FORMATS:
        raise ImageDecodeError(f"{label}: image format {img.format} is not accepted "
                               f"(accepted: {', '.join(ALLOWED_FORMATS)})")
    w, h = img.size  # read from the header: nothing decoded yet
    if w < 1 or h < 1:
        raise ImageDecodeError(f"{label}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageDecodeError(f"{label}: {w}x{h} = {w * h} pixels, more than the {max_pixels} allowed "
                               "(possible decompression bomb)")
    try:
        img.seek(0)  # animated GIF/WebP: the first frame
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError(f"{label}: corrupt or truncated {img.format} ({type(e).__name__}: {e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: PIL's convert("RGB") clips at 255, so rescale by the real range.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / (hi - lo or 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Product photos with transparency: composite on white, as a shop page would show them.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path: ImageSource, **kw) -> Image.Image:
    """Alias of :func:`decode_image` for paths, for readability at call sites."""
    return decode_image(path, **kw)


def image_to_tensor(img: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """RGB PIL image -> normalised ``Tensor[3, S, S]`` float32 following ``spec``."""
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[spec.interpolation]
    s = spec.input_size
    if spec.resize_mode == "squash":
        img = img.resize((s, s), resample)
    else:
        short = spec.resize_size or s
        w, h = img.size
        scale = short / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        img = img.resize((nw, nh), resample)
        left, top = (nw - s) // 2, (nh - s) // 2
        img = img.crop((left, top, left + s, top + s))
    a = np.asarray(img, dtype=np.float32)  # (H, W, 3) RGB
    if spec.colour == "BGR":
        a = a[..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    if spec.colour == "BGR":
        mean, std = mean.flip(0), std.flip(0)
    return ((x / 255.0 - mean) / std).contiguous()


def preprocess(source: ImageSource, spec: PreprocessSpec, **kw) -> torch.Tensor:
    """Bytes or path -> model input ``Tensor[3, S, S]``: :func:`decode_image` then :func:`image_to_tensor`."""
    return image_to_tensor(decode_image(source, **kw), spec)
