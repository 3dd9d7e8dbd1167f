"""Milvus backend: for catalogues that outgrow one machine.

``uri`` is a Milvus server or cluster (``http://milvus:19530``) in production, or a local milvus-lite file
(``./catalogue.db``) in tests and small setups. One collection per index: primary key ``id`` (VARCHAR),
``vector`` (FLOAT_VECTOR[D], metric IP) and ``metadata`` (JSON). The model version, dim and the metadata keys
seen so far live in the collection's properties, so a second writer with another model is refused too.

``save(path)`` writes a small descriptor through :mod:`mildnet.index.store` (same header, checksum and atomic
write as a FAISS index, no vectors: they live in Milvus), so ``load_index(path)`` reconnects. Credentials are
never written: set ``MILVUS_TOKEN`` in the environment.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MildnetError, UsageError
from .base import Hit, Index, IndexFileError, ModelVersionError
from .store import IndexPayload, write_index_file

DEFAULT_COLLECTION = "mildnet"
INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "AUTOINDEX")
# Build and search parameters per index type (Milvus' names). HNSW: the FAISS backend's graph; IVF_FLAT: the
# list count is fixed when the collection is made (size unknown then): ~sqrt(N) for the N you expect.
DEFAULT_BUILD_PARAMS = {"HNSW": {"M": 16, "efConstruction": 40}, "IVF_FLAT": {"nlist": 1024}}
DEFAULT_SEARCH_PARAMS = {"HNSW": {"ef": 128}, "IVF_FLAT": {"nprobe": 32}}
# Milvus read consistency (measured on the 2.3.5 standalone here: one search ~12 ms at "Session", ~470 ms at
# "Strong", which waits for the server's next time tick). The default, "Session", reads at that level, except
# that the first read after this client's own add or remove is "Strong": pymilvus' session timestamp covers
# inserts but not deletes on a 2.3 server (seen: count(*) still 200 after deleting 2 of 200), and an index must
# read its own writes. Other clients (a second Triton replica) see a write once the server has consumed it (the
# two-replica test measures how soon). "Strong": every read waits until every acknowledged write is visible.
CONSISTENCY_LEVELS = ("Strong", "Bounded", "Session", "Eventually")
_MV_KEY, _DIM_KEY, _KEYS_KEY = "mildnet.model_version", "mildnet.dim", "mildnet.metadata_keys"
_BATCH = 1000
# pymilvus reports a lost server through these words (gRPC UNAVAILABLE / deadline, its own retry messages).
_OUTAGE_WORDS = ("unavailable", "deadline", "connect", "fail connecting", "retry", "timeout", "closed")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


def _client(uri: str, timeout: float | None):
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise RuntimeError("the Milvus backend needs pymilvus (and milvus-lite for a local file): "
                           "pip install pymilvus milvus-lite") from None
    try:
        return MilvusClient(uri, token=os.environ.get("MILVUS_TOKEN", ""), timeout=timeout)
    except Exception as e:  # pymilvus raises its own types for connection failures
        raise RuntimeError(f"cannot open Milvus at {uri!r}: {str(e)[:300]}") from None


class MilvusUnavailableError(MildnetError, RuntimeError):
    """The Milvus server did not answer (down, restarting, unreachable): retry once it is back. A write that
    raised this may or may not have been applied; one that returned was acknowledged and is kept."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


