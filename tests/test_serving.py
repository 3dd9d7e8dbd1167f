"""Serving against a REAL Triton server (session fixture in conftest.py), plus the backend logic with a fake
pb_utils (no server). The server tests share one server; the new-version test runs last because it swaps
the served model."""
from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mildnet.imageio import preprocess
from mildnet.index import MAX_K
from mildnet.serving.client import (ModelNotReady, RemoteInferenceError, ServerUnavailable, TritonEmbedder,
                            model_metrics, time_per_request)


# -- helpers ------------------------------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height: refused by its header, never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def in_process(model, images) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.stack([preprocess(b, model.spec) for b in images])).numpy()


def settled_metrics(url: str, model: str, at_least: float = 0, timeout: float = 15.0) -> dict:
    """Triton refreshes its counters every couple of seconds: read until they stop moving (and reach at_least)."""
    import time

    last, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = model_metrics(url, model)
        if now == last and now["inference_count"] >= at_least:
            return now
        last = now
        time.sleep(1.0)
    raise AssertionError(f"metrics of {model} did not settle: {last}")


@pytest.fixture(scope="module")
def photos(grocery_photos) -> list[bytes]:
    return [p.read_bytes() for p in grocery_photos]


@pytest.fixture(params=["http", "grpc"])  # function scope: a module-scoped param would reorder the tests
def remote(request, triton_server):
    url = triton_server.http_url if request.param == "http" else triton_server.grpc_url
    with TritonEmbedder(url, protocol=request.param, concurrency=8) as r:
        yield r


@pytest.fixture(scope="module")
def http_remote(triton_server):
    with TritonEmbedder(triton_server.http_url, concurrency=16) as r:
        yield r


# -- a real server ----------------------------------------------------------------------------------------------------
@pytest.mark.server
def test_embeddings_equal_in_process(remote, served_repository, photos):
    _, model, _ = served_repository
    got = remote.embed(photos)  # ensemble: bytes -> preprocess -> mildnet
    want = in_process(model, photos)
    assert got.shape == (len(photos), model.embedding_dim)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.server
def test_triton_sees_the_pixels_training_sees(http_remote, served_repository, grocery_photos, tmp_path):
    """One preprocessing path: a photo through Triton (bytes -> preprocess -> mildnet) and through training's data
    path (ImageCache of resized uint8 pixels -> normalize -> the model) gives the same pixels, bit for bit, and
    the same embedding."""
    from mildnet.data.datasets import ImageCache, embed_images
    from mildnet.imageio import normalize
    from mildnet.serving import contract

    _, model, _ = served_repository
    cache = ImageCache.build(grocery_photos, model.spec, tmp_path / "cache.pt", progress=False)
    assert len(cache) == len(grocery_photos) and cache.images.dtype == torch.uint8
    images = [p.read_bytes() for p in cache.paths]
    for i, image in enumerate(images):
        served = http_remote.infer(contract.PREPROCESS_MODEL, [(contract.IMAGE, np.array([[image]], dtype=object),
                                                                "BYTES")], [contract.PIXELS])[contract.PIXELS]
        np.testing.assert_array_equal(served[0], normalize(cache.images[i:i + 1], model.spec)[0].numpy())
    np.testing.assert_allclose(http_remote.embed(images), embed_images(model, cache.images), atol=2e-5, rtol=1e-4)


@pytest.mark.server
def test_model_info_follows_the_export(remote, served_repository):
    _, model, info = served_repository
    got = remote.model_info()
    assert (got.version, got.variant, got.embedding_dim) == (1, info.variant, model.embedding_dim)
    assert got.spec == model.spec and got.model_version == info.model_version


@pytest.mark.server
def test_pixels_model_equals_in_process(http_remote, served_repository, photos):
    _, model, _ = served_repository
    pixels = torch.stack([preprocess(b, model.spec) for b in photos[:3]]).numpy()  # (3, 3, S, S)
    out = http_remote.infer("mildnet", [("PIXELS", pixels, "FP32")], ["EMBEDDING"])["EMBEDDING"]
    np.testing.assert_allclose(out, in_process(model, photos[:3]), atol=2e-5, rtol=1e-4)


