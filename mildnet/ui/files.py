"""Catalogue images for the search page: one safe way from a URL path to a file under the catalogue root,
and thumbnails made once per file version and kept in memory.

A request path is untrusted: it may try ``../``, an absolute path, a NUL byte or a symlink that points out of
the root. :meth:`CatalogueFiles.resolve` refuses all of them; every image the page shows goes through it.
"""
from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from ..data.catalogue import IMAGE_EXTENSIONS
from ..errors import MildnetError
from ..imageio import MAX_BYTES, ImageDecodeError, decode_image

THUMB_PX = 256
THUMB_CACHE_ITEMS = 4096  # ~15 KB each: about 60 MB at most


class NotInCatalogue(MildnetError, LookupError):
    """The path names no image file inside the catalogue root (or tries to leave it)."""


class CatalogueFiles:
    """Image files under ``root``: safe lookup, relative names for the page, cached thumbnails."""

    def __init__(self, root: str | os.PathLike, thumb_px: int = THUMB_PX, cache_items: int = THUMB_CACHE_ITEMS):
        self.root = Path(root).resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"catalogue root {self.root} is not a folder")
        self.thumb_px = thumb_px
        self.cache_items = cache_items
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._making: dict[tuple, threading.Lock] = {}
        self.thumbnails_made = 0  # how many were rendered (not served from the cache): tests read it

    def relative(self, path: str | os.PathLike | None) -> str | None:
        """The page's name for an image the index records (absolute path), or None when it is not under root."""
        if not path:
            return None
        try:
            rel = Path(path).resolve().relative_to(self.root)
        except (ValueError, OSError):
            return None
        return rel.as_posix()

    def resolve(self, rel: str) -> Path:
        """``rel`` (a page name) -> the real file, or :class:`NotInCatalogue`."""
        if not rel or "\x00" in rel or "\\" in rel:
            raise NotInCatalogue(rel)
        pure = PurePosixPath(rel)
        if pure.is_absolute() or any(part in ("..", "") for part in rel.split("/")):
            raise NotInCatalogue(rel)
        try:
            real = (self.root / pure).resolve(strict=True)  # follows symlinks: then checked against the root
        except (OSError, RuntimeError):
            raise NotInCatalogue(rel) from None
        if not real.is_relative_to(self.root) or not real.is_file() or real.suffix.lower() not in IMAGE_EXTENSIONS:
            raise NotInCatalogue(rel)
        return real

    def read(self, rel: str, max_bytes: int = MAX_BYTES) -> bytes:
        """The encoded bytes of a catalogue image (for "more like this"), size-checked before reading."""
        real = self.resolve(rel)
        size = real.stat().st_size
        if size > max_bytes:
            raise ImageDecodeError(f"{rel}: {size} bytes, more than the {max_bytes} allowed")
        return real.read_bytes()

    def thumbnail(self, rel: str) -> bytes:
        """A JPEG at most ``thumb_px`` on a side; rendered once per (file, mtime, size), then from memory."""
        real = self.resolve(rel)
        st = real.stat()
        key = (str(real), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            making = self._making.setdefault(key, threading.Lock())
        with making:  # one render per key even when the grid asks for it twice at once
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            data = self._render(real)
            with self._lock:
                self._cache[key] = data
                self.thumbnails_made += 1
                while len(self._cache) > self.cache_items:
                    self._cache.popitem(last=False)
                self._making.pop(key, None)
        return data

    def _render(self, real: Path) -> bytes:
        img = decode_image(real)
        img.thumbnail((self.thumb_px, self.thumb_px))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return buf.getvalue()
