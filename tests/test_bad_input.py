"""Bad input at every entry point: the Triton models over HTTP and gRPC, the ``mildnet`` CLI and the client
scripts. Each case expects a clear error that names the problem, AND the service still answering afterwards.
Odd-but-valid images (1x1, 16-bit, CMYK, animated) must give the same embedding as in-process decoding.

Function-level decoding is tests/test_imageio.py's job and catalogue parsing tests/test_catalogue.py's; here
only the entry points. Server tests reuse the session server of tests/conftest.py.
"""
from __future__ import annotations

import functools
import io
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mildnet.imageio import MAX_BYTES, preprocess
from mildnet.index import MAX_K
from mildnet.serving.client import RemoteInferenceError, TritonEmbedder

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# -- inputs -----------------------------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """~100 bytes whose PNG header claims width x height (8-bit RGB): must be refused before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def random_rgb(h: int = 48, w: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def corrupt_png() -> bytes:
    data = bytearray(encode(random_rgb(), "PNG"))
    at = data.index(b"IDAT") + 40
    data[at:at + 20] = bytes(b ^ 0x5A for b in data[at:at + 20])  # garble the compressed pixels
    return bytes(data)


def decompression_bomb() -> bytes:
    """A REAL, fully valid 8000x8000 PNG (1-bit) of under 8 KB that would decode to 192 MB of RGB."""
    return encode(Image.new("1", (8000, 8000)), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((200, 30, 30), (30, 30, 200))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def png16_huge() -> bytes:
    """The issue's case: 77 KB, 16-bit greyscale, 6300 x 6300: under the pixel cap, ~1 GB to decode."""
    return encode(Image.new("I;16", (6300, 6300)), "PNG")


def png16() -> bytes:
    a = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 80).astype(np.uint16)
    img = Image.fromarray(a)  # mode I;16
    assert img.mode.startswith("I;16")
    return encode(img, "PNG")


# name -> (bytes from a real photo, error message pattern)
BAD_IMAGES = {
    "truncated jpeg": (lambda photo: photo[: len(photo) * 6 // 10], "corrupt or truncated JPEG"),
    "corrupt png": (lambda photo: corrupt_png(), "corrupt or truncated PNG"),
    "zero bytes": (lambda photo: b"", r"empty input \(0 bytes\)"),
    "text": (lambda photo: b"sku,price\napple,1.20\n" * 20, "not a recognised image format"),
    "html posing as jpeg": (lambda photo: b"<!doctype html><html><body>Not found</body></html>",
                            r"not a recognised image format \(text/HTML"),
    "20000x20000 header": (lambda photo: png_header_only(20000, 20000), "too many pixels|400000000 pixels, more than"),
    "decompression bomb": (lambda photo: decompression_bomb(), "possible decompression bomb"),
    "16-bit 6300x6300 png": (lambda photo: png16_huge(), r"6300x6300 I;16 would take ~\d+ MiB to decode, more than"),
}
ODD_IMAGES = {
    "1x1 png": lambda: encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
    "16-bit png": png16,
    "cmyk jpeg": lambda: encode(random_rgb().convert("CMYK"), "JPEG"),
    "animated gif": animated_gif,
}


@pytest.fixture(scope="module")
def photo(grocery_photos) -> bytes:
    return grocery_photos[0].read_bytes()


@pytest.fixture(params=["http", "grpc"])
def remote(request, triton_server):
    url = triton_server.http_url if request.param == "http" else triton_server.grpc_url
    with TritonEmbedder(url, protocol=request.param, concurrency=4, timeout=60) as r:
        yield r


def still_answers(remote, photo, model) -> None:
    """The service answers a good request right after the bad one, with the in-process result."""
    got = remote.embed([photo])
    want = in_process(model, [photo])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def in_process(model, images) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.stack([preprocess(b, model.spec) for b in images])).numpy()


# -- images at the Triton models --------------------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.parametrize("case", list(BAD_IMAGES))
@pytest.mark.parametrize("model_name", ["mildnet_ensemble", "similar"])
def test_bad_image_refused_by_server(remote, served_repository, catalogue_index, photo, case, model_name):
    make, message = BAD_IMAGES[case]
    with pytest.raises(RemoteInferenceError, match=message):
        if model_name == "similar":
            remote.similar(make(photo), k=2)
        else:
            remote.embed([make(photo)])
    still_answers(remote, photo, served_repository[1])


@pytest.mark.server
@pytest.mark.parametrize("case", list(ODD_IMAGES))
def test_odd_valid_image_served_like_in_process(remote, served_repository, catalogue_index, photo, case):
    _, model, _ = served_repository
    data = ODD_IMAGES[case]()
    np.testing.assert_allclose(remote.embed([data]), in_process(model, [data]), atol=2e-5, rtol=1e-4)
    assert len(remote.similar(data, k=3)) == 3


@pytest.mark.server
def test_image_over_max_bytes_refused(remote, served_repository, photo):
    """The request size cap: imageio.MAX_BYTES of encoded image (Triton 2.51 has no --http-max-input-size)."""
    big = photo + b"\0" * (MAX_BYTES + 1 - len(photo))
    with pytest.raises(RemoteInferenceError, match=f"more than the {MAX_BYTES} allowed"):
        remote.embed([big])
    still_answers(remote, photo, served_repository[1])


# -- tensors at `mildnet`, batches, k, filters ------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.parametrize("shape,dtype,triton_dtype,message", [
    ((1, 3, 64, 64), np.float32, "FP32", "unexpected shape"),  # another input size
    ((1, 96, 96, 3), np.float32, "FP32", "unexpected shape"),  # channels last
    ((1, 1, 96, 96), np.float32, "FP32", "unexpected shape"),  # greyscale
    ((1, 3, 96, 96), np.float16, "FP16", "data-type"),
    ((1, 3, 96, 96), np.uint8, "UINT8", "data-type"),
])
def test_wrong_tensor_to_mildnet(remote, served_repository, photo, shape, dtype, triton_dtype, message):
    assert served_repository[1].spec.input_size == 96
    with pytest.raises(RemoteInferenceError, match=message):
        remote.infer("mildnet", [("PIXELS", np.zeros(shape, dtype=dtype), triton_dtype)], ["EMBEDDING"])
    still_answers(remote, photo, served_repository[1])


