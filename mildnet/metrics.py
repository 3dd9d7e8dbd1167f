"""Retrieval and triplet metrics of the evaluation protocol (:mod:`mildnet.data.splits`), per query, with
bootstrap intervals over queries.

Every metric is first a vector with one value per query (hit@k, average precision, triplet correct), so a
figure's 95 % interval comes from resampling queries, and two models measured on the same queries are compared
by resampling the same queries for both (:func:`paired_interval`). Embeddings are unit vectors: cosine
similarity ranks exactly as Euclidean distance does.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from .losses import distance, get_loss, triplet_correct

__all__ = ["recall_at_k", "average_precision", "mean_average_precision", "rank", "retrieval_metrics",
           "triplet_metrics", "per_query_retrieval", "per_query_triplets", "spread", "bootstrap_interval",
           "paired_interval", "split_report", "summarise"]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64) @ np.asarray(b, np.float64).T


def per_query_retrieval(queries: np.ndarray, gallery: np.ndarray, q_labels: Sequence[str],
                        g_labels: Sequence[str], *, ks: Sequence[int] = (1, 5),
                        exclude_self: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-query ``hit@k`` (a relevant item in the first k) and ``AP`` for ``queries[Q, D]`` against
    ``gallery[G, D]``, relevant = same label. ``exclude_self[Q]``: each query's own gallery row (or -1), left
    out of its ranking. Queries with no relevant gallery item are dropped (returned in ``kept``)."""
    sim = _cos(queries, gallery)  # (Q, G)
    if exclude_self is not None:
        rows = np.flatnonzero(np.asarray(exclude_self) >= 0)
        sim[rows, np.asarray(exclude_self)[rows]] = -np.inf
    rel = np.asarray(q_labels)[:, None] == np.asarray(g_labels)[None, :]  # (Q, G)
    if exclude_self is not None:
        rel[rows, np.asarray(exclude_self)[rows]] = False
    order = np.argsort(-sim, axis=1, kind="stable")
    ranked = np.take_along_axis(rel, order, axis=1)  # (Q, G) relevance in rank order
    kept = ranked.any(axis=1)
    ranked = ranked[kept]
    out = {f"hit@{k}": ranked[:, :k].any(axis=1).astype(np.float64) for k in ks}
    hits = np.cumsum(ranked, axis=1)
    positions = np.arange(1, ranked.shape[1] + 1)
    out["AP"] = (np.where(ranked, hits / positions, 0.0).sum(axis=1) / ranked.sum(axis=1))
    out["kept"] = np.flatnonzero(kept)
    return out


def per_query_triplets(emb: np.ndarray, labels: Sequence[str], categories: Sequence[str], *, seed: int = 0,
                       per_query: int = 4) -> dict[str, np.ndarray]:
    """Triplet accuracy per query photo among ``emb[N, D]`` (photos of one split only): positive = another
    photo of the same product, negatives = photos of another product of the same category (``in_class``) or
    of another category (``out_class``). ``per_query`` triplets of each kind per query, drawn with a seeded
    generator; a query's value is its share of correct triplets (NaN where that kind has no negative)."""
    labels, categories = np.asarray(labels), np.asarray(categories)
    rng = np.random.default_rng(seed)
    sim = _cos(emb, emb)
    out = {"in_class": np.full(len(emb), np.nan), "out_class": np.full(len(emb), np.nan)}
    idx = np.arange(len(emb))
    for q in idx:
        pos = idx[(labels == labels[q]) & (idx != q)]
        if not len(pos):
            continue
        for kind, mask in (("in_class", (categories == categories[q]) & (labels != labels[q])),
                           ("out_class", categories != categories[q])):
            neg = idx[mask]
            if not len(neg):
                continue
            p = rng.choice(pos, per_query)
            n = rng.choice(neg, per_query)
            out[kind][q] = float(np.mean(sim[q, p] > sim[q, n]))
    return out


