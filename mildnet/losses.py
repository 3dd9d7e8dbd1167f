"""Triplet losses of MILDNet (see shared/reference/MILDNET.md), on unit embeddings with Euclidean distance.

A batch of T triplets is embedded in ONE forward of 3T images laid out ``[queries; positives; negatives]``;
:func:`split_triplets` undoes that layout. Every loss takes ``q, p, n: Tensor[T, D]`` and returns a scalar.

* ``hinge`` (default, the paper's per-triplet form): ``mean_t max(0, m + D(q,p) - D(q,n))``
* ``batch_hinge`` (the official code): ``max(0, mean_t [m + D(q,p) - D(q,n)])``
* ``contrastive`` (the official headline config): ``1/(2T) sum_t [D(q,p)^2 + max(0, m - D(q,n))^2]``
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["distance", "split_triplets", "triplet_hinge", "batch_hinge", "contrastive", "LOSSES", "get_loss",
           "triplet_correct"]


def distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise Euclidean distance ``Tensor[T, D], Tensor[T, D] -> Tensor[T]``.

    The eps under the square root keeps the gradient finite when a == b (sqrt'(0) is infinite).
    """
    return ((a - b).pow(2).sum(dim=-1) + eps).sqrt()


def split_triplets(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Tensor[3T, D]`` laid out [queries; positives; negatives] -> three ``Tensor[T, D]``."""
    if embeddings.shape[0] % 3:
        raise ValueError(f"a triplet batch needs 3T rows, got {embeddings.shape[0]}")
    return embeddings.chunk(3, dim=0)


def triplet_hinge(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Per-triplet hinge: ``mean_t max(0, margin + D(q,p) - D(q,n))``."""
    return torch.relu(margin + distance(q, p) - distance(q, n)).mean()


def batch_hinge(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The official code's hinge: the max is taken of the batch mean, ``max(0, mean_t[m + D(q,p) - D(q,n)])``."""
    return torch.relu((margin + distance(q, p) - distance(q, n)).mean())


def contrastive(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """``1/(2T) sum_t [D(q,p)^2 + max(0, margin - D(q,n))^2]``: pulls positives in, pushes negatives past m."""
    dp, dn = distance(q, p), distance(q, n)
    return (dp.pow(2) + torch.relu(margin - dn).pow(2)).mean() / 2


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "hinge": triplet_hinge, "batch_hinge": batch_hinge, "contrastive": contrastive}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (choose from {', '.join(LOSSES)})")
    return LOSSES[name]


def triplet_correct(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``Tensor[T]`` bool: the paper's triplet accuracy counts a triplet right when D(q,n) > D(q,p)."""
    return distance(q, n) > distance(q, p)
