"""mildnet.fileio: the one atomic-write path every result, index and checkpoint file goes through."""
from __future__ import annotations

import errno
import hashlib
import stat

import pytest

from mildnet.fileio import atomic_open, atomic_write_bytes, atomic_write_text, sha256_file


def test_write_replaces_whole_file_readable_by_others(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_failure_inside_the_block_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "index.bin"
    atomic_write_bytes(path, b"previous")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_open(path, "wb") as f:
            f.write(b"half of the new")
            raise RuntimeError("crash")
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["index.bin"]


def test_a_write_error_behind_a_library_error_surfaces_as_oserror_naming_the_file(tmp_path):
    path = tmp_path / "best.pt"

    def library_write(f):  # what torch.save does on ENOSPC: its own error, the OSError as context
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598")

    with pytest.raises(OSError, match="cannot write checkpoint: No space left on device") as info:
        with atomic_open(path, "wb", what="checkpoint") as f:
            library_write(f)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_only_whole_file_modes(tmp_path):
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_open(tmp_path / "x", "a"):
            pass


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000  # more than one 1 MiB block
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