def _reporting_outages(method, name: str):
    """Turn pymilvus' connection errors into :class:`MilvusUnavailableError` naming the server and the call
    the caller made (the outermost one: ``search`` rather than the count it does first)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        from pymilvus.exceptions import MilvusException

        try:
            return method(self, *args, **kwargs)
        except MilvusUnavailableError as e:
            raise MilvusUnavailableError(f"Milvus at {self.uri} is unavailable during {name}: {e.detail}",
                                         e.detail) from None
        except MilvusException as e:
            text = str(e)
            if any(s in text.lower() for s in _OUTAGE_WORDS):
                raise MilvusUnavailableError(f"Milvus at {self.uri} is unavailable during {name}: {text[:300]}",
                                             text[:300]) from None
            raise
    return wrapper


def _is_local(uri: str) -> bool:
    return "://" not in uri


def _literal(value: Any) -> str:
    """A Milvus expression literal for a filter value (JSON quoting matches Milvus' string escapes)."""
    if isinstance(value, bool) or isinstance(value, (int, float, str)):
        return json.dumps(value, ensure_ascii=False)
    raise UsageError(f"filter values must be strings, numbers or booleans for Milvus, got {type(value).__name__}")


class MilvusIndex(Index):
    """Top-k inner-product search in a Milvus collection (see module docstring)."""

    backend = "milvus"

    def __init__(self, dim: int, *, model_version: str, uri: str, collection: str = DEFAULT_COLLECTION,
                 index_type: str = "FLAT", metric: str = "ip", kind: str = "auto",
                 build_params: dict | None = None, search_params: dict | None = None,
                 consistency: str = "Session", timeout: float | None = 30.0) -> None:
        super().__init__(dim, model_version=model_version, metric=metric)
        if consistency not in CONSISTENCY_LEVELS:
            raise UsageError(f"Milvus consistency {consistency!r} is not one of {CONSISTENCY_LEVELS}")
        if not _NAME.match(collection):
            raise UsageError(f"Milvus collection name {collection!r} must be letters, digits and _")
        if index_type not in INDEX_TYPES:
            raise UsageError(f"Milvus index_type {index_type!r} is not one of {INDEX_TYPES}")
        if _is_local(uri):
            uri = str(Path(uri).resolve())
        self.uri, self.collection, self.index_type, self.kind = uri, collection, index_type, kind
        self.build_params = dict(DEFAULT_BUILD_PARAMS.get(index_type, {}), **(build_params or {}))
        self.search_params = dict(DEFAULT_SEARCH_PARAMS.get(index_type, {}), **(search_params or {}))
        self.consistency, self.timeout = consistency, timeout
        self._wrote = False
        self._c = _client(uri, timeout)
        if self._c.has_collection(collection):
            props = self._c.describe_collection(collection).get("properties", {})
            if props.get(_MV_KEY) != model_version:
                raise ModelVersionError(f"Milvus collection {collection!r} at {uri} holds embeddings of model "
                                        f"version {props.get(_MV_KEY)!r}, not {model_version!r}")
            if int(props.get(_DIM_KEY, -1)) != self.dim:
                raise IndexFileError(f"Milvus collection {collection!r} has dim {props.get(_DIM_KEY)}, not {self.dim}")
            self._keys = set(json.loads(props.get(_KEYS_KEY, "[]")))
            self._c.load_collection(collection)  # a reopened collection starts out released
        else:
            self._create()
            self._keys = set()

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("metadata", DataType.JSON)
        params = self._c.prepare_index_params()
        params.add_index(field_name="vector", index_type=self.index_type, metric_type="IP",
                         params=self.build_params)
        self._c.create_collection(self.collection, schema=schema, index_params=params,
                                  consistency_level=self.consistency,
                                  properties={_MV_KEY: self.model_version, _DIM_KEY: str(self.dim),
                                              _KEYS_KEY: "[]"})

    def close(self) -> None:
        self._c.close()

    def drop(self) -> None:
        """Delete the whole collection (irreversible)."""
        self._c.drop_collection(self.collection)

    # ---- Index interface -----------------------------------------------------------------------------
    def _read(self, call, **kwargs):
        """``call(collection, consistency_level=..., **kwargs)``: Strong for the first read after an own write."""
        result = call(self.collection, consistency_level="Strong" if self._wrote else self.consistency, **kwargs)
        self._wrote = False  # only once a read has succeeded
        return result

    def _query(self, **kwargs) -> list[dict]:
        return self._read(self._c.query, **kwargs)

    def __len__(self) -> int:
        # count(*), not get_collection_stats: a server's row_count still includes deleted rows until compaction.
        return int(self._query(filter="", output_fields=["count(*)"])[0]["count(*)"])

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and bool(self._query(ids=[item_id], output_fields=["id"]))

    def present(self, ids) -> list[str]:
        ids = list(ids)
        found: set[str] = set()
        for start in range(0, len(ids), _BATCH):  # one round trip per batch, not per id
            rows = self._query(ids=ids[start:start + _BATCH], output_fields=["id"])
            found.update(r["id"] for r in rows)
        return [i for i in ids if i in found]

    def ids(self) -> list[str]:
        out: list[str] = []
        it = self._read(self._c.query_iterator, batch_size=_BATCH, filter="", output_fields=["id"])
        while batch := it.next():
            out.extend(r["id"] for r in batch)
        it.close()
        return out

    def metadata_keys(self) -> set[str]:
        if not _is_local(self.uri):  # another writer (a second replica) may have added keys since
            props = self._c.describe_collection(self.collection).get("properties", {})
            self._keys |= set(json.loads(props.get(_KEYS_KEY, "[]")))
        return set(self._keys)

    def _add(self, ids: list[str], vectors: np.ndarray, metadata: list[dict]) -> None:
        for start in range(0, len(ids), _BATCH):
            rows = [{"id": i, "vector": v.tolist(), "metadata": m}
                    for i, v, m in zip(ids[start:start + _BATCH], vectors[start:start + _BATCH],
                                       metadata[start:start + _BATCH])]
            self._c.insert(self.collection, rows)
            self._wrote = True
        new_keys = {k for m in metadata for k in m} - self._keys
        if new_keys:
            self._keys |= new_keys
            self._c.alter_collection_properties(self.collection, properties={_KEYS_KEY: json.dumps(sorted(self._keys))})

    def _remove(self, ids: list[str]) -> None:
        self._c.delete(self.collection, ids=ids)
        self._wrote = True

    def _search(self, queries: np.ndarray, k: int, filter: dict | None) -> list[list[Hit]]:
        expr = " and ".join(f"metadata[{json.dumps(key)}] == {_literal(v)}" for key, v in (filter or {}).items())
        params = dict(self.search_params)
        if "ef" in params:  # Milvus refuses an HNSW search with ef < k; FAISS's backend raises ef to k too
            params["ef"] = max(int(params["ef"]), k)
        res = self._read(self._c.search, data=queries.tolist(), limit=k, filter=expr, output_fields=["metadata"],
                         search_params={"metric_type": "IP", "params": params})
        return [[Hit(str(r["id"]), float(r["distance"]), dict(r["entity"].get("metadata") or {})) for r in row]
                for row in res]

    # ---- persistence (a descriptor: the vectors live in Milvus) --------------------------------------
    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "uri": self.uri, "collection": self.collection, "index_type": self.index_type,
                "build_params": self.build_params, "search_params": self.search_params,
                "consistency": self.consistency}

    def save(self, path) -> None:
        header = {"backend": self.backend, "kind": self.kind, "metric": self.metric, "dim": self.dim,
                  "model_version": self.model_version, "ids": [], "metadata": [],
                  "milvus": {"uri": self.uri, "collection": self.collection, "index_type": self.index_type,
                             "build_params": self.build_params, "search_params": self.search_params,
                             "consistency": self.consistency, "count_at_save": len(self)}}
        write_index_file(path, IndexPayload(header=header, vectors=np.zeros((0, self.dim), np.float32)))

    @classmethod
    def from_payload(cls, payload: IndexPayload, source: str = "index") -> "MilvusIndex":
        h = payload.header
        m = h.get("milvus")
        if not isinstance(m, dict) or "uri" not in m:
            raise IndexFileError(f"{source}: Milvus index descriptor lacks the 'milvus' uri/collection section")
        return cls(int(h["dim"]), model_version=h["model_version"], uri=m["uri"],
                   collection=m.get("collection", DEFAULT_COLLECTION), index_type=m.get("index_type", "FLAT"),
                   metric=h.get("metric", "ip"), kind=h.get("kind", "auto"), build_params=m.get("build_params"),
                   search_params=m.get("search_params"), consistency=m.get("consistency", "Session"))


# Outage reporting wraps the public calls from outside (their locks are released before the error is re-raised).
for _name, _call in (("__len__", "len"), ("__contains__", "contains"), ("present", "present"), ("ids", "ids"),
                     ("metadata_keys", "metadata_keys"), ("add", "add"), ("remove", "remove"),
                     ("search", "search"), ("save", "save")):
    setattr(MilvusIndex, _name, _reporting_outages(getattr(MilvusIndex, _name), _call))
