"""FAISS backend: the embedded default.

Kinds:
* ``flat``: exact inner-product search (``IndexFlatIP``). Best for small catalogues.
* ``hnsw``: graph ANN (``IndexHNSWFlat``); params ``hnsw_m``, ``ef_construction``, ``ef_search``.
* ``auto`` (default): ``flat`` below ``auto_threshold`` live items, ``hnsw`` from there on (the index
  switches once, when an ``add`` crosses the threshold). The threshold and HNSW defaults come from
  ``bench/retrieval.py`` (see docs/retrieval.md).

String ids map to our own int64 labels (a counter) through an ``IndexIDMap2``. Removal needs no rebuild:
``flat`` deletes rows in place; HNSW graphs cannot drop nodes, so removed labels become tombstones that an
``IDSelector`` hides from every search (compacted by a rebuild once they pass a quarter of the graph).

Filters (metadata equality) turn into the set of matching labels (an inverted index per key) and reach FAISS
as an ``IDSelectorBatch``: ``flat`` then searches exactly among the matches. HNSW may find fewer than k
matches when the filter is very selective; those queries fall back to an exact search over the matching
vectors, so ``min(k, matches)`` hits always come back.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import faiss
import numpy as np

from .base import Hit, Index, IndexFileError, exact_topk, filter_token
from .store import IndexPayload, write_index_file

KINDS = ("auto", "flat", "hnsw")
# Chosen from bench/results/retrieval.json: below this many items exact search is fast enough (and exact).
AUTO_THRESHOLD = 100_000
DEFAULT_PARAMS: dict[str, Any] = {
    "auto_threshold": AUTO_THRESHOLD,
    "hnsw_m": 32,
    "ef_construction": 80,
    "ef_search": 128,
}
_TOMBSTONE_REBUILD_FRACTION = 0.25


class FaissIndex(Index):
    """Inner-product top-k search in process (see module docstring). ``params`` override DEFAULT_PARAMS."""

    backend = "faiss"

    def __init__(self, dim: int, *, model_version: str, kind: str = "auto", metric: str = "ip",
                 **params: Any) -> None:
        super().__init__(dim, model_version=model_version, metric=metric)
        if kind not in KINDS:
            raise ValueError(f"faiss index kind {kind!r} is not one of {KINDS}")
        unknown = set(params) - set(DEFAULT_PARAMS)
        if unknown:
            raise ValueError(f"unknown faiss index parameter(s) {sorted(unknown)} "
                             f"(known: {', '.join(DEFAULT_PARAMS)})")
        self.params = {**DEFAULT_PARAMS, **params}
        for name, value in self.params.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"faiss index parameter {name} must be a positive integer, got {value!r}")
        self.kind = kind
        self._label_of: dict[str, int] = {}  # id -> label, in insertion order
        self._id_of: dict[int, str] = {}
        self._meta: dict[int, dict] = {}
        self._inverted: dict[str, dict[str, set[int]]] = {}  # key -> value token -> labels
        self._key_counts: Counter[str] = Counter()
        self._deleted: set[int] = set()  # HNSW tombstones
        self._next_label = 0
        self._built_kind = "flat" if kind in ("auto", "flat") else kind
        self._index = self._new_faiss_index(self._built_kind)

    # ---- construction --------------------------------------------------------------------------------
    def _new_faiss_index(self, kind: str) -> faiss.IndexIDMap2:
        if kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        else:
            inner = faiss.IndexHNSWFlat(self.dim, int(self.params["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = int(self.params["ef_construction"])
            inner.hnsw.efSearch = int(self.params["ef_search"])
        return faiss.IndexIDMap2(inner)

    @property
    def built_kind(self) -> str:
        """The structure in use now (``flat`` or ``hnsw``); differs from ``kind`` when that is ``auto``."""
        return self._built_kind

    def _rebuild(self, kind: str) -> None:
        labels = np.fromiter(self._label_of.values(), dtype=np.int64, count=len(self._label_of))
        vectors = self._vectors_of(labels)
        self._index = self._new_faiss_index(kind)
        self._built_kind = kind
        self._deleted.clear()
        if len(labels):
            self._index.add_with_ids(vectors, labels)

    def _vectors_of(self, labels: np.ndarray) -> np.ndarray:
        """Exact stored vectors ``float32[len(labels), D]`` (IDMap2 keeps the label -> row map)."""
        if len(labels) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(self._index.reconstruct_batch(np.ascontiguousarray(labels, np.int64)))

    # ---- Index interface -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._label_of

    def ids(self) -> list[str]:
        return list(self._label_of)

    def metadata_keys(self) -> set[str]:
        return {k for k, c in self._key_counts.items() if c > 0}

    def get(self, item_id: str) -> tuple[np.ndarray, dict]:
        """The stored vector ``float32[D]`` and metadata of one id."""
        label = self._label_of[item_id]
        return self._vectors_of(np.array([label]))[0], dict(self._meta[label])

    def _add(self, ids: list[str], vectors: np.ndarray, metadata: list[dict]) -> None:
        labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
        self._index.add_with_ids(vectors, labels)
        self._next_label += len(ids)
        for item_id, label, meta in zip(ids, labels.tolist(), metadata):
            self._register(item_id, label, meta)
        if self.kind == "auto" and self._built_kind == "flat" and len(self) >= self.params["auto_threshold"]:
            self._rebuild("hnsw")

    def _register(self, item_id: str, label: int, meta: dict) -> None:
        self._label_of[item_id] = label
        self._id_of[label] = item_id
        self._meta[label] = meta
        for key, value in meta.items():  # inverted index: filters become label sets
            self._inverted.setdefault(key, {}).setdefault(filter_token(value), set()).add(label)
            self._key_counts[key] += 1

    def _remove(self, ids: list[str]) -> None:
        labels = [self._label_of.pop(i) for i in ids]
        for label in labels:
            del self._id_of[label]
            for key, value in self._meta.pop(label).items():
                bucket = self._inverted[key][filter_token(value)]
                bucket.discard(label)
                if not bucket:
                    del self._inverted[key][filter_token(value)]
                self._key_counts[key] -= 1
        if self._built_kind == "flat":
            self._index.remove_ids(np.asarray(labels, dtype=np.int64))
        else:  # HNSW cannot unlink nodes: hide them, compact when they pile up
            self._deleted.update(labels)
            if len(self._deleted) > _TOMBSTONE_REBUILD_FRACTION * self._index.ntotal:
                self._rebuild(self._built_kind)

    def _matching_labels(self, filter: dict) -> np.ndarray:
        sets = [self._inverted.get(key, {}).get(filter_token(value), set()) for key, value in filter.items()]
        sets.sort(key=len)
        match = set(sets[0])
        for s in sets[1:]:
            match &= s
        return np.fromiter(sorted(match), dtype=np.int64, count=len(match))

    def _search_params(self, selector) -> faiss.SearchParameters | None:
        if self._built_kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=int(self.params["ef_search"]))
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def _search(self, queries: np.ndarray, k: int, filter: dict | None) -> list[list[Hit]]:
        allowed = self._matching_labels(filter) if filter else None
        n_candidates = len(self) if allowed is None else len(allowed)
        want = min(k, n_candidates)
        if want == 0:
            return [[] for _ in range(len(queries))]
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed)
        elif self._deleted:
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._deleted, np.int64)))
        else:
            selector = None
        params = self._search_params(selector)
        if self._built_kind == "hnsw":  # efSearch must cover k or HNSW returns fewer
            params.efSearch = max(int(self.params["ef_search"]), want)
        scores, labels = self._index.search(queries, want, params=params)
        short = np.flatnonzero((labels < 0).any(axis=1))
        if len(short):  # HNSW missed matches under a selective filter: exact search over the candidates
            cand = allowed if allowed is not None else np.fromiter(self._label_of.values(), np.int64)
            s, rows = exact_topk(self._vectors_of(cand), queries[short], want)
            scores[short], labels[short] = s, cand[rows]
        return [[Hit(self._id_of[int(l)], float(s), dict(self._meta[int(l)]))
                 for s, l in zip(srow, lrow) if l >= 0] for srow, lrow in zip(scores, labels)]

    # ---- persistence ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kind": self.kind, "built_kind": self._built_kind, "params": self.params}

    def to_payload(self) -> IndexPayload:
        ids = self.ids()
        labels = np.array([self._label_of[i] for i in ids], dtype=np.int64)
        header: dict[str, Any] = {
            "backend": self.backend, "kind": self.kind, "metric": self.metric, "dim": self.dim,
            "model_version": self.model_version, "params": self.params,
            "ids": ids, "metadata": [self._meta[int(l)] for l in labels],
        }
        blob = b""
        if self._built_kind == "hnsw":  # keep the graph: rebuilding 1M nodes takes minutes
            header["faiss"] = {"built_kind": "hnsw", "labels": labels.tolist(),
                               "deleted": sorted(self._deleted), "next_label": self._next_label}
            blob = faiss.serialize_index(self._index).tobytes()
        return IndexPayload(header=header, vectors=self._vectors_of(labels), blob=blob)

    def save(self, path) -> None:
        write_index_file(path, self.to_payload())

    @classmethod
    def from_payload(cls, payload: IndexPayload, source: str = "index") -> "FaissIndex":
        h = payload.header
        try:
            index = cls(int(h["dim"]), model_version=h["model_version"], kind=h.get("kind", "auto"),
                        metric=h.get("metric", "ip"), **h.get("params", {}))
        except ValueError as e:
            raise IndexFileError(f"{source}: invalid index settings ({e})") from None
        saved = h.get("faiss")
        if saved and saved.get("built_kind") == "hnsw" and len(payload.blob):
            index._restore_graph(payload, saved, source)
        else:
            index._add_loaded(list(h["ids"]), payload.vectors, list(h["metadata"]))
        return index

    def _add_loaded(self, ids: list[str], vectors: np.ndarray, metadata: list[dict]) -> None:
        self._built_kind = "hnsw" if (self.kind == "hnsw" or (self.kind == "auto" and len(ids) >= self.params[
            "auto_threshold"])) else "flat"
        self._index = self._new_faiss_index(self._built_kind)
        if ids:
            self.add(ids, np.array(vectors, dtype=np.float32), metadata)

    def _restore_graph(self, payload: IndexPayload, saved: dict, source: str) -> None:
        h = payload.header
        labels = [int(x) for x in saved["labels"]]
        try:
            graph = faiss.deserialize_index(np.frombuffer(payload.blob, dtype=np.uint8))
        except RuntimeError as e:
            raise IndexFileError(f"{source}: stored FAISS graph is unreadable ({str(e)[:120]})") from None
        if (graph.d != self.dim or graph.ntotal != len(labels) + len(saved["deleted"])
                or len(labels) != len(h["ids"])):
            raise IndexFileError(f"{source}: stored FAISS graph does not match the header "
                                 f"(d={graph.d}, ntotal={graph.ntotal}, ids={len(h['ids'])})")
        self._index = faiss.downcast_index(graph) if not isinstance(graph, faiss.IndexIDMap2) else graph
        self._built_kind = "hnsw"
        self._deleted = set(int(x) for x in saved["deleted"])
        self._next_label = int(saved["next_label"])
        for item_id, label, meta in zip(h["ids"], labels, h["metadata"]):
            self._register(item_id, label, meta)
