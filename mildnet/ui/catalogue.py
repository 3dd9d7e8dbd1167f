"""What the search page tells about the catalogue: the index file's size and categories, and where its images
live. Read from the same index file the Triton ``similar`` model serves, re-read when that file changes."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..index import IndexFileError, load_index

FILTER_KEY = "category"  # the metadata key the page's filter offers (the catalogue's coarse class)


@dataclass(frozen=True)
class CatalogueSummary:
    size: int
    model_version: str
    categories: list[str] = field(default_factory=list)
    image_root: Path | None = None  # the folder holding every indexed image (their common parent)


def summarise(index) -> CatalogueSummary:
    metas = [index.get(i)[1] for i in index.ids()]
    categories = sorted({str(m[FILTER_KEY]) for m in metas if m.get(FILTER_KEY) is not None})
    parents = [str(Path(m["path"]).resolve().parent) for m in metas if m.get("path")]
    root = Path(os.path.commonpath(parents)) if parents else None
    return CatalogueSummary(len(metas), getattr(index, "model_version", ""), categories, root)


class IndexFile:
    """An index file summarised once per version on disk (mtime + size), like the ``similar`` model reloads it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._summary: CatalogueSummary | None = None
        self._lock = threading.Lock()

    def summary(self) -> CatalogueSummary:
        """The current summary; :class:`IndexFileError` when the file is missing or unreadable."""
        with self._lock:
            try:
                st = self.path.stat()
            except OSError:
                raise IndexFileError(f"no index file at {self.path}: build one with client/index.py") from None
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._summary, self._stamp = summarise(load_index(self.path)), stamp
            return self._summary
