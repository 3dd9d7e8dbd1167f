"""The Triton Python models of mildnet. Every model folder runs the one generic ``model.py`` shell
(``mildnet/serving/templates/model.py``), which calls :func:`create_model`: the class is named by the
``mildnet_python_model`` parameter of the model's own config, and each class reads what it needs from that
config, once, in ``__init__`` (Triton's ``initialize``); no model reads another model's folder.

Every class takes Triton's ``pb_utils`` module as an argument (it exists only inside the server's Python stub),
so ``mildnet`` stays importable, and these classes testable, without Triton.

* :class:`EmbedderModel` (``mildnet``): ``PIXELS`` FP32 ``[N, 3, S, S]`` -> ``EMBEDDING`` FP32 ``[N, D]``.
  Dynamic batching hands ``execute`` a LIST of requests: it concatenates them into ONE forward pass and splits
  the result back, one response per request.
* :class:`PreprocessModel` (``preprocess``): ``IMAGE`` bytes ``[N, 1]`` -> ``PIXELS`` ``[N, 3, S, S]`` with
  :func:`mildnet.imageio.preprocess` and the ``spec`` parameter of its config.
* :class:`SimilarModel` (``similar``, BLS): ``IMAGE`` + ``K`` (+ ``FILTER``) -> ``IDS``/``SCORES``/``METADATA``
  from an index file (:func:`mildnet.index.load_index`), reloaded when the file changes.

A bad request (undecodable image, wrong shape, bad k) gets its own error response; the rest of the batch and
the server carry on.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from ..errors import MildnetError
from ..imageio import check_request, needed_size, preprocess
from ..index import check_k, load_index
from ..models import load_checkpoint
from ..models.frozen import FreezeError, freeze_for_cpu
from . import contract as c


# -- shared helpers -------------------------------------------------------------------------------------------------
def _threads_per_instance(model_config: dict) -> int:
    """Cores / instances: each instance is its own process, and oversubscribed threads collapse throughput."""
    if os.environ.get("MILDNET_TORCH_THREADS"):
        return max(1, int(os.environ["MILDNET_TORCH_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    instances = sum(int(g.get("count", 1)) for g in model_config.get("instance_group", [{}])) or 1
    return max(1, cores // instances)


def _error(pb_utils, message: str, invalid_arg: bool = True):
    code = getattr(getattr(pb_utils, "TritonError", None), "INVALID_ARG", None) if invalid_arg else None
    try:
        err = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    except TypeError:  # older backends: message only
        err = pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def _bytes_rows(array: np.ndarray) -> list[bytes]:
    """A TYPE_STRING input ``[N, 1]`` (numpy object array) -> N byte strings."""
    return [bytes(v) if not isinstance(v, str) else v.encode() for v in array.reshape(-1)]


def _guarded(execute):
    """``execute`` that answers every request with a plain error, instead of Triton's traceback, when it fails
    in a way its own checks did not foresee (RecursionError, MemoryError, a bug)."""
    @functools.wraps(execute)
    def wrapper(self, requests: list) -> list:
        try:
            return execute(self, requests)
        except Exception as e:
            traceback.print_exc()  # to the server's log, not to the client
            return _unexpected(self.pb, requests, e)
    return wrapper


def degenerate_embedding(vectors) -> str | None:
    """None if every row of ``vectors`` ([n, D], numpy or torch) is finite and non-zero, else what is wrong:
    such a vector matches nothing meaningfully and, stored in an index, poisons every search that meets it."""
    a = np.asarray(vectors.cpu() if hasattr(vectors, "cpu") else vectors, dtype=np.float64)
    if not np.isfinite(a).all():
        return "a non-finite embedding (NaN or inf)"
    if (np.linalg.norm(a.reshape(len(a), -1), axis=1) < 1e-6).any():
        return "an all-zero embedding"
    return None


def _decode_request(rows: list[bytes], spec) -> list:
    """One request's images -> pixel tensors; the request's decode budget is checked from the headers first.
    Raises ImageDecodeError (a ValueError) naming the image and the problem."""
    labels = [f"image {j}" if len(rows) > 1 else "image" for j in range(len(rows))]
    check_request(rows, min_size=needed_size(spec), names=labels)
    return [preprocess(b, spec, name=label) for b, label in zip(rows, labels)]


def _to_torch(pb_utils, tensor):
    """A pb_utils.Tensor -> torch.Tensor without a copy (DLPack: stays on the GPU when it is there)."""
    if tensor.is_cpu():
        return torch.from_numpy(tensor.as_numpy())
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


# -- mildnet: pixels -> embeddings ----------------------------------------------------------------------------------
class EmbedderModel:
    """The ``mildnet`` Triton model: one forward pass per batch of requests."""

    def __init__(self, args: dict, pb_utils):
        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        self.info = c.ServedModel.from_parameters(c.config_parameters(self.config), version=args["model_version"],
                                                  where=f"model {self.config.get('name', '?')!r}")
        torch.set_num_threads(_threads_per_instance(self.config))
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{args.get('model_instance_device_id', 0)}")
        else:
            self.device = torch.device("cpu")
        model = load_checkpoint(version_dir / c.WEIGHTS_FILE)
        if model.embedding_dim != self.info.embedding_dim or model.spec != self.info.spec:
            raise c.ContractError(f"{version_dir}: weights and config.pbtxt disagree (dim {model.embedding_dim} vs "
                                  f"{self.info.embedding_dim}, or the spec); re-export the model")
        self.model = model.to(self.device).eval()
        s = self.info.spec.input_size
        self.input_shape = (3, s, s)
        params = c.config_parameters(self.config)
        self.forward_batch = int(params.get(c.FORWARD_BATCH_PARAM) or 0)
        self.forward = self.model
        if self.device.type == "cpu" and params.get(c.FREEZE_PARAM) == "yes":
            try:
                self.forward = freeze_for_cpu(self.model, self.input_shape)
            except FreezeError as e:  # eager gives the same answers, only slower
                print(f"{self.config.get('name', '?')}: serving the eager model: {e}", file=sys.stderr, flush=True)
        # Generous (100 widths of a real image's range on each side): random or augmented test pixels pass; what
        # overflows the network (1e38) does not.
        lo, hi = self.info.spec.pixel_range()
        self.pixel_bounds = (lo - 100 * (hi - lo), hi + 100 * (hi - lo))

    def _check(self, x) -> str | None:
        """None if ``x`` (a torch tensor) is a valid PIXELS batch, else the reason."""
        if x.dtype != torch.float32:
            return f"PIXELS must be FP32, got {x.dtype}"
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            return (f"PIXELS must have shape [batch, {', '.join(map(str, self.input_shape))}] "
                    f"(model {self.info.variant} v{self.info.version}), got {list(x.shape)}")
        if not x.numel():
            return None
        # One pass over the pixels: NaN fails both comparisons and an infinity the bounds, so the rarer
        # questions (which, how many) are asked only of a batch that fails.
        low, high = (float(v) for v in torch.aminmax(x))
        lo, hi = self.pixel_bounds
        if lo <= low and high <= hi:
            return None
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            return f"PIXELS holds {bad} NaN or infinite value(s); send finite, normalised pixels"
        # Far outside what a real image normalises to (e.g. 1e38): activations overflow into a zero vector
        return (f"PIXELS values must lie within [{lo:.3g}, {hi:.3g}] (pixels normalised with the model's "
                f"spec), got [{low:.3g}, {high:.3g}]")

    @_guarded
    def execute(self, requests: list) -> list:
        pb = self.pb
        responses: list = [None] * len(requests)
        batch, owners = [], []
        for i, request in enumerate(requests):
            x = _to_torch(pb, pb.get_input_tensor_by_name(request, c.PIXELS))  # (n, 3, S, S)
            problem = self._check(x)
            if problem:
                responses[i] = _error(pb, problem)
            else:
                batch.append(x)
                owners.append(i)
        if batch:
            try:
                x = torch.cat(batch).to(self.device, non_blocking=True)  # (B, 3, S, S)
                step = self.forward_batch or len(x)
                with torch.inference_mode():  # passes of forward_batch images: (B, D), unit norm
                    y = torch.cat([self.forward(x[i:i + step]).float() for i in range(0, len(x), step)])
                if y.device.type == "cpu":
                    y = y.numpy()
                offset = 0
                for i, part in zip(owners, batch):
                    out = y[offset:offset + part.shape[0]]
                    offset += part.shape[0]
                    problem = degenerate_embedding(out)
                    if problem:  # e.g. pixels of 1e38: finite input, overflowing activations
                        responses[i] = _error(pb, f"PIXELS give {problem}; send normalised pixels "
                                                  f"(mean/std of the model's spec)")
                        continue
                    tensor = (pb.Tensor(c.EMBEDDING, np.ascontiguousarray(out)) if isinstance(out, np.ndarray)
                              else pb.Tensor.from_dlpack(c.EMBEDDING, torch.utils.dlpack.to_dlpack(out)))
                    responses[i] = pb.InferenceResponse(output_tensors=[tensor])
            except Exception as e:  # a failed forward fails this batch, not the server
                for i in owners:
                    responses[i] = _error(pb, f"forward pass failed: {type(e).__name__}: {e}", invalid_arg=False)
        return responses


# -- preprocess: bytes -> pixels ------------------------------------------------------------------------------------
class PreprocessModel:
    """The ``preprocess`` Triton model: decode + resize + normalise following the ``spec`` of its own config."""

    def __init__(self, args: dict, pb_utils):
        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        self.spec = c.spec_from_parameters(c.config_parameters(self.config), f"model {c.PREPROCESS_MODEL!r}")
        torch.set_num_threads(1)  # PIL does the work; torch only normalises

    @_guarded
    def execute(self, requests: list) -> list:
        pb = self.pb
        responses = []
        for request in requests:
            rows = _bytes_rows(pb.get_input_tensor_by_name(request, c.IMAGE).as_numpy())
            try:
                pixels = torch.stack(_decode_request(rows, self.spec))  # (n, 3, S, S)
            except ValueError as e:  # ImageDecodeError: this request only
                responses.append(_error(pb, str(e)))
                continue
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(c.PIXELS, pixels.numpy())]))
        return responses


# -- similar: bytes + k (+ filter) -> top-k from the index ------------------------------------------------------------
class ServerSideError(MildnetError, ValueError):
    """A request failed because of the server's own state (its index), not the request: not INVALID_ARG."""


