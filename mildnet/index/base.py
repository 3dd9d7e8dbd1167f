"""The index interface every backend implements, the :class:`Hit` it returns and the errors it raises.

An index maps string ids to unit-norm embeddings ``float32[D]`` (plus a JSON-able metadata dict per id) and
answers top-k inner-product queries, optionally restricted to items whose metadata equals given values
(``{"category": "Apple"}``). It belongs to exactly one model version: embeddings of two models live in
different spaces, so mixing them would return nonsense silently.
"""
from __future__ import annotations

import abc
import functools
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import MildnetError, UsageError

METRICS = ("ip",)  # inner product == cosine similarity for the unit-norm embeddings MILDNet produces
MAX_ID_LENGTH = 512
# Most results one query may ask for, everywhere (Index.search, the `similar` Triton model, client/query.py).
# A k above the catalogue size is fine (min(k, n) results come back); a k above this is a mistake or an abuse
# (a 2^31 k would make the server allocate per-query arrays of that size), refused with a clear error.
MAX_K = 10_000


class IndexFileError(MildnetError, ValueError):
    """An index file is missing, truncated, corrupted or of an unknown format; never served."""


class ModelVersionError(MildnetError, ValueError):
    """Embeddings of a different model version were about to be mixed into an index."""


class UnknownFilterKeyError(MildnetError, ValueError):
    """A search filter names a metadata key that no item in the index has."""


class DuplicateIdError(MildnetError, ValueError):
    """``add`` was given an id that the index (or the same call) already holds."""


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which made building the hits of a
# 1,000-query batch cost as much as the IVF-PQ search itself at 1M items. Every search returns fresh Hits.
@dataclass(slots=True)
class Hit:
    """One search result: the item's id, its similarity to the query (higher is closer) and its metadata."""

    id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "metadata": self.metadata}


