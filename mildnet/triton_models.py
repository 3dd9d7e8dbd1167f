"""The logic of the Triton Python models in ``model_repository/``; each ``model.py`` there is a thin shell.

Every class takes Triton's ``pb_utils`` module as an argument (it exists only inside the server's Python stub),
so ``mildnet`` stays importable, and these classes testable, without Triton.

* :class:`EmbedderModel` (``mildnet``): ``PIXELS`` FP32 ``[N, 3, S, S]`` -> ``EMBEDDING`` FP32 ``[N, D]``.
  Dynamic batching hands ``execute`` a LIST of requests: it concatenates them into ONE forward pass and splits
  the result back, one response per request.
* :class:`PreprocessModel` (``preprocess``): ``IMAGE`` bytes ``[N, 1]`` -> ``PIXELS`` ``[N, 3, S, S]`` with
  :func:`mildnet.imageio.preprocess` and the spec that ``mildnet export`` wrote beside the served weights.
* :class:`SimilarModel` (``similar``, BLS): ``IMAGE`` + ``K`` (+ ``FILTER``) -> ``IDS``/``SCORES``/``METADATA``
  from an index file (:func:`mildnet.index.load_index`), reloaded when the file changes.

A bad request (undecodable image, wrong shape, bad k) gets its own error response; the rest of the batch and
the server carry on.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EXPORT_INFO_FILE = "spec.json"  # written by mildnet.export, read here: the one source of preprocessing truth
WEIGHTS_FILE = "model.pt"


# -- the export's spec.json ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedModelInfo:
    """What ``mildnet export`` wrote beside one version's weights (``<model>/<version>/spec.json``)."""

    version: int
    variant: str
    embedding_dim: int
    spec: Any  # mildnet.spec.PreprocessSpec
    model_version: str  # "<variant>-<sha256[:12] of the source checkpoint>": the identity an index records
    raw: dict

    @classmethod
    def read(cls, version_dir: Path) -> "ServedModelInfo":
        from .spec import PreprocessSpec

        path = Path(version_dir) / EXPORT_INFO_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the exported model description ({e})") from None
        return cls(version=int(raw["version"]), variant=raw["variant"], embedding_dim=int(raw["embedding_dim"]),
                   spec=PreprocessSpec.from_dict(raw["spec"]), model_version=raw["model_version"], raw=raw)


