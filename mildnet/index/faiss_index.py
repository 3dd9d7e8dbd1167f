"""FAISS backend: the embedded default.

Kinds:
* ``flat``: exact inner-product search (``IndexFlatIP``). Best for small catalogues.
* ``hnsw``: graph ANN (``IndexHNSWFlat``); params ``hnsw_m``, ``ef_construction``, ``ef_search``.
* ``ivfpq``: IVF (sqrt(N) lists, ``nprobe`` visited) over PQ codes shortlists ``k * rerank_factor`` items,
  which FAISS re-ranks with the exact vectors (kept in a flat store; one multi-threaded C++ call, as
  ``IndexRefineFlat`` does); retrained when the index grows 4x. Until it has
  ``IVFPQ_MIN_TRAIN`` items to train on, it searches exactly.
* ``auto`` (default): ``flat`` below ``auto_threshold``, ``hnsw`` up to ``ivfpq_threshold``, ``ivfpq`` above
  (the index switches when an ``add`` crosses a threshold). Thresholds and defaults come from
  ``bench/retrieval.py`` (see docs/scaling.md).

String ids map to our own int64 labels (a counter) through an ``IndexIDMap2``. Removal needs no rebuild:
``flat`` and ``ivfpq`` delete in place; HNSW graphs cannot drop nodes, so removed labels become tombstones
that an ``IDSelector`` hides from every search (compacted by a rebuild once they pass a quarter of the graph).

Filters (metadata equality) turn into the set of matching labels (an inverted index per key) and reach FAISS
as an ``IDSelectorBatch``: ``flat`` then searches exactly among the matches. HNSW and IVF-PQ may find fewer
than k matches when the filter is very selective; those queries fall back to an exact search over the matching
vectors, so ``min(k, matches)`` hits always come back.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import faiss
import numpy as np

from ..errors import UsageError
from .base import Hit, Index, IndexFileError, exact_topk, filter_token
from .store import IndexPayload, write_index_file

KINDS = ("auto", "flat", "hnsw", "ivfpq")
# From bench/results/retrieval.json (docs/scaling.md), 512-d, 2 threads: one exact query scans every vector
# (~115 ms at 100k and ~960 ms at 1M on the shared 2-core machine), HNSW answers in 1-3 ms. Below ~50k
# items exactness is worth a few ms per query and costs no build. efSearch=128: recall@10 0.988 at 100k,
# 0.946 at 1M with this graph (M=16, efConstruction=40); raise ef_search/hnsw_m for bigger catalogues.
# At 1M on a quiet machine, IVF-PQ (sqrt(N) lists, 8 dims per code byte, 4 lists probed) shortlisting k*10
# candidates that are re-ranked exactly reached recall@10 0.952 at 58x exact q/s at 512-d and 0.971 at 55x at
# 1024-d (bench/results/retrieval_ivfpq_1m_m64.json, retrieval_ivfpq_1m_1024_m128.json: raw FAISS
# IndexRefineFlat, the re-ranking this module now does inside FAISS too), where this HNSW reached 0.946 at 34x;
# at 100k HNSW is the better one. Between the two sizes is unmeasured: the switch sits at 1M, where it was
# measured. The shipped code's own figures: bench/retrieval.py, docs/results.md.
AUTO_THRESHOLD = 50_000
IVFPQ_MIN_TRAIN = 1_000  # PQ needs 256 training points per sub-quantizer; IVF needs >= nlist
DEFAULT_PARAMS: dict[str, Any] = {
    "auto_threshold": AUTO_THRESHOLD,
    "ivfpq_threshold": 1_000_000,  # auto: HNSW below, IVF-PQ + exact re-ranking from here
    "hnsw_m": 16,  # graph degree: memory N*M*8 bytes on top of the vectors
    "ef_construction": 40,
    "ef_search": 128,  # raised to k when k is larger
    # IVF lists visited per query, and the IVF-PQ shortlist (k * rerank_factor) re-ranked with the exact vectors:
    # the fastest pair with recall@10 >= 0.95 at 1M x 512 on two data seeds (bench/results/
    # retrieval_1m_rerank_sweep.json, retrieval_1m_seed1_sweep.json); more of either buys recall, costs speed.
    "nprobe": 3,
    "rerank_factor": 5,
    "pq_dims_per_byte": 8,  # finer codes make a better shortlist, so fewer lists and candidates suffice
}
SEARCH_PARAMS = ("ef_search", "nprobe", "rerank_factor")  # read at each search: changeable on a built index
_TOMBSTONE_REBUILD_FRACTION = 0.25


def _check_param(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"faiss index parameter {name} must be a positive integer, got {value!r}")


class FaissIndex(Index):
    """Inner-product top-k search in process (see module docstring). ``params`` override DEFAULT_PARAMS."""

    backend = "faiss"

    def __init__(self, dim: int, *, model_version: str, kind: str = "auto", metric: str = "ip",
                 **params: Any) -> None:
        super().__init__(dim, model_version=model_version, metric=metric)
        if kind not in KINDS:
            raise UsageError(f"faiss index kind {kind!r} is not one of {KINDS}")
        unknown = set(params) - set(DEFAULT_PARAMS)
        if unknown:
            raise UsageError(f"unknown faiss index parameter(s) {sorted(unknown)} "
                             f"(known: {', '.join(DEFAULT_PARAMS)})")
        self.params = {**DEFAULT_PARAMS, **params}
        for name, value in self.params.items():
            _check_param(name, value)
        self.kind = kind
        self._label_of: dict[str, int] = {}  # id -> label, in insertion order
        self._id_of: dict[int, str] = {}
        self._meta: dict[int, dict] = {}
        self._inverted: dict[str, dict[str, set[int]]] = {}  # key -> value token -> labels
        self._key_counts: Counter[str] = Counter()
        self._deleted: set[int] = set()  # HNSW tombstones
        self._next_label = 0
        self._built_kind = "hnsw" if kind == "hnsw" else "flat"  # ivfpq: flat until there is data to train
        self._index = self._new_faiss_index(self._built_kind)
        self._ann: faiss.IndexIVFPQ | None = None  # ivfpq: the shortlist index (labels = ours)
        self._trained_n = 0
        self._row_labels: tuple[np.ndarray, np.ndarray] | None = None  # ivfpq: see _row_map

    # ---- construction --------------------------------------------------------------------------------
    def _new_faiss_index(self, kind: str) -> faiss.IndexIDMap2:
        if kind in ("flat", "ivfpq"):  # ivfpq keeps the exact vectors here for re-ranking
            inner = faiss.IndexFlatIP(self.dim)
        else:
            inner = faiss.IndexHNSWFlat(self.dim, int(self.params["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = int(self.params["ef_construction"])
            inner.hnsw.efSearch = int(self.params["ef_search"])
        return faiss.IndexIDMap2(inner)

    def set_search_params(self, **params: Any) -> None:
        """Change query-time settings (``ef_search``, ``nprobe``, ``rerank_factor``) without a rebuild: the
        recall/speed knob of a built index. Build-time settings need a new index."""
        unknown = set(params) - set(SEARCH_PARAMS)
        if unknown:
            raise ValueError(f"{sorted(unknown)} cannot change after a build (query-time: {', '.join(SEARCH_PARAMS)})")
        for name, value in params.items():
            _check_param(name, value)
        with self._lock:
            self.params.update({name: int(value) for name, value in params.items()})

    @property
    def built_kind(self) -> str:
        """The structure in use now (``flat``, ``hnsw`` or ``ivfpq``); differs from ``kind`` when that is ``auto``."""
        return self._built_kind

    def _rebuild(self, kind: str) -> None:
        labels = np.fromiter(self._label_of.values(), dtype=np.int64, count=len(self._label_of))
        vectors = self._vectors_of(labels)
        self._index = self._new_faiss_index(kind)
        self._built_kind = kind
        self._deleted.clear()
        self._ann, self._trained_n = None, 0
        if len(labels):
            self._index.add_with_ids(vectors, labels)
        if kind == "ivfpq":
            self._ann = self._train_ivfpq(vectors)
            self._ann.add_with_ids(vectors, labels)
            self._trained_n = len(labels)

    def _train_ivfpq(self, vectors: np.ndarray) -> faiss.IndexIVFPQ:
        """IVF (sqrt(N) lists) + PQ codes of D / pq_dims_per_byte bytes, trained on (a sample of) ``vectors``."""
        n = len(vectors)
        nlist = int(min(max(16, np.sqrt(n)), n // 39 or 1))
        m = max(1, self.dim // int(self.params["pq_dims_per_byte"]))
        while self.dim % m:  # PQ needs m | D
            m -= 1
        quantizer = faiss.IndexFlatIP(self.dim)
        ann = faiss.IndexIVFPQ(quantizer, self.dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(0).choice(n, min(n, max(40 * nlist, 256 * 40)), replace=False)]
        ann.train(sample)
        return ann

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
        self._row_labels = None
        labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
        self._index.add_with_ids(vectors, labels)
        self._next_label += len(ids)
        for item_id, label, meta in zip(ids, labels.tolist(), metadata):
            self._register(item_id, label, meta)
        if self._ann is not None:
            self._ann.add_with_ids(vectors, labels)
        target = self._kind_for(len(self))
        if target != self._built_kind:
            self._rebuild(target)
        elif target == "ivfpq" and len(self) > 4 * self._trained_n:  # lists grew 4x: retrain
            self._rebuild("ivfpq")

    def _kind_for(self, n: int) -> str:
        """The structure ``kind`` calls for at ``n`` items."""
        if self.kind == "ivfpq":
            return "ivfpq" if n >= IVFPQ_MIN_TRAIN else "flat"
        if self.kind != "auto":
            return self.kind
        if n >= self.params["ivfpq_threshold"]:
            return "ivfpq"
        return "hnsw" if n >= self.params["auto_threshold"] else "flat"

    def _register(self, item_id: str, label: int, meta: dict) -> None:
        self._label_of[item_id] = label
        self._id_of[label] = item_id
        self._meta[label] = meta
        for key, value in meta.items():  # inverted index: filters become label sets
            self._inverted.setdefault(key, {}).setdefault(filter_token(value), set()).add(label)
            self._key_counts[key] += 1

    def _remove(self, ids: list[str]) -> None:
        self._row_labels = None
        labels = [self._label_of.pop(i) for i in ids]
        for label in labels:
            del self._id_of[label]
            for key, value in self._meta.pop(label).items():
                bucket = self._inverted[key][filter_token(value)]
                bucket.discard(label)
                if not bucket:
                    del self._inverted[key][filter_token(value)]
                self._key_counts[key] -= 1
        if self._built_kind in ("flat", "ivfpq"):
            self._index.remove_ids(np.asarray(labels, dtype=np.int64))
            if self._ann is not None:
                self._ann.remove_ids(np.asarray(labels, dtype=np.int64))
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
        if self._ann is not None:
            scores, labels = self._search_ivfpq(queries, want, selector)
        else:
            params = self._search_params(selector)
            if self._built_kind == "hnsw":  # efSearch must cover k or HNSW returns fewer
                params.efSearch = max(int(self.params["ef_search"]), want)
            scores, labels = self._index.search(queries, want, params=params)
        short = np.flatnonzero((labels < 0).any(axis=1))
        if len(short):  # HNSW missed matches under a selective filter: exact search over the candidates
            cand = allowed if allowed is not None else np.fromiter(self._label_of.values(), np.int64)
            s, rows = exact_topk(self._vectors_of(cand), queries[short], want)
            scores[short], labels[short] = s, cand[rows]
        # Python lists, not numpy scalars: at 1M items this loop costs as much as the IVF-PQ search itself
        id_of, meta = self._id_of, self._meta
        return [[Hit(id_of[l], s, dict(meta[l])) for s, l in zip(srow, lrow) if l >= 0]
                for srow, lrow in zip(scores.tolist(), labels.tolist())]

    def _search_ivfpq(self, queries: np.ndarray, want: int, selector) -> tuple[np.ndarray, np.ndarray]:
        """Shortlist ``want * rerank_factor`` labels by PQ codes, then FAISS ranks the shortlist by the exact inner
        product with the stored vectors (``knn_inner_products_by_idx``: what ``IndexRefineFlat`` does, but over
        our label-keyed flat store, from which items can be removed; ``IndexRefine`` cannot remove). Rows whose
        shortlist holds fewer than ``want`` candidates come back with -1 labels (the caller falls back)."""
        params = faiss.SearchParametersIVF(sel=selector, nprobe=int(self.params["nprobe"]))
        _, short = self._ann.search(queries, want * int(self.params["rerank_factor"]), params=params)  # (Q, S)
        labels_by_row, row_of_label = self._row_map()
        # IVF pads a short list with -1 at its end; FAISS's re-rank stops at the first -1, so keep them there
        rows = np.where(short >= 0, row_of_label[short], -1)
        flat = faiss.downcast_index(self._index.index)
        scores = np.empty((len(queries), want), np.float32)
        found = np.empty((len(queries), want), np.int64)
        # ld_ids given explicitly: FAISS's default (-1) strides the shortlist by ny (the store size), not nsubset
        faiss.knn_inner_products_by_idx(
            faiss.swig_ptr(queries), flat.get_xb(), faiss.swig_ptr(rows), self.dim, len(queries), flat.ntotal,
            rows.shape[1], want, faiss.swig_ptr(scores), faiss.swig_ptr(found), rows.shape[1])
        return scores, np.where(found >= 0, labels_by_row[np.maximum(found, 0)], -1)

    def _row_map(self) -> tuple[np.ndarray, np.ndarray]:
        """(label of each exact-store row, row of each label or -1), cached until the next add/remove/rebuild.
        A gather through a dense label -> row array: a binary search of every shortlisted label cost as much as
        the search itself at 1M items."""
        if self._row_labels is None:
            labels = faiss.vector_to_array(self._index.id_map)
            row_of_label = np.full(max(self._next_label, 1), -1, np.int64)
            row_of_label[labels] = np.arange(len(labels))
            self._row_labels = (labels, row_of_label)
        return self._row_labels

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
        elif self._built_kind == "ivfpq":  # keep the trained codebooks: retraining takes minutes at 1M
            header["faiss"] = {"built_kind": "ivfpq", "labels": labels.tolist(), "deleted": [],
                               "next_label": self._next_label, "trained_n": self._trained_n}
            blob = faiss.serialize_index(self._ann).tobytes()
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
        if saved and saved.get("built_kind") in ("hnsw", "ivfpq") and len(payload.blob):
            index._restore_graph(payload, saved, source)
        else:
            index._add_loaded(list(h["ids"]), payload.vectors, list(h["metadata"]))
        return index

    def _add_loaded(self, ids: list[str], vectors: np.ndarray, metadata: list[dict]) -> None:
        target = self._kind_for(len(ids))
        self._built_kind = "flat" if target == "ivfpq" else target  # ivfpq: trained by the add below
        self._index = self._new_faiss_index(self._built_kind)
        if ids:
            self.add(ids, np.array(vectors, dtype=np.float32), metadata)

    def _restore_graph(self, payload: IndexPayload, saved: dict, source: str) -> None:
        h = payload.header
        self._row_labels = None
        labels = [int(x) for x in saved["labels"]]
        try:
            graph = faiss.deserialize_index(np.frombuffer(payload.blob, dtype=np.uint8))
        except RuntimeError as e:
            raise IndexFileError(f"{source}: stored FAISS graph is unreadable ({str(e)[:120]})") from None
        expected = faiss.IndexIVFPQ if saved["built_kind"] == "ivfpq" else faiss.IndexIDMap2
        if not isinstance(faiss.downcast_index(graph), expected):  # e.g. written by another mildnet version
            raise IndexFileError(f"{source}: stored FAISS structure is a {type(faiss.downcast_index(graph)).__name__}"
                                 f", this version reads a {expected.__name__} for kind {saved['built_kind']!r}; "
                                 "rebuild the index (`mildnet index CSV --out FILE`)")
        if (graph.d != self.dim or graph.ntotal != len(labels) + len(saved["deleted"])
                or len(labels) != len(h["ids"])):
            raise IndexFileError(f"{source}: stored FAISS graph does not match the header "
                                 f"(d={graph.d}, ntotal={graph.ntotal}, ids={len(h['ids'])})")
        if saved["built_kind"] == "ivfpq":
            self._ann, self._trained_n = graph, int(saved["trained_n"])
            self._index = self._new_faiss_index("ivfpq")
            if labels:
                self._index.add_with_ids(np.ascontiguousarray(payload.vectors, np.float32),
                                         np.asarray(labels, np.int64))
        else:
            self._index = graph
        self._built_kind = saved["built_kind"]
        self._deleted = set(int(x) for x in saved["deleted"])
        self._next_label = int(saved["next_label"])
        for item_id, label, meta in zip(h["ids"], labels, h["metadata"]):
            self._register(item_id, label, meta)
