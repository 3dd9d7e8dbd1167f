"""Atomic file writes: the one way mildnet writes a file that someone may be reading, or that a crash may cut.

A temp file in the same folder, fsync, ``os.replace``, fsync of the folder: readers see the old file or the new
one, never half of one, and a failed write (a full disk, a kill) leaves the old file as it was and no temp file
behind. A write that fails for lack of room raises an ``OSError`` that keeps its errno and names the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def os_error_behind(exc: BaseException | None) -> OSError | None:
    """The OSError that caused ``exc`` (``exc`` itself included), if any. Libraries such as torch.save report
    a failed write (ENOSPC, EFBIG, EIO) as their own error with the OSError as its cause or context."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, what: str = "file", **kwargs) -> Iterator[IO]:
    """``with atomic_open(path, "wb") as f: ...``: ``path`` appears (or is replaced) only if the block succeeds.

    ``what`` names the file in errors (``cannot write checkpoint: No space left on device: 'best.pt'``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a result file should read like any other
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = os_error_behind(e)
        if cause is not None and cause.errno is not None:
            raise OSError(cause.errno, f"cannot write {what}: {cause.strerror}", str(path)) from e
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, *, what: str = "file") -> None:
    with atomic_open(path, "wb", what=what) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, what: str = "file") -> None:
    with atomic_open(path, "w", what=what, encoding="utf-8", newline="") as f:
        f.write(text)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints and indexes can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable; not possible on every platform/filesystem
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