@pytest.mark.server
def test_dynamic_batching_forms_batches(triton_server, http_remote, served_repository):
    _, model, _ = served_repository
    s = model.spec.input_size
    before = settled_metrics(triton_server.metrics_url, "mildnet")
    x = np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32)

    def one(_):
        return http_remote.infer("mildnet", [("PIXELS", x, "FP32")], ["EMBEDDING"])["EMBEDDING"]

    with ThreadPoolExecutor(16) as pool:  # 16 single-image requests in flight at once
        outs = list(pool.map(one, range(64)))
    after = settled_metrics(triton_server.metrics_url, "mildnet", at_least=before["inference_count"] + 64)
    images = after["inference_count"] - before["inference_count"]
    passes = after["exec_count"] - before["exec_count"]
    assert images == 64
    assert images / passes > 1.0, f"no batching: {images} images in {passes} forward passes"
    np.testing.assert_allclose(np.stack(outs)[:, 0], np.repeat(outs[0], 64, 0), atol=1e-5)  # batch-invariant
    times = time_per_request(before, after)  # where the time went, from Triton's own counters
    assert times["requests"] == 64 and times["avg_batch"] == pytest.approx(images / passes, abs=0.01)
    assert 0 < times["compute_infer_ms"] <= times["request_ms"]
    assert times["queue_ms"] + times["compute_input_ms"] + times["compute_infer_ms"] + times["compute_output_ms"] \
        <= times["request_ms"] * 1.05 + 0.05  # the parts never exceed the whole (counters are rounded)


def test_time_per_request_from_counters():
    zero = dict.fromkeys(["inference_count", "exec_count", "request_success", "request_failure", "request_us",
                          "queue_us", "compute_input_us", "compute_infer_us", "compute_output_us"], 0.0)
    after = {**zero, "inference_count": 8, "exec_count": 2, "request_success": 8, "request_us": 80_000,
             "queue_us": 16_000, "compute_input_us": 800, "compute_infer_us": 60_000, "compute_output_us": 400}
    assert time_per_request(zero, after) == {"requests": 8, "request_ms": 10.0, "queue_ms": 2.0,
                                             "compute_input_ms": 0.1, "compute_infer_ms": 7.5,
                                             "compute_output_ms": 0.05, "avg_batch": 4.0}
    assert time_per_request(after, after) == {"requests": 0}


@pytest.mark.server
def test_similar_finds_the_photo_itself(remote, catalogue_index, photos):
    _, ids, _ = catalogue_index
    for i in (0, 4, 8):
        hits = remote.similar(photos[i], k=3)
        assert len(hits) == 3 and hits[0].id == ids[i]
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].score >= hits[1].score >= hits[2].score
        assert set(hits[0].metadata) == {"group", "category"}


@pytest.mark.server
def test_similar_filter(http_remote, catalogue_index, photos):
    hits = http_remote.similar(photos[0], k=3, filter={"group": "Vegetables"})
    assert hits and all(h.metadata["group"] == "Vegetables" for h in hits)
    assert ids_of(hits).isdisjoint({catalogue_index[1][0]})  # the query itself is a fruit


def ids_of(hits) -> set[str]:
    return {h.id for h in hits}


