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
           "multi_similarity", "NormSoftmax", "ProxyAnchor", "BATCH_LOSSES",
           "triplet_correct", "similarity_preservation"]


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


# --------------------------------------------------------------------------------------------- batch losses
# Metric-learning losses over a batch of P products x K images (:class:`mildnet.data.samplers.PKSampler`):
# every other image of the batch is a positive (same label) or a negative, instead of one fixed negative per
# triplet. They take unit ``emb: Tensor[B, D]`` and integer ``labels: Tensor[B]``.

def multi_similarity(emb: torch.Tensor, labels: torch.Tensor, *, alpha: float = 2.0, beta: float = 50.0,
                     base: float = 0.5, mining_margin: float = 0.1) -> torch.Tensor:
    """Multi-similarity loss (Wang et al., CVPR 2019) on cosine similarities, with its pair mining: a negative
    counts when it is more similar than the hardest positive minus ``mining_margin``, a positive when it is
    less similar than the hardest negative plus it. Per anchor:
    ``1/alpha log(1 + sum_p exp(-alpha (s_p - base))) + 1/beta log(1 + sum_n exp(beta (s_n - base)))``,
    averaged over the anchors that have a positive."""
    sim = emb @ emb.T  # (B, B)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(emb), dtype=torch.bool, device=emb.device)
    pos_mask, neg_mask = same & ~eye, ~same
    big = torch.finfo(sim.dtype).max
    hardest_pos = torch.where(pos_mask, sim, torch.full_like(sim, big)).min(dim=1, keepdim=True).values
    hardest_neg = torch.where(neg_mask, sim, torch.full_like(sim, -big)).max(dim=1, keepdim=True).values
    pos_keep = pos_mask & (sim - mining_margin < hardest_neg)
    neg_keep = neg_mask & (sim + mining_margin > hardest_pos)
    zero = torch.zeros_like(sim)
    pos_term = torch.log1p(torch.where(pos_keep, torch.exp(-alpha * (sim - base)), zero).sum(1)) / alpha
    neg_term = torch.log1p(torch.where(neg_keep, torch.exp(beta * (sim - base)), zero).sum(1)) / beta
    has_pos = pos_mask.any(dim=1)
    if not has_pos.any():
        raise ValueError("multi_similarity: no anchor of the batch has a positive (sample K >= 2 per product)")
    return (pos_term + neg_term)[has_pos].mean()


class NormSoftmax(torch.nn.Module):
    """Normalised softmax (Zhai & Wu 2018): one learned unit proxy per training class, cross-entropy over the
    cosines divided by a temperature. ``forward(emb[B, D], labels[B]) -> loss``; the proxies are trained with
    the model and dropped afterwards (the embedding is what ships)."""

    def __init__(self, num_classes: int, dim: int, temperature: float = 0.05):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.proxies = torch.nn.Parameter(torch.randn(num_classes, dim) / dim ** 0.5)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = emb @ torch.nn.functional.normalize(self.proxies, dim=1).T / self.temperature  # (B, C)
        return torch.nn.functional.cross_entropy(logits, labels)


class ProxyAnchor(torch.nn.Module):
    """Proxy-anchor loss (Kim et al., CVPR 2020): each proxy pulls its class's embeddings of the batch and
    pushes the others, ``1/|P+| sum_p log(1 + sum_{x in p} e^{-a(s-m)}) + 1/|P| sum_p log(1 + sum_{x not in p}
    e^{a(s+m)})`` with P+ the proxies with a positive in the batch."""

    def __init__(self, num_classes: int, dim: int, margin: float = 0.1, alpha: float = 32.0):
        super().__init__()
        self.margin, self.alpha = margin, alpha
        self.proxies = torch.nn.Parameter(torch.randn(num_classes, dim) * (2.0 / dim) ** 0.5)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sim = emb @ torch.nn.functional.normalize(self.proxies, dim=1).T  # (B, C)
        pos = torch.nn.functional.one_hot(labels, sim.shape[1]).bool()
        zero = torch.zeros_like(sim)
        pos_sum = torch.where(pos, torch.exp(-self.alpha * (sim - self.margin)), zero).sum(0)  # (C,)
        neg_sum = torch.where(~pos, torch.exp(self.alpha * (sim + self.margin)), zero).sum(0)
        with_pos = pos.any(0)
        return torch.log1p(pos_sum[with_pos]).sum() / with_pos.sum() + torch.log1p(neg_sum).sum() / sim.shape[1]


BATCH_LOSSES = ("multi_similarity", "norm_softmax", "proxy_anchor")


def similarity_preservation(emb: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared change of the cosine between images of different products: ``emb, ref: Tensor[B, D_e],
    Tensor[B, D_r]`` unit rows (the trained and the zero-shot embedding of the same images), ``labels[B]``.
    Pairs of one product are left free (the metric loss pulls them together); the others keep the backbone's
    geometry, which is what tells apart products training never saw (a regulariser, weighted by
    ``MetricConfig.preserve``)."""
    neg = labels[:, None] != labels[None, :]  # (B, B)
    if not neg.any():
        return emb.sum() * 0.0
    diff = emb @ emb.T - ref @ ref.T
    return diff[neg].pow(2).mean()
