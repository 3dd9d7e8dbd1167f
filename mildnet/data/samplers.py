"""Batches of P products x K images, the sampling metric-learning losses need: every anchor has K - 1
positives and (P - 1) K negatives in its own batch.

A product's K images are drawn from its photos and, with probability ``catalogue_share`` each, its catalogue
image (``shop`` domain): the mix of photo-photo and photo-catalogue positives is a setting, not an accident of
the data. Everything is a function of (seed, epoch), so a resumed run draws the same batches.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np

from ..errors import UsageError

__all__ = ["PKSampler"]


class PKSampler:
    """Yields lists of ``P * K`` indices into ``labels`` (one batch each), ``len(self)`` batches an epoch.

    Args:
        labels: the product of each image.
        is_catalogue: per image, True for a catalogue (shop) image; None: all photos.
        P, K: products per batch and images per product (K >= 2: an anchor needs a positive).
        catalogue_share: chance that each of a product's K slots is its catalogue image (when it has one).
        groups: per image, its product's category; given, a batch takes whole categories (in a random order, the
            last one cut to fit P), so products of one category meet as each other's negatives in every batch
            they are in (without it they meet by chance).
        batches_per_epoch: default: enough batches for every photo to be seen about once.
    """

    def __init__(self, labels: Sequence, *, P: int = 16, K: int = 4, is_catalogue: Sequence[bool] | None = None,
                 catalogue_share: float = 0.25, batches_per_epoch: int | None = None, seed: int = 0,
                 groups: Sequence | None = None):
        if K < 2:
            raise UsageError(f"K must be >= 2 (an anchor needs a positive in its batch), got {K}")
        if not 0.0 <= catalogue_share <= 1.0:
            raise UsageError(f"catalogue_share must be in [0, 1], got {catalogue_share}")
        labels = list(labels)
        is_catalogue = [False] * len(labels) if is_catalogue is None else list(is_catalogue)
        if len(is_catalogue) != len(labels):
            raise UsageError(f"is_catalogue has {len(is_catalogue)} entries for {len(labels)} labels")
        photos: dict = defaultdict(list)
        shop: dict = defaultdict(list)
        for i, (lab, c) in enumerate(zip(labels, is_catalogue)):
            (shop if c else photos)[lab].append(i)
        self.products = sorted(p for p in photos if len(photos[p]) + len(shop[p]) >= 2)
        if len(self.products) < 2:
            raise UsageError(f"a P x K batch needs at least 2 products with 2 images each, got {len(self.products)}")
        self.P = min(P, len(self.products))
        self.K, self.catalogue_share, self.seed, self.epoch = K, catalogue_share, seed, 0
        self.photos, self.shop = dict(photos), dict(shop)
        self.groups: list[list[int]] | None = None  # product numbers (into self.products) of each category
        if groups is not None:
            groups = list(groups)
            if len(groups) != len(labels):
                raise UsageError(f"groups has {len(groups)} entries for {len(labels)} labels")
            group_of = {lab: g for lab, g in zip(labels, groups)}
            members: dict = defaultdict(list)
            for k, p in enumerate(self.products):
                members[group_of[p]].append(k)
            self.groups = [members[g] for g in sorted(members)]
        n_photos = sum(len(photos[p]) for p in self.products)
        self.batches = batches_per_epoch or max(1, n_photos // (self.P * self.K))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def _slots(self, product, rng: np.random.Generator) -> list[int]:
        photos, shop = self.photos.get(product, []), self.shop.get(product, [])
        use_shop = (rng.random(self.K) < self.catalogue_share) if shop else np.zeros(self.K, bool)
        use_shop[0] = False  # the first slot is always a photo: every product has a photo anchor
        n_photo = int((~use_shop).sum())
        picked = list(rng.choice(photos, n_photo, replace=len(photos) < n_photo))
        picked += [int(shop[rng.integers(len(shop))]) for _ in range(int(use_shop.sum()))]
        return [int(i) for i in picked]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.batches):
            chosen = self._whole_groups(rng) if self.groups else rng.choice(len(self.products), self.P, replace=False)
            yield [i for c in chosen for i in self._slots(self.products[c], rng)]

    def _whole_groups(self, rng: np.random.Generator) -> list[int]:
        """P product numbers: whole categories in a random order, each category's products shuffled."""
        chosen: list[int] = []
        for g in rng.permutation(len(self.groups)):
            chosen += list(rng.permutation(self.groups[g]))
            if len(chosen) >= self.P:
                break
        return chosen[:self.P]