BAD_IMAGES = {
    "zero bytes": (lambda good: b"", "empty input"),
    "text file": (lambda good: b"sku,price\napple,1.20\npear,0.90\n", "not a recognised image format"),
    "corrupt jpeg": (lambda good: good[: len(good) * 6 // 10], "truncated"),
    "20000x20000 png": (lambda good: png_header_only(20000, 20000), "pixels"),
}


@pytest.mark.server
@pytest.mark.parametrize("case", list(BAD_IMAGES))
@pytest.mark.parametrize("model", ["mildnet_ensemble", "similar"])
def test_bad_image_is_an_error_and_server_keeps_answering(http_remote, photos, catalogue_index, case, model):
    make, message = BAD_IMAGES[case]
    bad = make(photos[1])
    with pytest.raises(RemoteInferenceError, match=message):
        if model == "similar":
            http_remote.similar(bad, k=2)
        else:
            http_remote.embed([bad])
    assert http_remote.embed([photos[2]]).shape[0] == 1  # the next request is answered


@pytest.mark.server
def test_bad_image_fails_only_its_own_request(http_remote, served_repository, photos):
    _, model, _ = served_repository
    mixed = [photos[0], b"", photos[1], b"<html>nope</html>", photos[2]] * 3  # concurrent: batched together
    results = http_remote.embed_each(mixed)
    for got, image in zip(results, mixed):
        if image in (b"", b"<html>nope</html>"):
            assert isinstance(got, RemoteInferenceError)
        else:
            np.testing.assert_allclose(got, in_process(model, [image])[0], atol=2e-5, rtol=1e-4)


@pytest.mark.server
@pytest.mark.parametrize("shape,dtype,message", [
    ((1, 3, 64, 64), np.float32, "unexpected shape"),
    ((1, 96, 96, 3), np.float32, "unexpected shape"),
    ((1, 3, 96, 96), np.float64, "data-type"),
    ((1, 3, 96, 96), np.int32, "data-type"),
])
def test_wrong_tensor_to_mildnet(http_remote, photos, shape, dtype, message):
    x = np.zeros(shape, dtype=dtype)
    triton_dtype = {np.float32: "FP32", np.float64: "FP64", np.int32: "INT32"}[dtype]
    with pytest.raises(RemoteInferenceError, match=message):
        http_remote.infer("mildnet", [("PIXELS", x, triton_dtype)], ["EMBEDDING"])
    assert http_remote.embed([photos[0]]).shape[0] == 1


@pytest.mark.server
@pytest.mark.parametrize("k,message", [(0, "positive"), (-3, "positive"), (MAX_K + 1, f"at most {MAX_K}")])
def test_bad_k(remote, photos, catalogue_index, k, message):
    assert len(catalogue_index[1]) == 9
    with pytest.raises(RemoteInferenceError, match=message):
        remote.similar(photos[0], k=k)
    assert len(remote.similar(photos[0], k=9)) == 9
    assert len(remote.similar(photos[0], k=10)) == 9  # k above the catalogue size: all of it, as Index.search


@pytest.mark.server
@pytest.mark.parametrize("filter_,message", [({"colour": "red"}, "(?i)unknown filter key"),
                                             ({}, None)])
def test_filter_keys(http_remote, photos, catalogue_index, filter_, message):
    if message:
        with pytest.raises(RemoteInferenceError, match=message):
            http_remote.similar(photos[0], k=2, filter=filter_)
    else:
        assert len(http_remote.similar(photos[0], k=2, filter=filter_)) == 2


@pytest.mark.server
def test_spreads_over_several_urls(triton_server, photos, served_repository):
    _, model, _ = served_repository
    # the same server by two names: requests alternate between them, results stay right
    urls = [triton_server.http_url, triton_server.http_url.replace("127.0.0.1", "localhost")]
    with TritonEmbedder(urls, concurrency=4) as r:
        got = r.embed(photos[:4])
    np.testing.assert_allclose(got, in_process(model, photos[:4]), atol=2e-5, rtol=1e-4)


def test_unreachable_server_is_a_clear_error(photos):
    from mildnet.serving.server import free_port

    with TritonEmbedder(f"127.0.0.1:{free_port()}", timeout=5) as r:
        with pytest.raises(ServerUnavailable, match="cannot reach Triton"):
            r.embed([photos[0]])


@pytest.mark.server
def test_unknown_model_is_model_not_ready(triton_server, photos):
    with TritonEmbedder(triton_server.http_url, model="no_such_model") as r:
        with pytest.raises(ModelNotReady, match="no_such_model"):
            r.embed([photos[0]])


@pytest.mark.server
def test_new_version_is_served(triton_server, served_repository, http_remote, photos):
    """Runs last in this file: export v2 (other weights) into the live repository; the server picks it up."""
    from mildnet import models
    from mildnet.export import export_model
    from mildnet.serving.repository import ServingConfig

    repo, old_model, _ = served_repository
    torch.manual_seed(123)
    new = models.create(old_model.variant, pretrained=False, **old_model.model_kwargs).eval()
    result = export_model(new, repo, ServingConfig(max_batch_size=16, max_queue_delay_us=5000))
    assert result.version == 2 and (repo / "mildnet" / "1" / "model.pt").is_file()  # older version kept
    triton_server.wait_for_model("mildnet", 2, timeout=120)
    triton_server.wait_for_model("mildnet_ensemble", timeout=120)
    import time

    deadline = time.monotonic() + 60  # version 1 unloads shortly after 2 is ready
    while time.monotonic() < deadline and triton_server.is_model_ready("mildnet", 1):
        time.sleep(0.5)
    assert http_remote.model_info().version == 2
    got = http_remote.embed(photos[:3])
    np.testing.assert_allclose(got, in_process(new, photos[:3]), atol=2e-5, rtol=1e-4)
    assert not np.allclose(got, in_process(old_model, photos[:3]), atol=1e-3)


# -- the backend logic without a server: a fake pb_utils -------------------------------------------------------------
class FakePbUtils:
    """The slice of triton_python_backend_utils that mildnet.serving.triton uses."""

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, array

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

        def is_cpu(self):
            return True

    class TritonError:
        INVALID_ARG = 3

        def __init__(self, message, code=None):
            self._message, self.code = message, code

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self._error = output_tensors, error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class InferenceRequest:
        def __init__(self, inputs):
            self.inputs = {t.name(): t for t in inputs}

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.inputs.get(name)

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return next(t for t in response.output_tensors if t.name() == name)


def _backend_args(repo, model_name):
    """Triton's ``args`` for a model of a rendered repository: its config.pbtxt as the JSON Triton hands over."""
    import json

    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from mildnet.serving.contract import version_dirs

    config = text_format.Parse((repo / model_name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    version = version_dirs(repo / model_name)[-1].name
    return {"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
            "model_repository": str(repo / model_name), "model_version": version, "model_instance_kind": "CPU"}


@pytest.fixture(scope="module")
def exported_repo(tmp_path_factory):
    from mildnet import models
    from mildnet.export import export_model

    torch.manual_seed(0)
    model = models.create("mildnet_mobile", pretrained=False, input_size=64).eval()
    repo = tmp_path_factory.mktemp("repo")
    export_model(model, repo)
    return repo, model


def _counting(forward, calls):
    def wrapper(x):
        calls.append(x.shape[0])
        return forward(x)
    return wrapper


def test_embedder_runs_a_batch_of_requests_in_passes_of_forward_batch(exported_repo):
    from mildnet.serving.triton import EmbedderModel, create_model

    pb = FakePbUtils
    repo, model = exported_repo
    backend = create_model(_backend_args(repo, "mildnet"), pb)  # the class the config names
    assert isinstance(backend, EmbedderModel)
    assert isinstance(backend.forward, torch.jit.ScriptModule)  # the CPU default: frozen
    calls = []
    backend.forward = _counting(backend.forward, calls)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 3, 64, 64)).astype(np.float32) for n in (1, 3, 2)]
    bad = np.zeros((1, 3, 32, 32), np.float32)
    requests = [pb.InferenceRequest([pb.Tensor("PIXELS", x)]) for x in (xs[0], bad, xs[1], xs[2])]
    responses = backend.execute(requests)
    assert calls == [4, 2]  # the three good requests, concatenated, in passes of forward_batch (4 on CPU)
    assert responses[1].has_error() and "shape" in responses[1].error().message()
    with torch.inference_mode():
        for resp, x in zip([responses[0], responses[2], responses[3]], xs):
            assert not resp.has_error()
            got = pb.get_output_tensor_by_name(resp, "EMBEDDING").as_numpy()
            np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_embedder_eager_in_one_pass_when_exported_so(tmp_path):
    from mildnet import models
    from mildnet.export import export_model
    from mildnet.serving.repository import ServingConfig
    from mildnet.serving.triton import create_model

    pb = FakePbUtils
    torch.manual_seed(0)
    model = models.create("mildnet_mobile", pretrained=False, input_size=64).eval()
    export_model(model, tmp_path, ServingConfig(freeze=False, forward_batch=0), pipeline=False)
    backend = create_model(_backend_args(tmp_path, "mildnet"), pb)
    assert not isinstance(backend.forward, torch.jit.ScriptModule)
    calls = []
    backend.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = np.random.default_rng(1).standard_normal((6, 3, 64, 64)).astype(np.float32)
    (resp,) = backend.execute([pb.InferenceRequest([pb.Tensor("PIXELS", x)])])
    assert calls == [6] and not resp.has_error()
    with torch.inference_mode():
        np.testing.assert_allclose(pb.get_output_tensor_by_name(resp, "EMBEDDING").as_numpy(),
                                   model(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_preprocess_follows_spec_and_fails_per_request(exported_repo, grocery_photos, tmp_path):
    import shutil

    from mildnet.serving.triton import PreprocessModel, create_model

    pb = FakePbUtils
    repo, model = exported_repo
    shutil.copytree(repo / "preprocess", tmp_path / "preprocess")  # alone: it must read nothing but its own folder
    backend = create_model(_backend_args(tmp_path, "preprocess"), pb)
    assert isinstance(backend, PreprocessModel)
    good = np.array([[grocery_photos[0].read_bytes()]], dtype=object)
    requests = [pb.InferenceRequest([pb.Tensor("IMAGE", good)]),
                pb.InferenceRequest([pb.Tensor("IMAGE", np.array([[b"GIF89a broken"]], dtype=object))])]
    ok, bad = backend.execute(requests)
    pixels = pb.get_output_tensor_by_name(ok, "PIXELS").as_numpy()
    assert pixels.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(pixels[0], preprocess(grocery_photos[0], model.spec).numpy())
    assert bad.has_error() and "image" in bad.error().message()


@pytest.mark.parametrize("text,message", [(b"not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                                          (b'{"colour": "red"}', "unknown FILTER keys")])
def test_parse_filter_errors(text, message):
    from mildnet.serving.triton import parse_filter

    with pytest.raises(ValueError, match=message):
        parse_filter(text, {"category", "group"})


def test_parse_filter_ok():
    from mildnet.serving.triton import parse_filter

    assert parse_filter(b'{"category": "Apple"}', {"category"}) == {"category": "Apple"}
    assert parse_filter(b"", {"category"}) is None and parse_filter(None, None) is None


@pytest.mark.parametrize("exported", [False, True])
def test_server_on_an_unexported_repository_says_to_export(tmp_path, exported):
    """model_repository/ is build output: before `mildnet export` there is nothing (or no version) to serve."""
    from mildnet.serving.server import ServerStartError, TritonServer

    repo = tmp_path / "model_repository"
    if exported:
        (repo / "mildnet").mkdir(parents=True)  # a model folder without any version
    with pytest.raises(ServerStartError, match="mildnet export"):
        TritonServer(repo).start()
