"""The Python client of a mildnet Triton server (HTTP or gRPC), used by client/ scripts, tests and benches.

    with TritonEmbedder(["127.0.0.1:8000", "10.0.0.2:8000"]) as remote:
        vectors = remote.embed([jpeg_bytes, png_bytes])          # np.ndarray[N, D], unit rows
        hits = remote.similar(jpeg_bytes, k=5, filter={"category": "Apple"})
        remote.model_info()                                      # version, dim, spec, model_version

Each image is its own request, so the server's dynamic batcher (not the client) forms batches; up to
``concurrency`` requests are in flight at once from a thread pool with one tritonclient per thread and URL
(the HTTP client is not thread-safe), and consecutive requests go round-robin over the URLs.

Errors: :class:`ServerUnavailable` (cannot connect), :class:`ModelNotReady` (server up, model not loaded),
:class:`RemoteInferenceError` (the server refused one request: its message says why, e.g. a corrupt JPEG).
"""
from __future__ import annotations

import itertools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from ..errors import MildnetError
from ..index import Hit
from . import contract as c

PROTOCOLS = ("http", "grpc")


class ServerUnavailable(MildnetError, ConnectionError):
    """No Triton server answers at the URL."""


class ModelNotReady(MildnetError, RuntimeError):
    """The server answers but the model is not loaded (not exported yet, failed to load, or loading)."""


class ServerSideError(MildnetError, RuntimeError):
    """The server failed a request for a reason of its own (its index is unusable, an internal error): HTTP 500 /
    gRPC INTERNAL. Not the request's fault: retrying it elsewhere, or after the server is fixed, can work."""


class RemoteInferenceError(MildnetError, ValueError):
    """The server refused one request (bad image, bad k, ...); ``index`` is its position in the call, if any."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class ClientConfigError(MildnetError, ValueError):
    """A client built with arguments it cannot use (no URL, an unknown protocol)."""


def _modules(protocol: str):
    if protocol == "http":
        import tritonclient.http as client
    elif protocol == "grpc":
        import tritonclient.grpc as client
    else:
        raise ClientConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    from tritonclient.utils import InferenceServerException

    return client, InferenceServerException


# Phrases (lower-case) of tritonclient / geventhttpclient / gRPC / http.client errors that mean the server is down
# or died mid-request; matched against "<exception class>: <message>". A server killed while an HTTP request is in
# flight gives geventhttpclient's HTTPConnectionClosed("connection closed."), which must not read as a bad image.
_UNREACHABLE = ("failed to connect", "connection refused", "connect failed", "name resolution", "no route to host",
                "connection reset", "connection aborted", "connection closed", "connectionclosed", "broken pipe",
                "remotedisconnected", "remote end closed connection", "server disconnected", "socket closed",
                "stream removed", "goaway", "deadline exceeded")
_NOT_READY = ("is not found", "unknown model", "is not ready", "no version is available", "failed to load")


def _classify(exc: Exception, url: str, model: str, index: int | None = None) -> Exception:
    """A tritonclient / socket exception -> one of this module's clear errors."""
    if isinstance(exc, (ServerUnavailable, ModelNotReady, RemoteInferenceError, ServerSideError)):
        return exc
    text = str(exc.message() if callable(getattr(exc, "message", None)) else exc) or type(exc).__name__
    low = f"{type(exc).__name__}: {text}".lower()
    if isinstance(exc, OSError) or any(s in low for s in _UNREACHABLE):
        return ServerUnavailable(f"cannot reach Triton at {url}: {text}")
    if any(s in low for s in _NOT_READY) and "ensemble" not in low:
        return ModelNotReady(f"model {model!r} is not ready on {url}: {text}")
    where = f"image {index}: " if index is not None else ""
    status = str(exc.status() if callable(getattr(exc, "status", None)) else "")
    if status in ("500", "StatusCode.INTERNAL"):
        return ServerSideError(f"{where}the server failed at {url}: {text}")
    return RemoteInferenceError(f"{where}{text}", index)  # incl. overload: "exceeds maximum queue size"