@pytest.mark.server
@pytest.mark.parametrize("model_name", ["mildnet", "mildnet_ensemble", "similar"])
def test_batch_larger_than_max_batch_size(remote, served_repository, catalogue_index, photo, model_name):
    n = 17  # the session server exports max_batch_size=16
    if model_name == "mildnet":
        inputs = [("PIXELS", np.zeros((n, 3, 96, 96), np.float32), "FP32")]
        outputs = ["EMBEDDING"]
    else:
        inputs = [("IMAGE", np.array([[photo]] * n, dtype=object), "BYTES")]
        outputs = ["EMBEDDING"]
        if model_name == "similar":
            inputs.append(("K", np.full((n, 1), 2, np.int32), "INT32"))
            outputs = ["IDS"]
    with pytest.raises(RemoteInferenceError, match="batch size|batch-size"):
        remote.infer(model_name, inputs, outputs)
    still_answers(remote, photo, served_repository[1])


@pytest.mark.server
@pytest.mark.parametrize("k,message", [(0, "positive"), (-1, "positive"), (MAX_K + 1, f"at most {MAX_K}"),
                                       (2**31 - 1, f"at most {MAX_K}")])
def test_bad_k(remote, served_repository, catalogue_index, photo, k, message):
    with pytest.raises(RemoteInferenceError, match=message):
        remote.similar(photo, k=k)
    assert len(remote.similar(photo, k=len(catalogue_index[1]))) == len(catalogue_index[1])


