"""The index file format: the ONE place it is written and read.

Layout (little-endian)::

    offset  size  field
    0       8     magic  b"MILDIDX\\n"
    8       4     format version (uint32)
    12      8     header length H (uint64)
    20      8     vectors length V (uint64)  = count * dim * 4
    28      8     backend blob length B (uint64)
    36      32    sha256 of everything that follows (header + vectors + blob)
    68      H     header: UTF-8 JSON (model version, dim, backend, kind, params, ids, metadata, ...)
    68+H    V     vectors: float32[count, dim], row i belongs to ids[i]
    68+H+V  B     backend blob: e.g. a serialised FAISS graph so HNSW needs no rebuild (optional)

JSON, never pickle: a file handed to the server is untrusted input. Files are written atomically
(temp file in the same folder + fsync + ``os.replace`` + fsync of the folder), so a reader (e.g. the
``similar`` model reloading on change) only ever sees the old file or the new one. A file whose size,
magic, version or checksum is wrong raises :class:`IndexFileError` and is never served.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_open
from .base import IndexFileError

MAGIC = b"MILDIDX\n"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQQQ32s")  # magic, version, H, V, B, sha256
_CHUNK = 16 * 1024 * 1024
SUFFIX = ".mindex"


@dataclass
class IndexPayload:
    """What an index file holds. ``header`` has at least ``model_version``, ``dim``, ``backend``, ``ids``,
    ``metadata``; ``vectors`` is ``float32[len(ids), dim]``; ``blob`` is backend-private bytes (or empty)."""

    header: dict[str, Any]
    vectors: np.ndarray
    blob: bytes | memoryview = b""
    extra: dict[str, Any] = field(default_factory=dict)


REQUIRED = ("model_version", "dim", "backend", "ids", "metadata")


def write_index_file(path: str | os.PathLike, payload: IndexPayload) -> None:
    """Write ``payload`` to ``path`` atomically (temp + fsync + os.replace). A failed write raises the
    ``OSError`` (errno kept, e.g. ENOSPC, naming ``path``); the previous file stays as it was."""
    path = Path(path)
    header = dict(payload.header)
    missing = [k for k in REQUIRED if k not in header]
    if missing:
        raise ValueError(f"index header lacks {missing}")
    vectors = np.ascontiguousarray(payload.vectors, dtype="<f4")
    n, dim = len(header["ids"]), int(header["dim"])
    if vectors.shape != (n, dim) and not (n == 0 and vectors.size == 0):
        raise ValueError(f"vectors have shape {list(vectors.shape)}, header says [{n}, {dim}]")
    if len(header["metadata"]) != n:
        raise ValueError(f"{n} ids but {len(header['metadata'])} metadata entries")
    header["count"] = n
    header_bytes = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    blob = memoryview(payload.blob or b"").cast("B")
    vec_bytes = memoryview(vectors).cast("B") if vectors.size else memoryview(b"")

    digest = hashlib.sha256()
    for part in (header_bytes, vec_bytes, blob):
        digest.update(part)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), len(vec_bytes), len(blob), digest.digest())

    with atomic_open(path, "wb", what="index file") as f:
        for part in (prefix, header_bytes, vec_bytes, blob):
            f.write(part)


def _read_prefix(f, path: Path, size: int) -> tuple[int, int, int, bytes]:
    raw = f.read(_PREFIX.size)
    if len(raw) < _PREFIX.size:
        if raw and not MAGIC.startswith(raw[: len(MAGIC)]):
            raise IndexFileError(f"{path}: not a mildnet index file (bad magic)")
        raise IndexFileError(f"{path}: truncated index file ({size} bytes, shorter than its "
                             f"{_PREFIX.size}-byte header)")
    magic, version, h, v, b, sha = _PREFIX.unpack(raw)
    if magic != MAGIC:  # its bytes are not echoed: the path may point at any file (a symlink to /etc/passwd)
        raise IndexFileError(f"{path}: not a mildnet index file (bad magic)")
    if version > FORMAT_VERSION or version < 1:
        raise IndexFileError(f"{path}: index format version {version} is not supported by this mildnet "
                             f"(supports up to {FORMAT_VERSION}); upgrade mildnet or rebuild the index")
    expected = _PREFIX.size + h + v + b
    if size < expected:
        raise IndexFileError(f"{path}: truncated index file: {size} bytes, its header promises {expected} "
                             "(an interrupted copy?); rebuild or restore it")
    if size > expected:
        raise IndexFileError(f"{path}: corrupted index file: {size - expected} unexpected trailing bytes")
    return h, v, b, sha


def read_index_file(path: str | os.PathLike) -> IndexPayload:
    """Read and verify an index file: size, magic, version, sha256 and header sanity.

    Raises :class:`IndexFileError` naming the problem.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except FileNotFoundError:
        raise IndexFileError(f"{path}: no such index file") from None
    except OSError as e:
        raise IndexFileError(f"{path}: cannot read index file ({e.strerror or e})") from None
    with f:
        h, v, b, sha = _read_prefix(f, path, size)
        buf = bytearray(h + v + b)
        view = memoryview(buf)
        digest = hashlib.sha256()
        pos = 0
        while pos < len(buf):  # read and hash in chunks: a 4 GB index must not need 8 GB
            got = f.readinto(view[pos: pos + _CHUNK])
            if not got:
                raise IndexFileError(f"{path}: truncated index file (file shrank while reading)")
            digest.update(view[pos: pos + got])
            pos += got
    if digest.digest() != sha:
        raise IndexFileError(f"{path}: corrupted index file: sha256 checksum mismatch (bit rot or a partial "
                             "write); rebuild or restore it, it will not be served")
    try:
        header = json.loads(bytes(view[:h]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{path}: index header is not valid JSON ({e})") from None
    missing = [k for k in REQUIRED if k not in header] if isinstance(header, dict) else list(REQUIRED)
    if missing:
        raise IndexFileError(f"{path}: index header lacks {missing}")
    n, dim = len(header["ids"]), int(header["dim"])
    if v != n * dim * 4 or len(header["metadata"]) != n:
        raise IndexFileError(f"{path}: index header says {n} items of dim {dim}, but holds {v} vector bytes "
                             f"and {len(header['metadata'])} metadata entries")
    vectors = np.frombuffer(buf, dtype="<f4", count=n * dim, offset=h).reshape(n, dim)
    return IndexPayload(header=header, vectors=vectors, blob=view[h + v:])


def read_index_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header JSON only (no vectors, no checksum check): for quick looks such as ``model_version``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            h, _, _, _ = _read_prefix(f, path, size)
            raw = f.read(h)
    except FileNotFoundError:
        raise IndexFileError(f"{path}: no such index file") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{path}: index header is not valid JSON ({e})") from None
