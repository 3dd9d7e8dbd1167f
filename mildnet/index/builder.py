"""The resumable index builder behind ``mildnet index`` (``client/index.py`` in a checkout): catalogue entries ->
embeddings from Triton's ``mildnet_ensemble`` (through an embedder such as ``mildnet.serving.client.TritonEmbedder``)
-> an index file.

Each image becomes one index entry; its id is the catalogue's ``id`` metadata column when present, else the
image path relative to the catalogue root.

Crash safety: every embedded batch is appended (and fsynced) to ``OUT.journal`` before the next is sent; every
``checkpoint_every`` items the journal is folded into ``OUT.partial`` (atomic) and emptied. A rerun after a
crash or ``kill -9`` replays both and embeds only what is missing: every item ends up in the index exactly
once, and nothing already embedded is sent to the server again. Embeddings from another model version than
the server's (the index's, the journal's) are refused.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import UsageError
from ..fileio import atomic_write_text
from ..serving.client import RemoteInferenceError
from . import IndexFileError, ModelVersionError, create_index, load_index, read_index_header

JOURNAL_FORMAT = "mildnet-index-journal"


# ---- the journal: an append-only, fsynced record of embedded batches --------------------------------------
class Journal:
    """``OUT.journal``: a header line, then one JSON line per embedded batch (ids, metadata, base64 float32
    vectors, sha256). A torn last line (crash mid-write) is dropped on replay and cut off the file."""

    def __init__(self, path: Path):
        self.path = path

    def exists(self) -> bool:
        return self.path.is_file()

    def start(self, model_version: str, dim: int) -> None:
        header = {"format": JOURNAL_FORMAT, "model_version": model_version, "dim": dim}
        atomic_write_text(self.path, json.dumps(header) + "\n", what="indexing journal")

    def header(self) -> dict:
        """The first line: which model version and dim the run embedded with."""
        with open(self.path, "rb") as f:
            return self._parse_header(f.readline())

    def _parse_header(self, line: bytes) -> dict:
        try:
            header = json.loads(line)
            assert header.get("format") == JOURNAL_FORMAT
        except (ValueError, AssertionError, AttributeError):
            raise IndexFileError(f"{self.path}: not an indexing journal; delete it to start over") from None
        return header

    def append(self, ids: Sequence[str], metadata: Sequence[dict], vectors: np.ndarray) -> None:
        raw = np.ascontiguousarray(vectors, dtype="<f4").tobytes()
        rec = {"ids": list(ids), "metadata": list(metadata), "vectors": base64.b64encode(raw).decode("ascii"),
               "sha256": hashlib.sha256(raw + json.dumps(list(ids)).encode()).hexdigest()}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def replay(self, model_version: str, dim: int) -> Iterable[tuple[list[str], list[dict], np.ndarray]]:
        """Yield the complete batches; truncate the file after the last complete one."""
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        header = self._parse_header(lines[0])
        if header["model_version"] != model_version or int(header["dim"]) != dim:
            raise ModelVersionError(
                f"{self.path}: unfinished run embedded with model version {header['model_version']!r} "
                f"(dim {header['dim']}), the server now serves {model_version!r} (dim {dim}); delete "
                f"{self.path.name} and the .partial file to start over with the new model")
        good = len(lines[0]) + 1
        for line in lines[1:]:
            if not line:
                continue
            try:
                rec = json.loads(line)
                raw = base64.b64decode(rec["vectors"])
                if hashlib.sha256(raw + json.dumps(rec["ids"]).encode()).hexdigest() != rec["sha256"]:
                    raise ValueError("checksum")
                vecs = np.frombuffer(raw, dtype="<f4").reshape(len(rec["ids"]), dim)
            except (ValueError, KeyError, TypeError):
                print(f"journal: dropping a torn record after {good} bytes (crash mid-write)", file=sys.stderr)
                break
            good += len(line) + 1
            yield rec["ids"], rec["metadata"], vecs
        if good < self.path.stat().st_size:
            os.truncate(self.path, good)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def model_identity(embedder) -> tuple[str, int]:
    """(model_version, embedding dim) of what the server serves: every URL must serve the same model."""
    infos = [embedder.model_info(url) for url in embedder.urls]
    served = {(i.model_version, i.embedding_dim) for i in infos}
    if len(served) > 1:
        raise ModelVersionError("the servers serve different models: " + ", ".join(
            f"{u} -> {i.model_version}" for u, i in zip(embedder.urls, infos)))
    return infos[0].model_version, int(infos[0].embedding_dim)


# ---- the indexing run ----------------------------------------------------------------------------------------
def embed_chunk(embedder, entries: list[tuple[str, Path, dict]], log) -> tuple[list, np.ndarray | None]:
    """Embed one chunk (its images in flight at once); a bad image (unreadable here, or refused by the
    server) is reported and skipped. Returns (kept entries, vectors[len(kept), D]).

    Server-side failures (down, model not ready) propagate: the run stops, and a rerun resumes.
    """
    readable, blobs = [], []
    for e in entries:
        try:
            data = e[1].read_bytes()
        except OSError as err:
            log(f"skipping {e[0]}: cannot read {e[1]} ({err.strerror or err})")
            continue
        readable.append(e)
        blobs.append(data)
    if not readable:
        return [], None
    kept, vecs = [], []
    for e, result in zip(readable, embedder.embed_each(blobs)):
        if isinstance(result, RemoteInferenceError):
            log(f"skipping {e[0]}: the server refused {e[1]}: {str(result).strip()[:300]}")
        else:
            kept.append(e)
            vecs.append(np.asarray(result, dtype=np.float32))
    return kept, (np.stack(vecs) if vecs else None)


def build_index(entries: list[tuple[str, Path, dict]], out: Path, embedder, *, add: bool = False,
                backend: str = "faiss", backend_params: dict | None = None, kind: str = "auto",
                chunk: int = 64, checkpoint_every: int = 2000, progress: bool = True,
                log=lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    """Make ``out`` hold every entry's embedding exactly once (resuming an interrupted run). See module doc."""
    from tqdm import tqdm

    model_version, dim = model_identity(embedder)
    out.parent.mkdir(parents=True, exist_ok=True)
    journal = Journal(out.with_name(out.name + ".journal"))
    partial = out.with_name(out.name + ".partial")
    resuming = journal.exists() or partial.exists()
    if out.exists() and not (add or resuming):
        raise UsageError(f"{out} exists: use --add to add the catalogue's new items to it "
                         f"(or delete it to rebuild)")
    if add and not out.exists() and not resuming:
        raise UsageError(f"{out} does not exist: nothing to --add to (build it first, without --add)")

    base_file = partial if partial.exists() else (out if out.exists() else None)
    if base_file is not None:
        index = load_index(base_file)
        if index.model_version != model_version:
            raise ModelVersionError(f"{base_file} holds embeddings of model version {index.model_version!r}; "
                                    f"the server serves {model_version!r}: build a new index for the new model")
        if index.dim != dim:
            raise ModelVersionError(f"{base_file} has dim {index.dim}, the server's model gives {dim}")
    else:
        index = create_index(dim, backend=backend, kind=kind, model_version=model_version,
                             **(backend_params or {}))

    existing = 0  # what a finished run left in `out` (to tell it apart from what a crashed run recovered)
    if out.exists():
        header = read_index_header(out)
        existing = header.get("milvus", {}).get("count_at_save", header["count"])
    replayed = 0
    if journal.exists():
        for ids, metas, vecs in journal.replay(model_version, dim):
            known = set(index.present(ids))  # records already folded into .partial before the crash
            fresh = [j for j, i in enumerate(ids) if i not in known]
            if fresh:
                index.add([ids[j] for j in fresh], vecs[fresh], [metas[j] for j in fresh],
                          model_version=model_version)
                replayed += len(fresh)
    else:
        journal.start(model_version, dim)
    recovered = max(0, len(index) - existing)  # from an interrupted run: .partial + journal
    if recovered:
        log(f"resumed an interrupted run: {recovered} embeddings recovered ({replayed} from "
            f"{journal.path.name}), not sent to the server again")

    done_ids = set(index.present([e[0] for e in entries]))
    todo = [e for e in entries if e[0] not in done_ids]
    skipped: list[str] = []
    since_checkpoint, done = 0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="indexing", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            kept, vecs = embed_chunk(embedder, part, log)
            skipped += [e[0] for e in part if e not in kept]
            if kept:
                if vecs.shape != (len(kept), dim):
                    raise RuntimeError(f"server returned embeddings of shape {list(vecs.shape)}, "
                                       f"expected [{len(kept)}, {dim}]")
                ids, metas = [e[0] for e in kept], [e[2] for e in kept]
                journal.append(ids, metas, vecs)  # durable before anything else happens
                index.add(ids, vecs, metas, model_version=model_version)
                since_checkpoint += len(kept)
                done += len(kept)
            bar.update(len(part))
            bar.set_postfix_str(f"{done / max(time.perf_counter() - t0, 1e-9):.1f} images/s")
            if since_checkpoint >= checkpoint_every:
                index.save(partial)  # atomic; only then is the journal's content redundant
                journal.start(model_version, dim)
                since_checkpoint = 0
    finally:
        bar.close()
    index.save(out)
    partial.unlink(missing_ok=True)
    journal.remove()
    elapsed = time.perf_counter() - t0
    stats = {"out": str(out), "items": len(index), "embedded": done, "recovered": recovered,
             "skipped": skipped, "seconds": round(elapsed, 2),
             "images_per_s": round(done / elapsed, 2) if elapsed > 0 and done else None,
             "model_version": model_version, "dim": dim}
    return stats


def delete_items(out: Path, ids: Sequence[str]) -> int:
    journal = out.with_name(out.name + ".journal")
    if journal.exists():
        raise IndexFileError(f"{out}: an interrupted indexing run is pending ({journal.name}); rerun it first")
    index = load_index(out)
    missing = [i for i in ids if i not in index]
    if missing:
        raise UsageError(f"{out}: {len(missing)} id(s) not in the index: {', '.join(missing[:5])}")
    n = index.remove(ids)
    index.save(out)
    return n