@pytest.mark.server
def test_k_above_catalogue_size_returns_all_of_it(remote, catalogue_index, photo):
    """As Index.search: k > n gives the whole catalogue, ranked, the same as k = n (up to the MAX_K cap)."""
    ids = catalogue_index[1]
    want = remote.similar(photo, k=len(ids))
    for k in (len(ids) + 1, MAX_K):
        got = remote.similar(photo, k=k)
        assert [h.id for h in got] == [h.id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    assert sorted(h.id for h in want) == sorted(ids)


@pytest.mark.server
def test_k_of_wrong_dtype(remote, served_repository, catalogue_index, photo):
    inputs = [("IMAGE", np.array([[photo]], dtype=object), "BYTES"), ("K", np.array([[2]], np.int64), "INT64")]
    with pytest.raises(RemoteInferenceError, match="data-type|datatype"):
        remote.infer("similar", inputs, ["IDS"])
    still_answers(remote, photo, served_repository[1])


@pytest.mark.server
@pytest.mark.parametrize("filter_text,message", [
    (b'{"colour": "red"}', r"unknown FILTER keys \['colour'\]"),
    (b'{"category": "Apple", "<script>": 1}', "unknown FILTER keys"),
    (b"category=Apple", "not valid JSON"),
    (b'["category", "Apple"]', "must be a JSON object"),
])
def test_bad_filter(remote, served_repository, catalogue_index, photo, filter_text, message):
    inputs = [("IMAGE", np.array([[photo]], dtype=object), "BYTES"), ("K", np.array([[2]], np.int32), "INT32"),
              ("FILTER", np.array([[filter_text]], dtype=object), "BYTES")]
    with pytest.raises(RemoteInferenceError, match=message):
        remote.infer("similar", inputs, ["IDS", "SCORES", "METADATA"])
    still_answers(remote, photo, served_repository[1])


@pytest.mark.server
@pytest.mark.parametrize("filter_text,message", [
    (b"[" * 5000 + b"]" * 5000, "FILTER is 10000 bytes, more than the 4096 allowed"),  # the case
    (b'{"category": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nested too deeply"),
    (b'{"category": ["Apple", "Pear"]}', "must be a string, number, boolean or null"),
    (b'{"category": {"$ne": "x"}}', "must be a string, number, boolean or null"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_malformed_filter_clear_400_without_traceback(remote, served_repository, catalogue_index, photo,
                                                      filter_text, message):
    inputs = [("IMAGE", np.array([[photo]], dtype=object), "BYTES"), ("K", np.array([[2]], np.int32), "INT32"),
              ("FILTER", np.array([[filter_text]], dtype=object), "BYTES")]
    with pytest.raises(RemoteInferenceError, match=message) as e:  # INVALID_ARG: HTTP 400 / gRPC INVALID_ARGUMENT
        remote.infer("similar", inputs, ["IDS", "SCORES", "METADATA"])
    text = str(e.value)
    assert "Traceback" not in text and ".py" not in text and str(served_repository[0].parent) not in text
    assert len(text) < 600
    still_answers(remote, photo, served_repository[1])


@pytest.mark.server
@pytest.mark.parametrize("value,message", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                           (-np.inf, "NaN or infinite"), (1e38, "values must lie within")])
def test_non_finite_pixels_refused(remote, served_repository, photo, value, message):
    """NaN/inf pixels returned 200 with a NaN embedding, 1e38 an all-zero one; both are refused now."""
    pixels = np.zeros((2, 3, 96, 96), np.float32)
    pixels[1, 0, 5, 5] = value if value != 1e38 else 0
    if value == 1e38:
        pixels[1] = 1e38
    with pytest.raises(RemoteInferenceError, match=message):
        remote.infer("mildnet", [("PIXELS", pixels, "FP32")], ["EMBEDDING"])
    still_answers(remote, photo, served_repository[1])


@pytest.mark.server
@pytest.mark.parametrize("model_name", ["mildnet_ensemble", "similar"])
def test_request_decode_budget_checked_from_headers(remote, served_repository, catalogue_index, photo, model_name):
    """Four 4000 x 4000 headers (122 MiB each to decode) in one request: refused at the third, before any
    decoding (the files hold no pixels, so a decode would have failed with another message)."""
    big = png_header_only(4000, 4000)
    inputs = [("IMAGE", np.array([[big]] * 4, dtype=object), "BYTES")]
    outputs = ["EMBEDDING"]
    if model_name == "similar":
        inputs.append(("K", np.full((4, 1), 2, np.int32), "INT32"))
        outputs = ["IDS"]
    with pytest.raises(RemoteInferenceError, match="image 2: the request's images would take"):
        remote.infer(model_name, inputs, outputs)
    still_answers(remote, photo, served_repository[1])


# -- the CLI: catalogues ----------------------------------------------------------------------------------------------
def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def catalogue_dir(tmp_path_factory, grocery_photos) -> Path:
    """A folder with four real photos under img/ (two items, two categories)."""
    root = tmp_path_factory.mktemp("catalogue")
    (root / "img").mkdir()
    for i, p in enumerate(grocery_photos[:4]):
        (root / "img" / f"p{i}.jpg").write_bytes(p.read_bytes())
    return root


GOOD_ROWS = "img/p0.jpg,a,fruit\nimg/p1.jpg,a,fruit\nimg/p2.jpg,b,veg\nimg/p3.jpg,b,veg\n"
BAD_CATALOGUES = {
    "missing column": ("path,item_id\nimg/p0.jpg,a\n", "missing column(s) ['category']"),
    "short row": ("path,item_id,category\n" + GOOD_ROWS + "img/p0.jpg,a\n", "line 6: 2 fields, the header has 3"),
    "empty path": ("path,item_id,category\n" + GOOD_ROWS + ",c,veg\n", "line 6: empty image path"),
    "missing image": ("path,item_id,category\n" + GOOD_ROWS + "img/nope.jpg,c,veg\n", "image file not found"),
    "../ escape": ("path,item_id,category\n" + GOOD_ROWS + "../p0.jpg,c,veg\n", "leaves the catalogue root"),
    "absolute escape": ("path,item_id,category\n" + GOOD_ROWS + "/etc/passwd,c,veg\n", "leaves the catalogue root"),
}


@pytest.mark.parametrize("case", list(BAD_CATALOGUES))
def test_cli_refuses_bad_catalogue(catalogue_dir, tmp_path, case):
    text, message = BAD_CATALOGUES[case]
    (catalogue_dir / "bad.csv").write_text(text)
    r = run_cli("-m", "mildnet", "triplets", str(catalogue_dir / "bad.csv"), "--out", str(tmp_path / "t"))
    assert r.returncode == 1, r.stderr
    assert "mildnet triplets: error:" in r.stderr and message in r.stderr and "bad.csv" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_outside_root_only_when_allowed(catalogue_dir, tmp_path):
    """The same escaping path is accepted with --allow-outside-root (and only then)."""
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((catalogue_dir / "img" / "p0.jpg").read_bytes())
    (catalogue_dir / "escape.csv").write_text("path,item_id,category\n" + GOOD_ROWS + f"{outside},a,fruit\n")
    refused = run_cli("-m", "mildnet", "triplets", str(catalogue_dir / "escape.csv"), "--out", str(tmp_path / "a"))
    assert refused.returncode == 1 and "leaves the catalogue root" in refused.stderr
    allowed = run_cli("-m", "mildnet", "triplets", str(catalogue_dir / "escape.csv"), "--out", str(tmp_path / "b"),
                      "--allow-outside-root")
    assert allowed.returncode == 0, allowed.stderr
    assert "outside.jpg" in "".join(p.read_text() for p in (tmp_path / "b").glob("*.csv"))


@pytest.mark.parametrize("content,message", [(b"", "not a loadable checkpoint"),
                                             (b"<html>not a checkpoint</html>", "not a loadable checkpoint")])
def test_cli_export_refuses_bad_checkpoint(tmp_path, content, message):
    bad = tmp_path / "best.pt"
    bad.write_bytes(content)
    r = run_cli("-m", "mildnet", "export", "--checkpoint", str(bad), "--repository", str(tmp_path / "repo"))
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list((tmp_path / "repo").glob("mildnet/[0-9]*"))  # nothing half-exported


# -- the client scripts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["zero bytes", "html posing as jpeg", "truncated jpeg", "20000x20000 header",
                                  "decompression bomb"])
def test_query_script_refuses_bad_image_without_a_server(tmp_path, photo, case):
    from mildnet.serving.server import free_port

    make, message = BAD_IMAGES[case]
    image = tmp_path / "query.jpg"
    image.write_bytes(make(photo))
    r = run_cli("client/query.py", str(image), "--url", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1, r.stderr
    assert "query.py: error:" in r.stderr and str(image) in r.stderr
    assert re.search(message, r.stderr), r.stderr


@pytest.mark.server
@pytest.mark.parametrize("args,code,message", [
    (["--k", "0"], 2, "--k must be >= 1"),
    (["--k", "2147483647"], 2, f"--k must be <= {MAX_K}"),
    (["--k", "3", "--filter", "colour=red"], 1, "unknown FILTER keys"),
    (["--k", "3", "--filter", "nokey"], 1, "expected KEY=VALUE"),
])
def test_query_script_bad_arguments(triton_server, catalogue_index, grocery_photos, args, code, message):
    r = run_cli("client/query.py", str(grocery_photos[0]), "--url", triton_server.http_url, *args)
    assert r.returncode == code and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.server
def test_index_script_skips_bad_images_and_refuses_bad_rows(triton_server, catalogue_dir, tmp_path, photo):
    """client/index.py: a corrupt image in a catalogue is skipped and named; the others are indexed once."""
    from mildnet.index import load_index

    (catalogue_dir / "img" / "broken.jpg").write_bytes(BAD_IMAGES["truncated jpeg"][0](photo))
    (catalogue_dir / "img" / "page.jpg").write_bytes(BAD_IMAGES["html posing as jpeg"][0](photo))
    (catalogue_dir / "mixed.csv").write_text("path,item_id,category\n" + GOOD_ROWS
                                             + "img/broken.jpg,c,veg\nimg/page.jpg,d,veg\n")
    out = tmp_path / "cat.mindex"
    r = run_cli("client/index.py", str(catalogue_dir / "mixed.csv"), "--out", str(out), "--url",
                triton_server.http_url, "--no-progress", "--chunk", "3")
    assert r.returncode == 0, r.stderr
    assert "broken.jpg" in r.stderr and "page.jpg" in r.stderr  # both named as skipped
    assert sorted(load_index(out).ids()) == [f"img/p{i}.jpg" for i in range(4)]

    (catalogue_dir / "escape.csv").write_text("path,item_id,category\n" + GOOD_ROWS + "../x.jpg,c,veg\n")
    r = run_cli("client/index.py", str(catalogue_dir / "escape.csv"), "--out", str(tmp_path / "b.mindex"),
                "--url", triton_server.http_url, "--no-progress")
    assert r.returncode == 1 and "leaves the catalogue root" in r.stderr and not (tmp_path / "b.mindex").exists()


# -- HTML in metadata: escaped in every page we write -----------------------------------------------------------------
EVIL = '<script>alert("x")</script>'
EVIL_ID = '<img src=x onerror=alert(1)>'


def assert_escaped(page: str, *raw: str) -> None:
    """None of ``raw`` appears unescaped, and no markup of ours came from the data."""
    for t in raw:
        assert t not in page, f"raw {t!r} in the page"
    assert "<script" not in page.lower() and "<img src=x" not in page


@pytest.mark.server
def test_query_html_page_escapes_metadata(triton_server, served_repository, grocery_photos, tmp_path):
    """query.py --html over a local index whose ids and metadata carry HTML."""
    from mildnet.index import create_index

    _, model, info = served_repository
    photos = [p.read_bytes() for p in grocery_photos[:3]]
    index = create_index(model.embedding_dim, kind="flat", model_version=info.model_version)
    index.add([EVIL_ID, "b", "c"], in_process(model, photos),
              [{"category": EVIL, "path": str(grocery_photos[i])} for i in range(3)])
    index.save(tmp_path / "evil.mindex")
    page = tmp_path / "out.html"
    r = run_cli("client/query.py", str(grocery_photos[0]), "--url", triton_server.http_url, "--k", "3",
                "--index", str(tmp_path / "evil.mindex"), "--html", str(page), "--filter", f"category={EVIL}")
    assert r.returncode == 0, r.stderr
    text = page.read_text()
    assert_escaped(text, EVIL, EVIL_ID)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text  # shown, as text


def test_eval_results_page_escapes_metadata(catalogue_dir, tmp_path):
    """mildnet eval's results.html: item ids and file names carrying HTML are shown as text."""
    folder = tmp_path / "cat"
    (folder / "img").mkdir(parents=True)
    rows = ["path,item_id,category,domain,split"]
    for i in range(4):
        name = f"<svg onload=alert({i})>.jpg"
        (folder / "img" / name).write_bytes((catalogue_dir / "img" / f"p{i}.jpg").read_bytes())
        item = EVIL_ID if i < 2 else EVIL
        rows.append(f'"img/{name}","{item.replace(chr(34), chr(34) * 2)}",fruit,'
                    f'{"street" if i % 2 else "shop"},val')
    (folder / "cat.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    r = run_cli("-m", "mildnet", "eval", "--model", "mildnet_mobile", "--input-size", "64", "--catalogue",
                str(folder / "cat.csv"), "--split", "val", "--out", str(out), "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    page = (out / "results.html").read_text()
    assert_escaped(page, EVIL, EVIL_ID, "<svg onload")
    assert "&lt;svg onload=alert(1)&gt;.jpg" in page