def spread(catalogue: np.ndarray, photos: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """How the embedding spreads things out: mean cosine between distinct catalogue images, and between photos
    of the same product vs of different products (their difference is the ``margin``)."""
    c = _cos(catalogue, catalogue) if len(catalogue) else np.zeros((0, 0))
    off = ~np.eye(len(c), dtype=bool)
    s = _cos(photos, photos)
    labels = np.asarray(labels)
    same = (labels[:, None] == labels[None, :]) & ~np.eye(len(s), dtype=bool)
    other = labels[:, None] != labels[None, :]
    out = {"catalogue_mean_cosine": float(c[off].mean()) if off.any() else float("nan"),
           "same_class_mean_cosine": float(s[same].mean()) if same.any() else float("nan"),
           "other_class_mean_cosine": float(s[other].mean()) if other.any() else float("nan")}
    out["margin"] = out["same_class_mean_cosine"] - out["other_class_mean_cosine"]
    return out


def bootstrap_interval(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values`` (NaN ignored) over queries resampled with replacement."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_interval(a: np.ndarray, b: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over the same queries and its 95 % bootstrap interval (queries resampled together)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same queries, got {a.shape} and {b.shape}")
    d = a - b
    lo, hi = bootstrap_interval(d, n_boot=n_boot, seed=seed)
    d = d[np.isfinite(d)]
    return {"diff": float(d.mean()) if len(d) else float("nan"), "lo": lo, "hi": hi}


def split_report(emb: np.ndarray, items: Sequence, queries: Sequence[int], catalogue: Sequence[int], *,
                 seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Per-query values of every protocol metric for the photos ``queries`` (indices into ``items`` and
    ``emb``): photo->photo among themselves (leave-one-out), photo->catalogue against ``catalogue``, triplets
    among the query photos; plus the spread. Metric names are the keys of the result's ``"per_query"``. Rows of
    ``emb`` that are not finite (unreadable images) are left out of both lists."""
    ok = np.isfinite(emb).all(axis=1)
    q = np.asarray([i for i in queries if ok[i]], dtype=np.int64)
    c = np.asarray([i for i in catalogue if ok[i]], dtype=np.int64)
    labels = [items[i].item_id for i in q]
    cats = [items[i].category for i in q]
    p2p = per_query_retrieval(emb[q], emb[q], labels, labels, exclude_self=np.arange(len(q)))
    trip = per_query_triplets(emb[q], labels, cats, seed=seed)
    per_query = {"photo_to_photo_recall@1": p2p["hit@1"], "photo_to_photo_recall@5": p2p["hit@5"],
                 "photo_to_photo_mAP": p2p["AP"]}
    counts = {"photos": len(q), "products": len(set(labels)), "photo_to_photo": len(p2p["kept"])}
    if len(c):  # a catalogue of photos only has no catalogue images to search
        p2c = per_query_retrieval(emb[q], emb[c], labels, [items[i].item_id for i in c])
        per_query.update({"photo_to_catalogue_recall@1": p2c["hit@1"], "photo_to_catalogue_recall@5": p2c["hit@5"]})
        counts["photo_to_catalogue"] = len(p2c["kept"])
    per_query.update({"triplet_accuracy_in_class": trip["in_class"], "triplet_accuracy_out_class": trip["out_class"]})
    return {"per_query": per_query, "spread": spread(emb[c], emb[q], labels), "queries": counts}


def summarise(report: dict, *, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "lo", "hi", "n"}}`` from a :func:`split_report` (95 % bootstrap over queries)."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for name, v in report["per_query"].items():
        v = np.asarray(v, np.float64)
        finite = v[np.isfinite(v)]
        lo, hi = bootstrap_interval(v, n_boot=n_boot, seed=seed)
        out[name] = {"value": float(finite.mean()) if len(finite) else float("nan"), "lo": lo, "hi": hi,
                     "n": int(len(finite))}
    return dict(out)


# ---- rankings (mildnet eval) ------------------------------------------------------------------------------------
def recall_at_k(relevance: Sequence[np.ndarray], k: int) -> float:
    """Share of queries with at least one relevant item among their first ``k`` results.

    ``relevance[q]`` is the ranked boolean relevance of query q's results. Queries with no relevant item at
    all are left out (nothing could be found); NaN when no query is left.
    """
    hits = [bool(np.any(r[:k])) for r in relevance if np.any(r)]
    return float(np.mean(hits)) if hits else float("nan")


def average_precision(relevance: np.ndarray) -> float:
    """AP of one ranking: the mean, over relevant positions i (1-based), of precision@i. NaN if none relevant."""
    r = np.asarray(relevance, dtype=bool)
    if not r.any():
        return float("nan")
    positions = np.flatnonzero(r) + 1  # 1-based ranks of the relevant results
    precision = np.arange(1, len(positions) + 1) / positions
    return float(precision.mean())


def mean_average_precision(relevance: Sequence[np.ndarray]) -> float:
    aps = [average_precision(r) for r in relevance if np.any(r)]
    return float(np.mean(aps)) if aps else float("nan")


def rank(queries: np.ndarray, gallery: np.ndarray, *, exclude: np.ndarray | None = None
         ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Rank ``gallery[G, D]`` for each of ``queries[Q, D]`` by Euclidean distance (nearest first).

    ``exclude[Q, G]`` (bool) removes pairs from the ranking (leave-one-out: a query's own image).
    Returns per query the gallery indices in rank order and their distances.
    """
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    g = torch.as_tensor(np.asarray(gallery, dtype=np.float32))
    d = torch.cdist(q, g).numpy()  # (Q, G)
    orders, dists = [], []
    for i in range(len(q)):
        idx = np.argsort(d[i], kind="stable")
        if exclude is not None:
            idx = idx[~exclude[i, idx]]
        orders.append(idx)
        dists.append(d[i, idx])
    return orders, dists


def retrieval_metrics(orders: Sequence[np.ndarray], query_labels: Sequence[str], gallery_labels: Sequence[str],
                      ks: Sequence[int] = (1, 5, 10)) -> dict:
    """recall@k and mAP overall and per query label, from rankings (relevant = same label)."""
    g = np.asarray(gallery_labels)
    relevance = [g[o] == ql for o, ql in zip(orders, query_labels)]
    out = {f"recall@{k}": recall_at_k(relevance, k) for k in ks}
    out["mAP"] = mean_average_precision(relevance)
    out["queries"] = len(relevance)
    out["queries_without_relevant"] = int(sum(not np.any(r) for r in relevance))
    per: dict[str, list] = defaultdict(list)
    for r, ql in zip(relevance, query_labels):
        per[ql].append(r)
    out["per_class"] = {c: {"queries": len(rs), "recall@1": recall_at_k(rs, 1), "AP": mean_average_precision(rs)}
                        for c, rs in sorted(per.items())}
    return out


# ---- triplets (mildnet train, mildnet eval) --------------------------------------------------------------------
def triplet_metrics(embeddings: np.ndarray | torch.Tensor, rows: torch.Tensor, loss_name: str = "hinge",
                    margin: float = 1.0, kinds: list[str] | None = None) -> dict[str, float]:
    """Loss and triplet accuracy of triplets given as rows ``Tensor[T, 3]`` into ``embeddings[N, D]``;
    with ``kinds``, the accuracy per kind too (``accuracy_in_class`` ...)."""
    emb = torch.as_tensor(embeddings, dtype=torch.float32)
    q, p, n = emb[rows[:, 0]], emb[rows[:, 1]], emb[rows[:, 2]]
    correct = triplet_correct(q, p, n)
    out = {"loss": float(get_loss(loss_name)(q, p, n, margin=margin)), "accuracy": float(correct.float().mean()),
           "triplets": int(len(rows)),
           "mean_d_pos": float(distance(q, p).mean()), "mean_d_neg": float(distance(q, n).mean())}
    if kinds is not None:
        k = np.asarray(kinds)
        c = correct.numpy()
        for kind in sorted(set(kinds)):
            out[f"accuracy_{kind}"] = float(c[k == kind].mean())
    return out
