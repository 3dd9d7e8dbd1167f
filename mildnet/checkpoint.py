"""Checkpoint files: the one place that writes and reads them.

A checkpoint holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``
(a checkpoint is untrusted input). It names its model variant and carries the preprocessing spec and the
embedding dim, so nothing downstream has to guess them.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import MildnetError
from .fileio import atomic_open

FORMAT = "mildnet-checkpoint"
FORMAT_VERSION = 2  # 2: carries weights_sha256, checked on read


class CheckpointError(MildnetError, ValueError):
    """A file is not a usable mildnet checkpoint; the message says why."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`mildnet.fileio.atomic_open`: a crash never leaves half a file, and a failed
    write (disk full, file too large) raises the ``OSError`` itself (errno kept, path named), leaving the
    previous file untouched and no temp file behind."""
    with atomic_open(path, "wb", what="checkpoint") as f:
        torch.save(obj, f)


def state_dict_sha256(state_dict: dict[str, Any]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes (sorted by name): what a checkpoint's
    ``weights_sha256`` records, so a flipped bit in the weights is caught before the model serves."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}|{t.dtype}|{tuple(value.shape)}\n".encode())
            digest.update(t.view(torch.uint8).numpy())  # raw bytes: exact for every dtype, bfloat16 included
        else:
            digest.update(f"{name}|{value!r}\n".encode())
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, variant: str,
                    model_kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (a mildnet model with ``.spec`` and ``.embedding_dim``) as a checkpoint."""
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        **(extra or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "model_kwargs": dict(model_kwargs or {}),
        "spec": model.spec.to_dict(),
        "embedding_dim": int(model.embedding_dim),
        "state_dict": state_dict,
        "weights_sha256": state_dict_sha256(state_dict),
    }
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | os.PathLike, *, expect_variant: str | None = None) -> dict[str, Any]:
    """Load and validate a checkpoint dict (``weights_only=True``); raise :class:`CheckpointError` if unusable.

    Format 2 and later must carry ``weights_sha256`` and match it; format 1 files (written before the hash
    existed) are checked by header only.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False, i.e. to run the file's code: keep
        # only its diagnosis ("Trying to load unsupported GLOBAL posix.mkdir ...").
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "unsupported" in ln.lower() or "global" in ln.lower()),
                   lines[-1] if lines else "")
        raise CheckpointError(f"{path}: not a loadable checkpoint: it holds Python objects that a safe load "
                              f"(weights_only=True) refuses to run ({why[:200]}); do not load it with "
                              "weights_only=False unless you trust its source") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a mildnet checkpoint (no '{FORMAT}' header)")
    version = ckpt.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format_version']} is newer than this mildnet "
                              f"understands ({FORMAT_VERSION}); upgrade mildnet")
    if expect_variant is not None and ckpt["variant"] != expect_variant:
        raise CheckpointError(f"{path}: checkpoint is of variant {ckpt['variant']!r}, expected {expect_variant!r}")
    if version >= 2:
        recorded, state_dict = ckpt.get("weights_sha256"), ckpt.get("state_dict")
        if not isinstance(recorded, str) or not isinstance(state_dict, dict):
            raise CheckpointError(f"{path}: checkpoint lacks its state_dict or weights_sha256")
        if state_dict_sha256(state_dict) != recorded:
            raise CheckpointError(f"{path}: weights do not match their sha256 (corrupted file: bit rot or a "
                                  "damaged copy); restore or re-create it, it will not be used")
    return ckpt