class _IndexFile:
    """An index file, loaded through :func:`mildnet.index.load_index` and re-loaded when it changes on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple | None = None
        self.index = None
        self.error: str | None = None

    def get(self):
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            self.index, self._stamp = None, None
            raise ServerSideError(f"no index file {self.path.name!r} on the server: build one (client/index.py) "
                                  f"or set the `{c.INDEX_PATH_PARAM}` parameter / {c.INDEX_ENV}") from None
        if stamp != self._stamp:
            try:
                self.index, self.error = load_index(self.path), None
            except Exception as e:  # keep serving: every query says why until the file is fixed
                # The client sees the file's name and the problem, never the server's path (nor, through a
                # message, any bytes of the file): the full story goes to the server's log.
                print(f"similar: cannot load index {self.path}: {e}", flush=True)
                reason = str(e).replace(str(self.path), self.path.name)
                self.index, self.error = None, f"the server's index {self.path.name!r} is unusable: {reason}"
            self._stamp = stamp
        if self.index is None:
            raise ServerSideError(self.error or f"cannot load the server's index {self.path.name!r}")
        return self.index


def _filter_keys(index) -> set[str] | None:
    """Metadata keys a filter may use, or None when the index cannot say (then the index checks itself)."""
    for attr in ("filter_keys", "metadata_keys"):
        keys = getattr(index, attr, None)
        if keys is not None:
            return set(keys() if callable(keys) else keys)
    return None


MAX_FILTER_BYTES = 4096  # a filter is a few key = value pairs; anything bigger is a mistake or an attack
MAX_FILTER_KEYS = 32
FILTER_VALUE_TYPES = (str, int, float, bool, type(None))  # metadata equality: scalars only


def parse_filter(text: bytes | str | None, allowed: set[str] | None) -> dict | None:
    """``FILTER`` JSON -> dict; empty -> None. Raises ValueError naming the problem (bad JSON, too big, too
    deep, unknown keys, a value that is not a scalar); never anything else, whatever the input."""
    if text is None:
        return None
    if len(text) > MAX_FILTER_BYTES:
        raise ValueError(f"FILTER is {len(text)} bytes, more than the {MAX_FILTER_BYTES} allowed")
    try:
        text = text.decode() if isinstance(text, bytes) else text
    except UnicodeDecodeError:
        raise ValueError("FILTER is not UTF-8 text") from None
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except RecursionError:  # deep nesting: Python's parser gives up before we could look at it
        raise ValueError("FILTER is nested too deeply; it must be a flat JSON object such as "
                         "{\"category\": \"Apple\"}") from None
    except ValueError as e:
        raise ValueError(f"FILTER is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"FILTER must be a JSON object such as {{\"category\": \"Apple\"}}, got a JSON "
                         f"{type(value).__name__}")
    if len(value) > MAX_FILTER_KEYS:
        raise ValueError(f"FILTER has {len(value)} keys, more than the {MAX_FILTER_KEYS} allowed")
    for key, v in value.items():
        if not isinstance(v, FILTER_VALUE_TYPES):
            raise ValueError(f"FILTER value of {key[:64]!r} must be a string, number, boolean or null "
                             f"(metadata equality), got a JSON {type(v).__name__}")
    if allowed is not None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            shown = [k[:64] for k in unknown[:5]]
            raise ValueError(f"unknown FILTER keys {shown}{' ...' if len(unknown) > 5 else ''}; the catalogue's "
                             f"metadata has {sorted(allowed)}")
    return value or None


def _unexpected(pb_utils, requests: list, exc: BaseException) -> list:
    """Every request's answer when ``execute`` itself fails: the exception's type only, no traceback, no paths
    (Triton would otherwise send the Python traceback, file names included, to the client)."""
    return [_error(pb_utils, f"internal error while serving this request ({type(exc).__name__}); "
                             "see the server log", invalid_arg=False) for _ in requests]


class SimilarModel:
    """The ``similar`` Triton model (BLS): decode here, embed through the ``mildnet`` model, search the index."""

    def __init__(self, args: dict, pb_utils):
        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        params = c.config_parameters(self.config)
        self.served = c.ServedModel.from_parameters(params, where=f"model {c.SIMILAR_MODEL!r}")
        self.embed_model = params.get(c.EMBEDDING_MODEL_PARAM, c.EMBEDDING_MODEL)
        self.embed_batch = int(params.get(c.EMBEDDING_BATCH_PARAM, "32"))
        default_index = Path(args["model_repository"]) / c.INDEX_DIR / c.INDEX_FILE
        path = os.environ.get(c.INDEX_ENV) or params.get(c.INDEX_PATH_PARAM) or str(default_index)
        self.index_file = _IndexFile(Path(path))
        torch.set_num_threads(1)

    def _embed(self, pixels: np.ndarray) -> np.ndarray:
        """``[B, 3, S, S]`` -> ``[B, D]`` through the served embedding model (BLS), in chunks of its batch."""
        pb = self.pb
        out = []
        for start in range(0, len(pixels), self.embed_batch):
            request = pb.InferenceRequest(model_name=self.embed_model, requested_output_names=[c.EMBEDDING],
                                          inputs=[pb.Tensor(c.PIXELS, pixels[start:start + self.embed_batch])])
            response = request.exec()
            if response.has_error():
                raise RuntimeError(f"embedding model {self.embed_model}: {response.error().message()}")
            out.append(pb.get_output_tensor_by_name(response, c.EMBEDDING).as_numpy())
        return np.concatenate(out)

    def _parse(self, request, index, spec) -> tuple[list, int, list]:
        """One request -> (pixel tensors, k, filters); raises ValueError naming the problem."""
        pb = self.pb
        images = _bytes_rows(pb.get_input_tensor_by_name(request, c.IMAGE).as_numpy())
        ks = pb.get_input_tensor_by_name(request, c.K).as_numpy().reshape(-1)
        if len(ks) != len(images):
            raise ValueError(f"K has {len(ks)} rows but IMAGE has {len(images)}")
        if len(set(int(k) for k in ks)) != 1:
            raise ValueError(f"all rows of one request need the same K, got {sorted(set(ks.tolist()))}")
        k = check_k(int(ks[0]))  # 1..MAX_K; a k above the catalogue size gets all of it, as Index.search does
        ftensor = pb.get_input_tensor_by_name(request, c.FILTER)
        raw_filters = _bytes_rows(ftensor.as_numpy()) if ftensor is not None else [None] * len(images)
        allowed = _filter_keys(index)
        filters = [parse_filter(f, allowed) for f in raw_filters]
        pixels = _decode_request(images, spec)
        return pixels, k, filters

    @_guarded
    def execute(self, requests: list) -> list:
        pb = self.pb
        responses: list = [None] * len(requests)
        served = self.served
        try:
            index = self.index_file.get()
            if index.dim != served.embedding_dim:
                raise ServerSideError(f"index {self.index_file.path.name!r} holds {index.dim}-d vectors but model "
                                      f"{served.model_version} makes {served.embedding_dim}-d; rebuild it")
            index_version = getattr(index, "model_version", None)
            if index_version and index_version != served.model_version:
                raise ServerSideError(f"index {self.index_file.path.name!r} was built with model {index_version!r} but "
                                      f"the server serves {served.model_version!r}; rebuild the index")
        except ServerSideError as e:
            return [_error(pb, str(e), invalid_arg=False) for _ in requests]
        parsed = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = self._parse(request, index, served.spec)
            except ValueError as e:
                responses[i] = _error(pb, str(e))
        if parsed:
            try:
                pixels = torch.stack([p for i in parsed for p in parsed[i][0]]).numpy()  # (B, 3, S, S)
                vectors = self._embed(pixels)  # (B, D): one BLS call for the whole batch
            except Exception as e:
                for i in parsed:
                    responses[i] = _error(pb, str(e), invalid_arg=False)
                return responses
            offset = 0
            for i, (rows, k, filters) in parsed.items():
                q = vectors[offset:offset + len(rows)]
                offset += len(rows)
                try:
                    hits = [index.search(q[j:j + 1], k, filter=filters[j])[0] for j in range(len(rows))]
                except ValueError as e:  # the index's own check (e.g. a filter it cannot apply)
                    responses[i] = _error(pb, str(e))
                    continue
                # min(k, catalogue size) columns: never an array of the requested k when the catalogue is smaller
                width = max(1, min(k, len(index)))
                responses[i] = pb.InferenceResponse(output_tensors=_hit_tensors(pb, hits, width))
        return responses


def _hit_tensors(pb, hits: list[list], k: int) -> list:
    """Per-row hit lists (a filter may leave fewer than k) -> ``IDS``/``SCORES``/``METADATA`` ``[n, k]``, padded
    with empty ids."""
    n = len(hits)
    ids = np.full((n, k), b"", dtype=object)
    scores = np.full((n, k), np.nan, dtype=np.float32)
    meta = np.full((n, k), b"", dtype=object)
    for r, row in enumerate(hits):
        for col, hit in enumerate(row[:k]):
            ids[r, col] = hit.id.encode()
            scores[r, col] = hit.score
            meta[r, col] = json.dumps(hit.metadata, sort_keys=True).encode()
    return [pb.Tensor(c.IDS, ids), pb.Tensor(c.SCORES, scores), pb.Tensor(c.METADATA, meta)]


MODEL_CLASSES = {c.EMBEDDER: EmbedderModel, c.PREPROCESSOR: PreprocessModel, c.SEARCHER: SimilarModel}


def create_model(args: dict, pb_utils):
    """The model a config asks for (its ``mildnet_python_model`` parameter), built from Triton's ``args``."""
    config = json.loads(args["model_config"])
    kind = c.config_parameters(config).get(c.PYTHON_MODEL_PARAM)
    if kind not in MODEL_CLASSES:
        raise c.ContractError(f"model {config.get('name', '?')!r}: parameter {c.PYTHON_MODEL_PARAM!r} is "
                              f"{kind!r}, expected one of {sorted(MODEL_CLASSES)}; re-export (`mildnet export`)")
    return MODEL_CLASSES[kind](args, pb_utils)