def version_dirs(model_dir: Path) -> list[Path]:
    """Numbered version folders of a model, oldest first."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def latest_export(model_dir: Path) -> ServedModelInfo:
    """The newest version of ``model_dir`` that carries a spec.json (what Triton's ``latest`` policy serves)."""
    for d in reversed(version_dirs(model_dir)):
        if (d / EXPORT_INFO_FILE).is_file():
            return ServedModelInfo.read(d)
    raise ValueError(f"{model_dir}: no exported version (run `mildnet export`)")


class _LatestSpec:
    """Tracks the latest exported version of the embedding model; re-reads spec.json when a new one appears."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._key: tuple | None = None
        self._info: ServedModelInfo | None = None

    def get(self) -> ServedModelInfo:
        dirs = [d for d in version_dirs(self.model_dir) if (d / EXPORT_INFO_FILE).is_file()]
        key = (dirs[-1].name, (dirs[-1] / EXPORT_INFO_FILE).stat().st_mtime_ns) if dirs else None
        if key is None:
            raise ValueError(f"{self.model_dir}: no exported version (run `mildnet export`)")
        if key != self._key:
            self._info, self._key = ServedModelInfo.read(dirs[-1]), key
        assert self._info is not None
        return self._info


# -- shared helpers -------------------------------------------------------------------------------------------------
def _parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


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
    import functools

    @functools.wraps(execute)
    def wrapper(self, requests: list) -> list:
        try:
            return execute(self, requests)
        except Exception as e:
            import traceback

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
    from .imageio import check_request, needed_size, preprocess

    labels = [f"image {j}" if len(rows) > 1 else "image" for j in range(len(rows))]
    check_request(rows, min_size=needed_size(spec), names=labels)
    return [preprocess(b, spec, name=label) for b, label in zip(rows, labels)]


def _to_torch(pb_utils, tensor):
    """A pb_utils.Tensor -> torch.Tensor without a copy (DLPack: stays on the GPU when it is there)."""
    import torch

    if tensor.is_cpu():
        return torch.from_numpy(tensor.as_numpy())
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


# -- mildnet: pixels -> embeddings ----------------------------------------------------------------------------------
class EmbedderModel:
    """The ``mildnet`` Triton model: one forward pass per batch of requests."""

    def __init__(self, args: dict, pb_utils):
        import torch

        from .models import load_checkpoint

        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        self.info = ServedModelInfo.read(version_dir)
        torch.set_num_threads(_threads_per_instance(self.config))
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{args.get('model_instance_device_id', 0)}")
        else:
            self.device = torch.device("cpu")
        model = load_checkpoint(version_dir / WEIGHTS_FILE)
        if model.embedding_dim != self.info.embedding_dim or model.spec != self.info.spec:
            raise ValueError(f"{version_dir}: weights and spec.json disagree (dim {model.embedding_dim} vs "
                             f"{self.info.embedding_dim}); re-export the model")
        self.model = model.to(self.device).eval()
        s = self.info.spec.input_size
        self.input_shape = (3, s, s)
        # Generous (100 widths of a real image's range on each side): random or augmented test pixels pass; what
        # overflows the network (1e38) does not.
        lo, hi = self.info.spec.pixel_range()
        self.pixel_bounds = (lo - 100 * (hi - lo), hi + 100 * (hi - lo))

    def _check(self, x) -> str | None:
        """None if ``x`` (a torch tensor) is a valid PIXELS batch, else the reason."""
        import torch

        if x.dtype != torch.float32:
            return f"PIXELS must be FP32, got {x.dtype}"
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            return (f"PIXELS must have shape [batch, {', '.join(map(str, self.input_shape))}] "
                    f"(model {self.info.variant} v{self.info.version}), got {list(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            return f"PIXELS holds {bad} NaN or infinite value(s); send finite, normalised pixels"
        lo, hi = self.pixel_bounds
        if x.numel() and (float(x.min()) < lo or float(x.max()) > hi):
            # Far outside what a real image normalises to (e.g. 1e38): activations overflow into a zero vector
            return (f"PIXELS values must lie within [{lo:.3g}, {hi:.3g}] (pixels normalised with the model's "
                    f"spec.json), got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
        return None

    @_guarded
    def execute(self, requests: list) -> list:
        import torch

        pb = self.pb
        responses: list = [None] * len(requests)
        batch, owners = [], []
        for i, request in enumerate(requests):
            x = _to_torch(pb, pb.get_input_tensor_by_name(request, "PIXELS"))  # (n, 3, S, S)
            problem = self._check(x)
            if problem:
                responses[i] = _error(pb, problem)
            else:
                batch.append(x)
                owners.append(i)
        if batch:
            try:
                x = torch.cat(batch).to(self.device, non_blocking=True)  # (B, 3, S, S): ONE forward pass
                with torch.inference_mode():
                    y = self.model(x).float()  # (B, D), unit norm
                if y.device.type == "cpu":
                    y = y.numpy()
                offset = 0
                for i, part in zip(owners, batch):
                    out = y[offset:offset + part.shape[0]]
                    offset += part.shape[0]
                    problem = degenerate_embedding(out)
                    if problem:  # e.g. pixels of 1e38: finite input, overflowing activations
                        responses[i] = _error(pb, f"PIXELS give {problem}; send normalised pixels "
                                                  f"(mean/std of the model's spec.json)")
                        continue
                    tensor = (pb.Tensor("EMBEDDING", np.ascontiguousarray(out)) if isinstance(out, np.ndarray)
                              else pb.Tensor.from_dlpack("EMBEDDING", torch.utils.dlpack.to_dlpack(out)))
                    responses[i] = pb.InferenceResponse(output_tensors=[tensor])
            except Exception as e:  # a failed forward fails this batch, not the server
                for i in owners:
                    responses[i] = _error(pb, f"forward pass failed: {type(e).__name__}: {e}", invalid_arg=False)
        return responses


# -- preprocess: bytes -> pixels ------------------------------------------------------------------------------------
class PreprocessModel:
    """The ``preprocess`` Triton model: decode + resize + normalise following the served model's spec.json."""

    def __init__(self, args: dict, pb_utils):
        import torch

        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        params = _parameters(self.config)
        embed_model = params.get("embedding_model", "mildnet")
        torch.set_num_threads(1)  # PIL does the work; torch only normalises
        self.spec_source = _LatestSpec(Path(args["model_repository"]).parent / embed_model)
        self.spec_source.get()  # fail at load time, clearly, when nothing is exported yet

    @_guarded
    def execute(self, requests: list) -> list:
        import torch

        pb = self.pb
        responses = []
        spec = self.spec_source.get().spec
        for request in requests:
            rows = _bytes_rows(pb.get_input_tensor_by_name(request, "IMAGE").as_numpy())
            try:
                pixels = torch.stack(_decode_request(rows, spec))  # (n, 3, S, S)
            except ValueError as e:  # ImageDecodeError: this request only
                responses.append(_error(pb, str(e)))
                continue
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("PIXELS", pixels.numpy())]))
        return responses


