"""The one image decoder: every odd input becomes RGB or a clear ImageDecodeError."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mildnet.imageio import ImageDecodeError, decode_image, normalize, preprocess, resize
from mildnet.spec import IMAGENET, KERAS_01, PreprocessSpec


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: enough to test that we refuse before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, I am a text file\n" * 10, "not a recognised image"),
    (b"<html><body>404</body></html>", "text/HTML"),
    (png_header_only(20000, 20000), "pixels"),
    (png_header_only(9000, 9000), "decompression bomb"),
])
def test_bad_bytes_are_refused_with_reason(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_truncated_and_corrupt_jpeg(photo):
    data = encode(photo, "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated|not a recognised"):
        decode_image(data[: len(data) // 3])
    garbled = data[:20] + bytes(len(data) - 20)
    with pytest.raises(ImageDecodeError):
        decode_image(garbled)


def test_too_many_bytes_refused(photo):
    with pytest.raises(ImageDecodeError, match="more than the 100 allowed"):
        decode_image(encode(photo, "PNG"), max_bytes=100)


def test_missing_file_named(tmp_path):
    with pytest.raises(ImageDecodeError, match="nope.jpg: cannot read"):
        decode_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "1"])
def test_every_mode_becomes_rgb(photo, mode):
    img = photo.convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == photo.size


def test_alpha_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    assert decode_image(encode(rgba, "PNG")).getpixel((3, 3)) == (255, 255, 255)


def test_16bit_png_keeps_its_range():
    a = np.full((10, 10), 65535 // 2, dtype=np.uint16)
    img = Image.fromarray(a)  # mode I;16
    assert img.mode.startswith("I;16")
    out = np.asarray(decode_image(encode(img, "PNG")))
    assert 120 <= out.mean() <= 135  # mid-grey, not clipped to white


def test_animated_gif_takes_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    r, g, b = decode_image(buf.getvalue()).getpixel((8, 8))
    assert r > 200 and b < 50


def test_exif_orientation_honoured():
    img = Image.new("RGB", (30, 10), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 30)


def test_one_by_one_image_decodes():
    assert decode_image(encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")).size == (1, 1)


@pytest.mark.parametrize("spec", [KERAS_01, IMAGENET, PreprocessSpec(input_size=64, resize_mode="crop", resize_size=72)])
def test_resize_then_normalize_follow_spec(photo, spec):
    pixels = resize(photo, spec)
    assert pixels.shape == (3, spec.input_size, spec.input_size) and pixels.dtype == torch.uint8
    x = normalize(pixels, spec)
    assert x.shape == pixels.shape and x.dtype == torch.float32
    white = normalize(resize(Image.new("RGB", (5, 7), (255, 255, 255)), spec), spec)
    expected = (1.0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    torch.testing.assert_close(white[:, 0, 0], expected)
    # a batch normalises exactly as its images one by one (training normalises batches, serving one image)
    batch = normalize(torch.stack([pixels, pixels.flip(2)]), spec)
    assert torch.equal(batch[0], x) and torch.equal(batch[1], normalize(pixels.flip(2), spec))


def test_bgr_spec_reverses_channels():
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    spec = KERAS_01.replace(colour="BGR", input_size=4)
    pixels = resize(red, spec)
    assert pixels[0, 0, 0] == 255 and pixels[2, 0, 0] == 0  # resize keeps RGB: colour order is normalize's
    x = normalize(pixels, spec)
    assert x[2, 0, 0] == 1.0 and x[0, 0, 0] == 0.0


def test_preprocess_real_photo(grocery_photos):
    x = preprocess(grocery_photos[0], IMAGENET)
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()


@pytest.mark.parametrize("bad", [dict(input_size=0), dict(resize_mode="stretch"), dict(std=(1, 0, 1)), dict(colour="HSV")])
def test_spec_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        PreprocessSpec(**bad)


def test_spec_round_trips_json():
    spec = IMAGENET.replace(input_size=160)
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unknown preprocessing spec keys"):
        PreprocessSpec.from_dict({**spec.to_dict(), "gamma": 2.2})
