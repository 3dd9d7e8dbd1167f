"""The ONE pixel path: decode (with its safety checks) -> :func:`resize` (uint8) -> :func:`normalize` (float).

Used by training data, evaluation, export warm-up, the Triton ``preprocess`` model and the client alike, so a
photo is read the same way everywhere: size-checked before decoding, EXIF orientation applied, any mode
(greyscale, CMYK, 16-bit, palette, alpha, animated) turned into 8-bit RGB, resized by the model's spec into
``uint8`` pixels (what training caches and augments), then normalised into the model's float input.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import MildnetError
from .spec import PreprocessSpec

MAX_BYTES = 50 * 1024 * 1024  # 50 MiB of encoded image
MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; decoded RGB would be 120 MB
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
# The decode budget: estimated peak bytes of decoding one image (pixels x DECODE_BYTES_PER_PIXEL of its mode,
# read from the header before anything is decoded), and the total for all images of one request. A pixel cap
# alone let a 77 KB 16-bit PNG of 6300 x 6300 cost 1 GB and 3 s.
MAX_DECODE_BYTES = 256 * 1024 * 1024
# Time follows the same count (~100 MB of it a second on one busy core here), so one total bounds both.
MAX_REQUEST_DECODE_BYTES = MAX_DECODE_BYTES
# Bytes per pixel held at the peak of decode + conversion to 8-bit RGB (:func:`_to_rgb`), by PIL mode: the
# decoded image, the intermediates of its conversion and the RGB result. Peak RSS of decoding 3000 x 3000 PNGs
# (2026-11-30: RGB 8.0, L 5.7, P 9.5, RGBA 20.0, LA 20.0, I;16 30.1), rounded up; the rest by analogy.
DECODE_BYTES_PER_PIXEL = {"1": 6, "L": 6, "P": 10, "RGB": 8, "YCbCr": 8, "LAB": 8, "HSV": 8, "CMYK": 10,
                          "RGBA": 21, "RGBa": 21, "LA": 21, "La": 21, "PA": 21, "I;16": 31, "I;16B": 31,
                          "I;16L": 31, "I;16N": 31, "I": 40, "F": 40}
DEFAULT_DECODE_BYTES_PER_PIXEL = 40  # a mode not listed: assume the dearest path

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike]


class ImageDecodeError(MildnetError, ValueError):
    """An input could not be turned into an image; the message says why."""


def decode_cost(size: tuple[int, int], mode: str) -> int:
    """Estimated peak bytes of decoding an image of ``size`` and PIL ``mode`` to 8-bit RGB."""
    return size[0] * size[1] * DECODE_BYTES_PER_PIXEL.get(mode, DEFAULT_DECODE_BYTES_PER_PIXEL)


def decode_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES,
                 max_decode_bytes: int = MAX_DECODE_BYTES, min_size: int | None = None,
                 name: str | None = None) -> Image.Image:
    """Decode encoded bytes (or a file path) into an 8-bit RGB PIL image, refusing anything unsafe.

    Raises :class:`ImageDecodeError` naming the problem (empty, too large, not an image, corrupt, too many
    pixels, over the decode budget, ...). ``name`` is used in messages (e.g. a catalogue row).
    ``min_size``: the caller needs no more than a short side of this many pixels, so a big JPEG is decoded at
    a reduced scale (1/2, 1/4 or 1/8, Pillow's draft mode: the DCT does the downscaling) that keeps both sides
    at least ``min_size``.
    """
    img, label = open_image(source, max_pixels=max_pixels, max_bytes=max_bytes,
                            max_decode_bytes=max_decode_bytes, min_size=min_size, name=name)
    try:
        img.seek(0)  # animated GIF/WebP: the first frame
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError(f"{label}: corrupt or truncated {img.format} ({type(e).__name__}: {e})") from None


def check_request(sources: list[ImageSource], *, min_size: int | None = None,
                  total: int = MAX_REQUEST_DECODE_BYTES, names: list[str] | None = None) -> None:
    """Refuse, from the headers alone and before anything is decoded, a request whose images would together
    take more than ``total`` bytes to decode (each image is also checked on its own, as :func:`decode_image`
    will). Raises :class:`ImageDecodeError` naming the image that goes over."""
    spent = 0
    for n, source in enumerate(sources):
        name = names[n] if names else f"image {n}"
        img, label = open_image(source, min_size=min_size, name=name)
        spent += decode_cost(img.size, img.mode)
        img.close()
        if spent > total:
            raise ImageDecodeError(f"{label}: the request's images would take ~{spent >> 20} MiB to decode "
                                   f"together, more than the {total >> 20} MiB allowed; send fewer or smaller "
                                   "images per request")


def open_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES,
               max_decode_bytes: int = MAX_DECODE_BYTES, min_size: int | None = None,
               name: str | None = None) -> tuple[Image.Image, str]:
    """The checks of :func:`decode_image` that need only the header: (the opened, undecoded image, its label)."""
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
    if min_size and img.format in ("JPEG", "MPO") and min(w, h) >= 2 * min_size:
        img.draft(img.mode, (min_size, min_size))  # still from the header: sets the scale the decoder uses
    cost = decode_cost(img.size, img.mode)
    if cost > max_decode_bytes:
        raise ImageDecodeError(f"{label}: {img.size[0]}x{img.size[1]} {img.mode} would take ~{cost >> 20} MiB to "
                               f"decode, more than the {max_decode_bytes >> 20} MiB allowed")
    return img, label


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


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize(img: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """RGB PIL image -> ``uint8 Tensor[3, S, S]`` (RGB) following the spec's geometry: squash to S x S, or
    shorter side to ``resize_size`` then a centre crop of S."""
    resample = _RESAMPLE[spec.interpolation]
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
    a = np.array(img, dtype=np.uint8)  # (H, W, 3) RGB, a writable copy
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()  # (3, S, S)


def resize_key(spec: PreprocessSpec) -> str:
    """What :func:`resize`'s pixels depend on (the spec's geometry): specs with equal keys give equal pixels."""
    return json.dumps({k: getattr(spec, k) for k in ("input_size", "resize_mode", "resize_size", "interpolation")},
                      sort_keys=True)


def normalize(images: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """``uint8 Tensor[3, S, S]`` or ``[N, 3, S, S]`` (RGB, from :func:`resize`) -> float32 model input:
    ``(x / 255 - mean) / std`` in the spec's colour order; a batch comes back channels_last."""
    x = images.float()
    mean, std = spec.mean, spec.std
    if spec.colour == "BGR":
        x = x.flip(-3)
        mean, std = mean[::-1], std[::-1]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    x = (x / 255.0 - mean_t) / std_t
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x.contiguous()


def needed_size(spec: PreprocessSpec) -> int:
    """The smallest short side :func:`resize` can use without upscaling (draft-mode JPEG decoding)."""
    return max(spec.input_size, spec.resize_size or 0)


def decode_resized(source: ImageSource, spec: PreprocessSpec, **kw) -> torch.Tensor:
    """Bytes or path -> ``uint8 Tensor[3, S, S]``: :func:`decode_image` (a big JPEG decoded at the reduced scale
    the spec allows) then :func:`resize`. What training caches, and what serving normalises."""
    kw.setdefault("min_size", needed_size(spec))
    return resize(decode_image(source, **kw), spec)


def preprocess(source: ImageSource, spec: PreprocessSpec, **kw) -> torch.Tensor:
    """Bytes or path -> model input ``float32 Tensor[3, S, S]``: :func:`decode_resized` then :func:`normalize`."""
    return normalize(decode_resized(source, spec, **kw), spec)
