"""Automatic triplet creation from a catalogue (``mildnet triplets``, :mod:`mildnet.commands.triplets`), MILDNet's
in-house recipe.

For every query image of a split:

* positive: another image of the same item; a street photo takes a shop image of its item when there is one
  (consumer -> shop, as Street2Shop), else another photo;
* in-class negative: an image of another item of the same category;
* out-of-class negative: an image of another category;
* hard negative (with a trained model): one of the ``hard_pool`` nearest images of another item.

Splits never mix: a query of split ``s`` only meets images of split ``s`` or shared images (``split=None``,
e.g. the shop catalogue every split searches). Everything is drawn from ``numpy.random.default_rng`` seeded
by (seed, split), so the same catalogue and seed always give the same triplets.

Output (:func:`write_triplets`): ``<split>.csv`` in the official q,p,n layout (three image paths per line,
no header), ``<split>.details.csv`` (the same rows with kind, items, categories), and ``summary.json`` (counts
by kind and by class, the options, and ``image_root``, the folder the paths are relative to).
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UsageError
from ..fileio import atomic_write_text
from .catalogue import CatalogueError, CatalogueItem, _resolve_path, read_triplet_csv

__all__ = ["TripletOptions", "Triplet", "make_triplets", "write_triplets", "read_triplets", "summarise",
           "nearest_wrong"]

KINDS = ("in_class", "out_class", "hard_in_class", "hard_out_class")
ALL_SPLIT = "all"  # name used when the catalogue has no splits


@dataclass(frozen=True)
class TripletOptions:
    """How many triplets per query and of which kinds.

    Per query: ``per_query`` triplets; ``round(per_query * hard_ratio)`` of them hard negatives (needs
    embeddings), of the rest ``round(rest * in_class_ratio)`` in-class (falling back to out-of-class for a
    category with one item). ``positives``: ``auto`` (street -> shop where the item has a shop image),
    ``shop`` or ``any``. ``negative_domain``: ``positive`` (negatives from the positive's domain: a query is
    compared to two catalogue images, as in retrieval) or ``any``.
    """

    per_query: int = 8
    in_class_ratio: float = 0.5
    hard_ratio: float = 0.0
    hard_pool: int = 10
    positives: str = "auto"
    negative_domain: str = "positive"
    seed: int = 0
    skip_singletons: bool = False

    def __post_init__(self) -> None:
        if self.per_query < 1:
            raise UsageError(f"per_query must be >= 1, got {self.per_query}")
        for name in ("in_class_ratio", "hard_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.positives not in ("auto", "shop", "any"):
            raise UsageError(f"positives must be auto, shop or any, got {self.positives!r}")
        if self.negative_domain not in ("positive", "any"):
            raise UsageError(f"negative_domain must be positive or any, got {self.negative_domain!r}")
        if self.hard_pool < 1:
            raise UsageError(f"hard_pool must be >= 1, got {self.hard_pool}")


@dataclass(frozen=True)
class Triplet:
    """Indices into the catalogue list, the negative's kind and the query's split."""

    q: int
    p: int
    n: int
    kind: str
    split: str


def _split_name(split: str | None) -> str:
    return split if split is not None else ALL_SPLIT


def make_triplets(items: Sequence[CatalogueItem], options: TripletOptions = TripletOptions(), *,
                  splits: Sequence[str] | None = None,
                  embeddings: np.ndarray | None = None) -> list[Triplet]:
    """Triplets for every query of every split (or of ``splits``); see the module docstring.

    Args:
        items: the catalogue.
        embeddings: ``ndarray[len(items), D]`` unit embeddings for hard-negative mining (or None).
    Raises:
        CatalogueError: an item with a single image (no positive possible) unless ``skip_singletons``; a
            split with no negative at all.
    """
    if options.hard_ratio > 0 and embeddings is None:
        raise UsageError("hard negatives (hard_ratio > 0) need embeddings from a trained model (--checkpoint)")
    has_splits = any(it.split is not None for it in items)
    present = sorted({it.split for it in items if it.split is not None}) if has_splits else [None]
    wanted = present if splits is None else list(splits)
    out: list[Triplet] = []
    for s_index, split in enumerate(present):
        if has_splits and split not in wanted:
            continue
        rng = np.random.default_rng([options.seed, s_index])
        # queries: this split's images; pool: this split's plus the shared (split=None) ones
        queries = [i for i, it in enumerate(items) if it.split == split] if has_splits else list(range(len(items)))
        pool = [i for i, it in enumerate(items) if it.split == split or it.split is None]
        out.extend(_split_triplets(items, queries, pool, _split_name(split), options, rng, embeddings))
    return out


def _split_triplets(items, queries, pool, split_name, options, rng, embeddings) -> list[Triplet]:
    by_item: dict[str, list[int]] = defaultdict(list)
    by_category: dict[str, list[int]] = defaultdict(list)
    for i in pool:
        by_item[items[i].item_id].append(i)
        by_category[items[i].category].append(i)
    n_hard = round(options.per_query * options.hard_ratio)
    n_in = round((options.per_query - n_hard) * options.in_class_ratio)
    n_out = options.per_query - n_hard - n_in
    hard = nearest_wrong(embeddings, items, queries, pool, options.hard_pool) if n_hard else {}

    out: list[Triplet] = []
    for qi in queries:
        q = items[qi]
        candidates = [i for i in by_item[q.item_id] if i != qi]
        if options.positives != "any":
            shop = [i for i in candidates if items[i].domain == "shop"]
            if options.positives == "shop" or (q.domain == "street" and shop):
                candidates = shop
        if not candidates:
            msg = (f"row {q.row or qi + 1} ({q.path.name}): item {q.item_id!r} has no other image "
                   f"{'in the shop domain ' if options.positives == 'shop' else ''}in split {split_name!r} "
                   "to be its positive (a class with one image cannot make triplets)")
            if options.skip_singletons:
                warnings.warn(f"skipping query: {msg}", stacklevel=3)
                continue
            raise CatalogueError(msg + "; pass --skip-singletons to leave such queries out")
        positives = rng.permutation(candidates)

        # Negative candidates per (kind, domain), shuffled once per query and drawn in turn: without
        # replacement while candidates last. An empty in-class list (a category with one item) falls back
        # to out-of-class, and the triplet is counted as such.
        shuffled: dict[tuple[str, str], np.ndarray] = {}
        used: Counter = Counter()

        def draw(kind: str, domain: str) -> tuple[str, int]:
            key = (kind, domain)
            if key not in shuffled:
                if kind == "in_class":
                    cands = [i for i in by_category[q.category] if items[i].item_id != q.item_id]
                else:
                    cands = [i for c, idx in by_category.items() if c != q.category for i in idx]
                if domain:
                    cands = [i for i in cands if items[i].domain == domain]
                shuffled[key] = rng.permutation(cands) if cands else np.empty(0, dtype=np.int64)
            perm = shuffled[key]
            if len(perm) == 0:
                if kind == "in_class":
                    return draw("out_class", domain)
                raise CatalogueError(f"split {split_name!r}: no negative for row {q.row or qi + 1} "
                                     f"({q.path.name}): the catalogue needs at least two items per split")
            n = int(perm[used[key] % len(perm)])
            used[key] += 1
            return kind, n

        plan = ["hard"] * n_hard + ["in_class"] * n_in + ["out_class"] * n_out
        for t, kind in enumerate(plan):
            p = int(positives[t % len(positives)])
            domain = items[p].domain if options.negative_domain == "positive" else ""
            if kind == "hard":
                cands = [i for i in hard.get(qi, []) if not domain or items[i].domain == domain]
                if cands:
                    n = int(cands[rng.integers(len(cands))])
                    kind = "hard_in_class" if items[n].category == q.category else "hard_out_class"
                    out.append(Triplet(qi, p, n, kind, split_name))
                    continue
                kind = "out_class"  # no hard candidate in this domain
            kind, n = draw(kind, domain)
            out.append(Triplet(qi, p, n, kind, split_name))
    return out


def nearest_wrong(embeddings: np.ndarray | None, items: Sequence[CatalogueItem], queries: Sequence[int],
                  pool: Sequence[int], k: int) -> dict[int, list[int]]:
    """For each query, the ``k`` pool images of *other* items nearest to it (Euclidean on the embeddings)."""
    if embeddings is None:
        return {}
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.shape[0] != len(items):
        raise UsageError(f"embeddings has {emb.shape[0]} rows for {len(items)} catalogue items")
    pool_arr = np.asarray(pool)
    pool_items = np.asarray([items[i].item_id for i in pool])
    g = emb[pool_arr]  # (G, D)
    out: dict[int, list[int]] = {}
    for start in range(0, len(queries), 512):
        qs = np.asarray(queries[start:start + 512])
        d = (emb[qs] ** 2).sum(1)[:, None] - 2 * emb[qs] @ g.T + (g ** 2).sum(1)[None, :]  # (B, G)
        for row, qi in enumerate(qs):
            wrong = pool_items != items[qi].item_id
            idx = np.flatnonzero(wrong)
            nearest = idx[np.argsort(d[row, idx], kind="stable")[:k]]
            out[int(qi)] = [int(pool_arr[j]) for j in nearest]
    return out


# --------------------------------------------------------------------------------------------- files
def common_root(items: Sequence[CatalogueItem]) -> Path:
    return Path(os.path.commonpath([str(it.path.parent) for it in items]))


def summarise(triplets: Sequence[Triplet], items: Sequence[CatalogueItem]) -> dict:
    """Counts by split, kind, query item and query category."""
    out: dict = {}
    for split in sorted({t.split for t in triplets}):
        ts = [t for t in triplets if t.split == split]
        by_class: dict[str, Counter] = defaultdict(Counter)
        for t in ts:
            by_class[items[t.q].item_id][t.kind] += 1
        out[split] = {
            "triplets": len(ts),
            "queries": len({t.q for t in ts}),
            "by_kind": dict(Counter(t.kind for t in ts)),
            "by_category": dict(Counter(items[t.q].category for t in ts)),
            "by_item": {k: dict(v) for k, v in sorted(by_class.items())},
        }
    return out


def write_triplets(out_dir: str | os.PathLike, triplets: Sequence[Triplet], items: Sequence[CatalogueItem],
                   *, image_root: Path | None = None, options: TripletOptions | None = None,
                   extra: dict | None = None) -> dict:
    """Write ``<split>.csv`` (official q,p,n), ``<split>.details.csv`` and ``summary.json``; return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_root = (image_root or common_root(items)).resolve()

    def rel(i: int) -> str:
        try:
            return items[i].path.relative_to(image_root).as_posix()
        except ValueError:
            return str(items[i].path)

    files = {}
    for split in sorted({t.split for t in triplets}):
        ts = [t for t in triplets if t.split == split]
        plain, details = io.StringIO(), io.StringIO()
        w, wd = csv.writer(plain, lineterminator="\n"), csv.writer(details, lineterminator="\n")
        wd.writerow(["q", "p", "n", "kind", "query_item", "negative_item", "query_category",
                     "negative_category", "split"])
        for t in ts:
            w.writerow([rel(t.q), rel(t.p), rel(t.n)])
            wd.writerow([rel(t.q), rel(t.p), rel(t.n), t.kind, items[t.q].item_id, items[t.n].item_id,
                         items[t.q].category, items[t.n].category, split])
        atomic_write_text(out_dir / f"{split}.csv", plain.getvalue())
        atomic_write_text(out_dir / f"{split}.details.csv", details.getvalue())
        files[split] = f"{split}.csv"
    summary = {"image_root": str(image_root), "files": files,
               "options": asdict(options) if options else None, "splits": summarise(triplets, items),
               **(extra or {})}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    return summary


