"""What a huge request costs a running server, and that the cost does not add up (issue 16, "a 200 MB request
leaves tritonserver +400 MB and each stub +200 MB").

Measured: the body is copied into the Python stub's shared-memory region (/dev/shm/<prefix>*), which grows to
fit it and keeps that size; tritonserver and the stub both map the region, so the same pages show in both
RSS figures. These tests pin down that it is one bounded region, not a leak: more huge requests do not grow it,
the server refuses each one by name and keeps answering good requests.
"""
from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from mildnet.imageio import MAX_BYTES
from mildnet.serving.client import TritonEmbedder
from mildnet.serving.contract import ENSEMBLE_MODEL, IMAGE

SHM = Path("/dev/shm")
BIG = MAX_BYTES + 10 * 2**20  # over the per-image cap, so the preprocess model refuses it after the copy


def _region_bytes(prefix: str) -> int:
    return sum(p.stat().st_size for p in SHM.iterdir() if p.name.startswith(prefix))


def _post_image_bytes(url: str, model: str, body: bytes) -> tuple[int, str]:
    """One raw KServe v2 binary request of ``body`` as the IMAGE input -> (HTTP status, response text)."""
    header = json.dumps({"inputs": [{"name": IMAGE, "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(body) + 4}}]}).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer",
                                     data=header + struct.pack("<I", len(body)) + body,
                                     headers={"Inference-Header-Content-Length": str(len(header)),
                                              "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_huge_requests_grow_one_region_once_and_are_refused(triton_server, served_repository, grocery_photos):
    prefix = triton_server.shm_prefix
    body = b"\xff" * BIG
    sizes = []
    for _ in range(3):
        status, text = _post_image_bytes(triton_server.http_url, ENSEMBLE_MODEL, body)
        assert status == 400 and f"{BIG} bytes, more than the {MAX_BYTES} allowed" in text, (status, text[:300])
        sizes.append(_region_bytes(prefix))
    # The first request grows the stub's region to hold the body; the next two reuse it.
    assert sizes[0] >= BIG, f"expected the region to have grown to hold the body: {sizes}"
    assert sizes[2] <= sizes[0] + 2**20, f"huge requests keep growing shared memory: {sizes}"

    with TritonEmbedder(triton_server.http_url) as client:
        vector = client.embed_one(grocery_photos[0].read_bytes())
    assert vector.shape == (served_repository[2].embedding_dim,) and np.isfinite(vector).all()