class TritonEmbedder:
    """Embeddings and visual search from one or more mildnet Triton servers."""

    def __init__(self, urls: str | Sequence[str], protocol: str = "http", *, model: str = c.ENSEMBLE_MODEL,
                 embedding_model: str = c.EMBEDDING_MODEL, similar_model: str = c.SIMILAR_MODEL,
                 concurrency: int = 8, timeout: float = 120.0):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ClientConfigError("TritonEmbedder needs at least one server URL (host:port)")
        self.urls = [u.split("://", 1)[-1].rstrip("/") for u in self.urls]  # tritonclient wants host:port
        self.protocol = protocol
        self._client_mod, self._exc = _modules(protocol)
        self.model, self.embedding_model, self.similar_model = model, embedding_model, similar_model
        self.concurrency = max(1, int(concurrency))
        self.timeout = timeout
        self._local = threading.local()
        self._next_url = itertools.count()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._opened: list = []  # every client any thread made, so close() can close them

    # -- plumbing -----------------------------------------------------------------------------------------------
    def _client(self, url: str):
        clients = self._local.__dict__.setdefault("clients", {})
        if url not in clients:
            if self.protocol == "http":
                clients[url] = self._client_mod.InferenceServerClient(
                    url, connection_timeout=self.timeout, network_timeout=self.timeout)
            else:
                # gRPC's reconnect back-off grows to minutes: cap it so a restarted server is reached within ~1 s
                # (channel_args replaces tritonclient's own options, hence its message-size limits here too)
                big = 2**31 - 1
                clients[url] = self._client_mod.InferenceServerClient(url, channel_args=[
                    ("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big),
                    ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                    ("grpc.max_reconnect_backoff_ms", 1000)])
            with self._lock:
                self._opened.append(clients[url])
        return clients[url]

    def _pick_url(self) -> str:
        return self.urls[next(self._next_url) % len(self.urls)]

    def _grpc_reconnects(self, url: str, wait: float = 2.0) -> bool:
        """True if the gRPC channel to ``url`` becomes ready within ``wait`` s. A channel that saw the server go
        away fails calls at once while it backs off (up to 1 s, see _client), even after the server is back."""
        import grpc

        try:
            grpc.channel_ready_future(self._client(url)._channel).result(timeout=wait)
            return True
        except Exception:  # noqa: BLE001 - timeout or closed channel: still unreachable
            return False

    def infer(self, model: str, inputs: list[tuple[str, np.ndarray, str]], outputs: list[str],
              url: str | None = None, index: int | None = None, *, _retry: bool = True) -> dict[str, np.ndarray]:
        """One request to any model: ``inputs`` = (name, array, Triton dtype) -> {output name: array}.
        Inference has no side effects, so a gRPC call refused by a channel in reconnect back-off is sent once
        more if the channel then connects (a restarted server is reached at once, not after a failed call)."""
        url = url or self._pick_url()
        mod = self._client_mod
        try:
            tensors = []
            for name, array, dtype in inputs:
                t = mod.InferInput(name, list(array.shape), dtype)
                t.set_data_from_numpy(array)
                tensors.append(t)
            requested = [mod.InferRequestedOutput(o) for o in outputs]
            kw = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
            result = self._client(url).infer(model, tensors, outputs=requested, **kw)
            return {o: result.as_numpy(o) for o in outputs}
        except Exception as e:  # noqa: BLE001 - re-raised as one of our clear errors
            err = _classify(e, url, model, index)
        if _retry and self.protocol == "grpc" and isinstance(err, ServerUnavailable) and self._grpc_reconnects(url):
            return self.infer(model, inputs, outputs, url, index, _retry=False)
        raise err

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="mildnet-remote")
            return self._pool

    def close(self) -> None:
        """Stop the worker threads and close every connection (an open one makes Triton wait out its exit
        timeout when it is stopped)."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            opened, self._opened = self._opened, []
            self._local = threading.local()  # used again after close(): fresh clients
        for client in opened:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    def __enter__(self) -> "TritonEmbedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- API ------------------------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """True when every URL answers and has the embedding pipeline loaded."""
        try:
            return all(self._client(u).is_model_ready(self.model) for u in self.urls)
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    def embed_one(self, image: bytes, url: str | None = None, index: int | None = None) -> np.ndarray:
        """One encoded image -> ``np.ndarray[D]``."""
        batch = np.array([[bytes(image)]], dtype=object)  # (1, 1) TYPE_STRING
        return self.infer(self.model, [(c.IMAGE, batch, "BYTES")], [c.EMBEDDING], url, index)[c.EMBEDDING][0]

    def embed_each(self, images: Sequence[bytes]) -> list[np.ndarray | RemoteInferenceError]:
        """Like :meth:`embed` but per image: a vector or the error that image got (server errors still raise)."""
        def one(i_img):
            i, img = i_img
            try:
                return self.embed_one(img, self.urls[i % len(self.urls)], i)
            except RemoteInferenceError as e:
                return e

        return list(self._executor().map(one, enumerate(images)))

    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        """Encoded images -> ``np.ndarray[N, D]`` float32, many requests in flight; the first bad image raises."""
        if len(images) == 0:
            raise ClientConfigError("embed() needs at least one image")
        out = self.embed_each(images)
        for r in out:
            if isinstance(r, RemoteInferenceError):
                raise r
        return np.stack(out).astype(np.float32, copy=False)

    def similar(self, image: bytes, k: int = 10, filter: dict | None = None) -> list:
        """One query image -> up to ``k`` :class:`mildnet.index.Hit` (id, score, metadata), best first."""
        inputs = [(c.IMAGE, np.array([[bytes(image)]], dtype=object), "BYTES"),
                  (c.K, np.array([[int(k)]], dtype=np.int32), "INT32")]
        if filter:
            inputs.append((c.FILTER, np.array([[json.dumps(filter).encode()]], dtype=object), "BYTES"))
        out = self.infer(self.similar_model, inputs, list(c.SIMILAR_OUTPUTS))
        hits = []
        for id_, score, meta in zip(out[c.IDS][0], out[c.SCORES][0], out[c.METADATA][0]):
            if not id_:  # padding: a filter left fewer than k matches
                continue
            hits.append(Hit(id_.decode() if isinstance(id_, bytes) else str(id_), float(score),
                            json.loads(meta) if meta else {}))
        return hits

    def model_info(self, url: str | None = None) -> c.ServedModel:
        """What the server serves (the contract its embedding model's config carries) and its version."""
        url = url or self.urls[0]
        try:
            client = self._client(url)
            if not client.is_model_ready(self.embedding_model):
                raise ModelNotReady(f"model {self.embedding_model!r} is not ready on {url}")
            meta = client.get_model_metadata(self.embedding_model)
            config = client.get_model_config(self.embedding_model)
        except Exception as e:  # noqa: BLE001
            raise _classify(e, url, self.embedding_model) from None
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            meta = MessageToDict(meta, preserving_proto_field_name=True)
            config = MessageToDict(config, preserving_proto_field_name=True).get("config", {})
        versions = [int(v) for v in meta.get("versions", [])]
        try:
            return c.ServedModel.from_parameters(c.config_parameters(config), max(versions) if versions else 0,
                                                 where=f"model {self.embedding_model!r} on {url}")
        except c.ContractError as e:
            raise ModelNotReady(f"{e} (not exported by `mildnet export`?)") from None


# -- metrics ------------------------------------------------------------------------------------------------------
_METRICS = {"nv_inference_count": "inference_count", "nv_inference_exec_count": "exec_count",
            "nv_inference_request_success": "request_success", "nv_inference_request_failure": "request_failure",
            "nv_inference_request_duration_us": "request_us", "nv_inference_queue_duration_us": "queue_us",
            "nv_inference_compute_input_duration_us": "compute_input_us",
            "nv_inference_compute_infer_duration_us": "compute_infer_us",
            "nv_inference_compute_output_duration_us": "compute_output_us"}


def model_metrics(metrics_url: str, model: str) -> dict[str, float]:
    """Triton's Prometheus counters for one model, summed over versions (cumulative since the model loaded).

    Keys: ``inference_count`` (images), ``exec_count`` (forward passes), ``request_success``,
    ``request_failure``, and the summed microseconds ``request_us`` (a request's whole time in the server),
    ``queue_us``, ``compute_input_us``, ``compute_infer_us``, ``compute_output_us``.
    Average batch = inference_count / exec_count.
    """
    import urllib.request

    url = metrics_url if metrics_url.startswith("http") else f"http://{metrics_url}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = dict.fromkeys(_METRICS.values(), 0.0)
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        metric, rest = line.split("{", 1)
        labels, _, value = rest.rpartition("}")
        if metric in _METRICS and f'model="{model}"' in labels:
            out[_METRICS[metric]] += float(value)
    return out


def time_per_request(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Where a model's requests spent their time between two :func:`model_metrics` readings: milliseconds per
    successful request in the queue, in compute (input, infer, output) and in all, plus the average batch."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    n = delta["request_success"]
    if n <= 0:
        return {"requests": 0}
    per = {k[:-3] + "_ms": round(delta[k] / n / 1000, 2)
           for k in ("request_us", "queue_us", "compute_input_us", "compute_infer_us", "compute_output_us")}
    per["avg_batch"] = round(delta["inference_count"] / delta["exec_count"], 2) if delta["exec_count"] else 0.0
    return {"requests": int(n), **per}
