"""Catalogue indexes: string id -> embedding (+ metadata), top-k inner-product search with metadata filters.

    from mildnet.index import create_index, load_index
    index = create_index(1024, model_version="mildnet_mobile-3f9a0c1b2d4e") # FAISS, flat -> HNSW by size
    index.add(["sku-1", "sku-2"], vectors, [{"category": "Apple"}, {"category": "Milk"}])
    hits = index.search(query_vectors, k=10, filter={"category": "Apple"})  # list[list[Hit]]
    index.save("catalogue.mindex")                                         # atomic, checksummed
    index = load_index("catalogue.mindex")                                 # IndexFileError if damaged

Backends: ``faiss`` (embedded default, :mod:`.faiss_index`) and ``milvus`` (server/cluster or milvus-lite file,
:mod:`.milvus_index`). The file format lives in :mod:`.store` only.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import UsageError
from .base import (MAX_K, DuplicateIdError, Hit, Index, IndexFileError, ModelVersionError, UnknownFilterKeyError,
                   check_k, filter_token)
from .store import FORMAT_VERSION, SUFFIX, read_index_file, read_index_header

BACKENDS = ("faiss", "milvus")


def create_index(dim: int, *, backend: str = "faiss", kind: str = "auto", metric: str = "ip",
                 model_version: str, **params: Any) -> Index:
    """A new empty index. ``params``: backend settings (faiss: ``auto_threshold``, ``hnsw_m``,
    ``ef_construction``, ``ef_search``; milvus: ``uri`` (required), ``collection``, ``index_type``,
    ``build_params``, ``search_params``, ``consistency``, ``timeout``)."""
    if backend == "faiss":
        from .faiss_index import FaissIndex  # lazy: faiss, the optional `index` extra

        return FaissIndex(dim, model_version=model_version, kind=kind, metric=metric, **params)
    if backend == "milvus":
        from .milvus_index import MilvusIndex  # lazy: pymilvus, the optional `milvus` extra

        if "uri" not in params:
            raise UsageError("the milvus backend needs uri= (a Milvus server URI or a local milvus-lite file)")
        return MilvusIndex(dim, model_version=model_version, metric=metric, kind=kind, **params)
    raise UsageError(f"unknown index backend {backend!r} (available: {', '.join(BACKENDS)})")


def load_index(path: str | os.PathLike) -> Index:
    """Read an index file written by ``Index.save``; verifies size, magic, version and sha256 first.

    Raises :class:`IndexFileError` for a missing, truncated or corrupted file.
    """
    payload = read_index_file(path)
    backend = payload.header.get("backend")
    if backend == "faiss":
        from .faiss_index import FaissIndex  # lazy: faiss, the optional `index` extra

        return FaissIndex.from_payload(payload, source=str(path))
    if backend == "milvus":
        from .milvus_index import MilvusIndex  # lazy: pymilvus, the optional `milvus` extra

        return MilvusIndex.from_payload(payload, source=str(path))
    raise IndexFileError(f"{path}: unknown index backend {backend!r} in file")


__all__ = ["create_index", "load_index", "read_index_header", "read_index_file", "Index", "Hit",
           "IndexFileError", "ModelVersionError", "UnknownFilterKeyError", "DuplicateIdError", "filter_token",
           "BACKENDS", "FORMAT_VERSION", "SUFFIX", "MAX_K", "check_k"]