def check_k(k: Any) -> int:
    """``k`` as an int if it is a valid number of results (1..MAX_K), else a ValueError saying why."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"k must be a positive integer, got {k!r}")
    if k > MAX_K:
        raise UsageError(f"k must be at most {MAX_K} results per query, got {k}")
    return int(k)


def filter_token(value: Any) -> str:
    """A hashable, type-exact key for a metadata value (``1`` and ``"1"`` differ, as in Milvus' JSON)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _locked(method):
    """Run ``method`` holding the index's lock (re-entrant: locked methods call each other)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    wrapper._locked = True
    return wrapper


# Every public read or write of an index holds its lock. FAISS releases the GIL, so without it a search racing
# a remove or a rebuild reads labels that are gone (KeyError) or freed graph memory (HNSW segfault); a save
# racing an add would write ids and vectors of two different moments. One re-entrant lock per index: searches
# of one index run one at a time (FAISS parallelises each search itself), writers never overlap them. save()
# takes its snapshot under the lock (to_payload, or len for Milvus) and writes the file outside it, so a slow
# disk does not stall searches.
_LOCKED_METHODS = ("__len__", "__contains__", "ids", "get", "metadata_keys", "present", "add", "remove",
                   "search", "to_payload", "describe")


class Index(abc.ABC):
    """Top-k inner-product search over string ids. Subclasses: :class:`~mildnet.index.faiss_index.FaissIndex`,
    :class:`~mildnet.index.milvus_index.MilvusIndex`.

    Args:
        dim: embedding dimension D.
        model_version: identifies the model that produced the embeddings (e.g. ``"mildnet_mobile:3"``).
        metric: only ``"ip"`` (cosine on unit-norm vectors).
    """

    backend: str = "?"

    def __init_subclass__(cls, **kwargs) -> None:
        # Wrap here, once, so a backend cannot forget the lock on a method it adds or overrides.
        super().__init_subclass__(**kwargs)
        for name in _LOCKED_METHODS:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "_locked", False):
                setattr(cls, name, _locked(method))

    def __init__(self, dim: int, *, model_version: str, metric: str = "ip") -> None:
        self._lock = threading.RLock()
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"index dim must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise UsageError(f"metric {metric!r} is not supported (supported: {', '.join(METRICS)})")
        if not isinstance(model_version, str) or not model_version:
            raise ValueError("an index needs a non-empty model_version (the model that made its embeddings)")
        self.dim = int(dim)
        self.model_version = model_version
        self.metric = metric

    # ---- what every backend implements -------------------------------------------------------------
    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __contains__(self, item_id: object) -> bool: ...

    @abc.abstractmethod
    def ids(self) -> list[str]:
        """All live ids, in insertion order."""

    @abc.abstractmethod
    def _add(self, ids: list[str], vectors: np.ndarray, metadata: list[dict]) -> None: ...

    @abc.abstractmethod
    def _remove(self, ids: list[str]) -> None: ...

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int, filter: dict | None) -> list[list[Hit]]: ...

    @abc.abstractmethod
    def metadata_keys(self) -> set[str]:
        """Every metadata key some live item has: the keys a filter may use."""

    @abc.abstractmethod
    def save(self, path) -> None:
        """Write the index atomically (see :mod:`mildnet.index.store`)."""

    # ---- shared validation ---------------------------------------------------------------------------
    @_locked
    def add(self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict] | None = None, *,
            model_version: str | None = None) -> None:
        """Add ``len(ids)`` items. ``vectors``: ``float32[N, D]``. ``metadata``: one JSON-able dict per id.

        ``model_version``, when given, must equal the index's (refuses to mix embedding spaces).
        Raises :class:`DuplicateIdError` for an id already present (remove it first).
        """
        if model_version is not None and model_version != self.model_version:
            raise ModelVersionError(f"refusing to add embeddings of model version {model_version!r} to an index "
                                    f"built with {self.model_version!r}: rebuild the index with one model")
        ids = [self._check_id(i) for i in ids]
        vectors = self._check_vectors(vectors, "vectors")
        if vectors.shape[0] != len(ids):
            raise ValueError(f"got {len(ids)} ids but {vectors.shape[0]} vectors")
        if metadata is None:
            metadata = [{} for _ in ids]
        metadata = list(metadata)
        if len(metadata) != len(ids):
            raise ValueError(f"got {len(ids)} ids but {len(metadata)} metadata dicts")
        for i, m in zip(ids, metadata):
            if not isinstance(m, dict):
                raise ValueError(f"metadata of id {i!r} must be a dict, got {type(m).__name__}")
            try:
                json.dumps(m)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metadata of id {i!r} is not JSON-serialisable: {e}") from None
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DuplicateIdError(f"id {dup!r} appears more than once in one add() call")
        present = self.present(ids)
        if present:
            raise DuplicateIdError(f"{len(present)} id(s) already in the index (e.g. {present[0]!r}): "
                                   "remove them first to replace them")
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            raise ValueError(f"refusing to store a NaN or infinite vector (id {ids[int(np.argmin(finite))]!r}); "
                             "nothing was added")
        zero = np.linalg.norm(vectors, axis=1) == 0
        if zero.any():  # matches everything equally: a search that meets it ranks noise
            raise ValueError(f"refusing to store an all-zero vector (id {ids[int(np.argmax(zero))]!r}); "
                             "nothing was added")
        if ids:
            self._add(ids, vectors, [dict(m) for m in metadata])

    @_locked
    def present(self, ids: Sequence[str]) -> list[str]:
        """Those of ``ids`` that the index holds, in order (one batched lookup on remote backends)."""
        return [i for i in ids if i in self]

    @_locked
    def remove(self, ids: Iterable[str]) -> int:
        """Remove the given ids without a rebuild; returns how many. Any unknown id: ValueError, nothing removed."""
        ids = list(dict.fromkeys(ids))
        present = set(self.present(ids))
        missing = [i for i in ids if i not in present]
        if missing:
            raise UsageError(f"{len(missing)} id(s) not in the index (e.g. {missing[0]!r})")
        if ids:
            self._remove(ids)
        return len(ids)

    @_locked
    def search(self, queries: np.ndarray, k: int = 10, filter: dict | None = None) -> list[list[Hit]]:
        """Top-``k`` items per query, best first. ``queries``: ``float32[Q, D]`` (or ``[D]`` for one).

        ``filter``: metadata equality, e.g. ``{"category": "Apple"}``; all keys must match. Exactly
        ``min(k, number of matching items)`` hits come back per query; ``k`` above :data:`MAX_K` is refused.
        """
        k = check_k(k)
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None]
        queries = self._check_vectors(queries, "queries")
        if filter:
            if not isinstance(filter, dict):
                raise UsageError(f"filter must be a dict of metadata key -> value, got {type(filter).__name__}")
            unknown = sorted(set(filter) - self.metadata_keys())
            if unknown:
                known = ", ".join(sorted(self.metadata_keys())) or "none"
                raise UnknownFilterKeyError(f"unknown filter key(s) {unknown}: this index's items have the "
                                            f"metadata keys: {known}")
        if queries.shape[0] == 0 or len(self) == 0:
            return [[] for _ in range(queries.shape[0])]
        return self._search(np.ascontiguousarray(queries, dtype=np.float32), int(k), filter or None)

    def _check_vectors(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape [N, {self.dim}], got {list(x.shape)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{what} must be floating point, got {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32)

    @staticmethod
    def _check_id(item_id: Any) -> str:
        if not isinstance(item_id, str) or not item_id:
            raise ValueError(f"ids must be non-empty strings, got {item_id!r}")
        if len(item_id) > MAX_ID_LENGTH:
            raise ValueError(f"id longer than {MAX_ID_LENGTH} characters: {item_id[:40]!r}...")
        return item_id

    @_locked
    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "dim": self.dim, "model_version": self.model_version,
                "metric": self.metric, "count": len(self)}

    def __repr__(self) -> str:
        d = self.describe()
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in d.items() if k != "backend") + ")"


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with numpy: ``(scores[Q, k'], rows[Q, k'])``, ``k' = min(k, N)``, best first."""
    k = min(k, base.shape[0])
    s = queries @ base.T  # (Q, N)
    part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(s.shape[1]), (len(s), 1))
    ps = np.take_along_axis(s, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(ps, order, 1), np.take_along_axis(part, order, 1)


__all__ = ["Hit", "Index", "IndexFileError", "ModelVersionError", "UnknownFilterKeyError", "DuplicateIdError",
           "filter_token", "exact_topk", "check_k", "METRICS", "MAX_K"]