def read_triplets(csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                  allow_outside_root: bool = False) -> tuple[list[tuple[Path, Path, Path]], list[str] | None]:
    """Read a q,p,n CSV into absolute paths, and the kinds from ``<split>.details.csv`` beside it (or None).

    ``image_root`` defaults to the ``image_root`` recorded in ``summary.json`` beside the CSV, else the CSV's
    folder. Paths leaving it are refused unless ``allow_outside_root``.
    """
    csv_path = Path(csv_path)
    if image_root is None:
        summary = csv_path.parent / "summary.json"
        image_root = json.loads(summary.read_text()).get("image_root") if summary.is_file() else None
    root = Path(image_root) if image_root else csv_path.parent
    rows = []
    for r, (q, p, n) in enumerate(read_triplet_csv(csv_path), 1):
        where = f"{csv_path}: triplet {r}"
        rows.append(tuple(_resolve_path(x, root, allow_outside_root, where, True) for x in (q, p, n)))
    details = csv_path.with_name(csv_path.stem + ".details.csv")
    kinds = None
    if details.is_file():
        with open(details, encoding="utf-8", newline="") as f:
            kinds = [row["kind"] for row in csv.DictReader(f)]
        if len(kinds) != len(rows):
            kinds = None  # stale details file: ignore rather than mislabel
    return rows, kinds