# -- similar: bytes + k (+ filter) -> top-k from the index ------------------------------------------------------------
class ServerSideError(ValueError):
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
                                  "or set the `index_path` parameter / MILDNET_INDEX") from None
        if stamp != self._stamp:
            from .index import load_index

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
        import torch

        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        params = _parameters(self.config)
        self.embed_model = params.get("embedding_model", "mildnet")
        self.embed_batch = int(params.get("embedding_batch", "32"))
        default_index = Path(args["model_repository"]) / "index" / "catalogue.mindex"
        path = os.environ.get("MILDNET_INDEX") or params.get("index_path") or str(default_index)
        self.index_file = _IndexFile(Path(path))
        torch.set_num_threads(1)
        self.spec_source = _LatestSpec(Path(args["model_repository"]).parent / self.embed_model)
        self.spec_source.get()

    def _embed(self, pixels: np.ndarray) -> np.ndarray:
        """``[B, 3, S, S]`` -> ``[B, D]`` through the served embedding model (BLS), in chunks of its batch."""
        pb = self.pb
        out = []
        for start in range(0, len(pixels), self.embed_batch):
            request = pb.InferenceRequest(model_name=self.embed_model, requested_output_names=["EMBEDDING"],
                                          inputs=[pb.Tensor("PIXELS", pixels[start:start + self.embed_batch])])
            response = request.exec()
            if response.has_error():
                raise RuntimeError(f"embedding model {self.embed_model}: {response.error().message()}")
            out.append(pb.get_output_tensor_by_name(response, "EMBEDDING").as_numpy())
        return np.concatenate(out)

    def _parse(self, request, index, spec) -> tuple[list, int, list]:
        """One request -> (pixel tensors, k, filters); raises ValueError naming the problem."""
        from .index import check_k

        pb = self.pb
        images = _bytes_rows(pb.get_input_tensor_by_name(request, "IMAGE").as_numpy())
        ks = pb.get_input_tensor_by_name(request, "K").as_numpy().reshape(-1)
        if len(ks) != len(images):
            raise ValueError(f"K has {len(ks)} rows but IMAGE has {len(images)}")
        if len(set(int(k) for k in ks)) != 1:
            raise ValueError(f"all rows of one request need the same K, got {sorted(set(ks.tolist()))}")
        k = check_k(int(ks[0]))  # 1..MAX_K; a k above the catalogue size gets all of it, as Index.search does
        ftensor = pb.get_input_tensor_by_name(request, "FILTER")
        raw_filters = _bytes_rows(ftensor.as_numpy()) if ftensor is not None else [None] * len(images)
        allowed = _filter_keys(index)
        filters = [parse_filter(f, allowed) for f in raw_filters]
        pixels = _decode_request(images, spec)
        return pixels, k, filters

    @_guarded
    def execute(self, requests: list) -> list:
        import torch

        pb = self.pb
        responses: list = [None] * len(requests)
        try:
            index = self.index_file.get()
            served = self.spec_source.get()
            if index.dim != served.embedding_dim:
                raise ServerSideError(f"index {self.index_file.path.name!r} holds {index.dim}-d vectors but model "
                                 f"{served.variant} v{served.version} makes {served.embedding_dim}-d; rebuild it")
            index_version = getattr(index, "model_version", None)
            if index_version and index_version != served.model_version:
                raise ServerSideError(f"index {self.index_file.path.name!r} was built with model {index_version!r} but the "
                                 f"server serves {served.model_version!r}; rebuild the index")
        except ServerSideError as e:
            return [_error(pb, str(e), invalid_arg=False) for _ in requests]
        except ValueError as e:  # spec.json of the served model
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
        for c, hit in enumerate(row[:k]):
            ids[r, c] = hit.id.encode()
            scores[r, c] = hit.score
            meta[r, c] = json.dumps(hit.metadata, sort_keys=True).encode()
    return [pb.Tensor("IDS", ids), pb.Tensor("SCORES", scores), pb.Tensor("METADATA", meta)]
