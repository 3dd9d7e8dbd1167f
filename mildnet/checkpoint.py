"""Checkpoint files: the one place that writes and reads them.

A checkpoint holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``
(a checkpoint is untrusted input). It names its model variant and carries the preprocessing spec and the
embedding dim, so nothing downstream has to guess them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "mildnet-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file is not a usable mildnet checkpoint; the message says why."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, variant: str,
                    model_kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (a mildnet model with ``.spec`` and ``.embedding_dim``) as a checkpoint."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "model_kwargs": dict(model_kwargs or {}),
        "spec": model.spec.to_dict(),
        "embedding_dim": int(model.embedding_dim),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | os.PathLike, *, expect_variant: str | None = None) -> dict[str, Any]:
    """Load and validate a checkpoint dict (``weights_only=True``); raise :class:`CheckpointError` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a mildnet checkpoint (no '{FORMAT}' header)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format_version']} is newer than this mildnet "
                              f"understands ({FORMAT_VERSION}); upgrade mildnet")
    if expect_variant is not None and ckpt["variant"] != expect_variant:
        raise CheckpointError(f"{path}: checkpoint is of variant {ckpt['variant']!r}, expected {expect_variant!r}")
    return ckpt
