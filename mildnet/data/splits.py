"""Product-disjoint splits for an honest evaluation, as deep metric learning does (In-Shop, Stanford Online
Products): the products a model is tested on were never seen in training, in any form.

:func:`protocol_split` assigns every image of a catalogue to exactly one role:

* ``fit``: photos (and catalogue images) of the *fit* products, the only images training reads;
* ``dev_seen``: held-out photos of fit products, and ``dev_unseen``: every photo of a few *dev* products
  that training never reads. Model selection (epoch, hyper-parameters) looks at these two only;
* ``test_seen``: photos of fit products that training never read (reported "seen products");
* ``test_unseen``: every photo of the *test* products (reported "unseen products" or "unseen kind").

Two schemes: ``unseen_products`` holds out about a third of the products, stratified by category, and
``unseen_kind`` holds out a whole top-level kind of product (Grocery: ``Packages``; train on fruit and
vegetables). Test products' catalogue images take part only as the catalogue that queries search (every split
searches the whole catalogue); nothing of a test or dev product is ever a training positive or negative.
Everything is drawn from ``numpy.random.default_rng`` seeded by ``seed``: the same catalogue gives the same
split.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import UsageError
from .catalogue import CatalogueError, CatalogueItem

__all__ = ["SCHEMES", "ROLES", "ProtocolSplit", "protocol_split", "kind_of"]

SCHEMES = ("unseen_products", "unseen_kind")
ROLES = ("fit", "dev_seen", "dev_unseen", "test_seen", "test_unseen")


def kind_of(item: CatalogueItem) -> str:
    """The top-level kind of product (Grocery: Fruit, Vegetables, Packages): ``metadata["kind"]`` when the
    catalogue gives one, else the item's category."""
    return str(item.metadata.get("kind") or item.category)


@dataclass(frozen=True)
class ProtocolSplit:
    """Which products and images play which role (indices into the catalogue list)."""

    scheme: str
    seed: int
    fit_products: frozenset[str]
    dev_products: frozenset[str]
    test_products: frozenset[str]
    roles: dict[str, list[int]] = field(default_factory=dict)  # role -> street-photo indices
    catalogue: list[int] = field(default_factory=list)  # every shop image: what all queries search
    fit_catalogue: list[int] = field(default_factory=list)  # shop images of fit products (training reads them)

    def training_images(self) -> list[int]:
        """Every image training may read: the fit photos and the fit products' catalogue images."""
        return sorted(self.roles["fit"] + self.fit_catalogue)

    def summary(self, items: Sequence[CatalogueItem]) -> dict:
        """Counts per role, and which products are where (for the JSON report)."""
        def n_products(idx: list[int]) -> int:
            return len({items[i].item_id for i in idx})
        return {"scheme": self.scheme, "seed": self.seed,
                "products": {"fit": len(self.fit_products), "dev": len(self.dev_products),
                             "test": len(self.test_products)},
                "photos": {r: len(ix) for r, ix in self.roles.items()},
                "photo_products": {r: n_products(ix) for r, ix in self.roles.items()},
                "catalogue_images": len(self.catalogue), "fit_catalogue_images": len(self.fit_catalogue),
                "test_product_names": sorted(self.test_products), "dev_product_names": sorted(self.dev_products)}


def _stratified_pick(groups: dict[str, list[str]], fraction: float, rng: np.random.Generator) -> set[str]:
    """About ``fraction`` of all products, spread over the groups: products are laid out group after group
    (groups and products in random order) and every k-th is taken, from a random offset. Each group with n
    products so gives floor or ceil of n * fraction, and the total is round(N * fraction) within one."""
    order = [p for g in rng.permutation(sorted(groups)) for p in rng.permutation(sorted(groups[g]))]
    if not order or fraction <= 0:
        return set()
    step = 1.0 / fraction
    start = rng.uniform(0, step)
    picked, x = set(), start
    while x < len(order):
        picked.add(order[int(x)])
        x += step
    return picked


def protocol_split(items: Sequence[CatalogueItem], scheme: str = "unseen_products", *, seed: int = 0,
                   test_fraction: float = 1 / 3, held_out_kind: str = "Packages", dev_fraction: float = 0.2,
                   dev_photo_fraction: float = 0.15) -> ProtocolSplit:
    """Split a catalogue with street photos and shop images into the roles of the module docstring.

    Args:
        scheme: ``unseen_products`` (``test_fraction`` of the products, stratified by category) or
            ``unseen_kind`` (every product whose :func:`kind_of` is ``held_out_kind``).
        dev_fraction: share of the remaining products held out of training for selection (``dev_unseen``).
        dev_photo_fraction: share of each fit product's training photos kept for selection (``dev_seen``).
    Photos whose catalogue split is ``val`` or ``test`` never train: those of fit products are ``test_seen``.
    """
    if scheme not in SCHEMES:
        raise UsageError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    for name, v in (("test_fraction", test_fraction), ("dev_fraction", dev_fraction),
                    ("dev_photo_fraction", dev_photo_fraction)):
        if not 0.0 <= v < 1.0:
            raise UsageError(f"{name} must be in [0, 1), got {v}")
    street = [i for i, it in enumerate(items) if it.domain == "street"]
    if not street:
        raise CatalogueError("a protocol split needs street photos (domain 'street'); the catalogue has none")
    rng = np.random.default_rng([seed, SCHEMES.index(scheme)])
    by_category: dict[str, set[str]] = defaultdict(set)
    kinds: dict[str, str] = {}
    for it in items:
        by_category[it.category].add(it.item_id)
        kinds[it.item_id] = kind_of(it)
    products = set(kinds)
    if scheme == "unseen_products":
        test = _stratified_pick({c: sorted(p) for c, p in by_category.items()}, test_fraction, rng)
    else:
        test = {p for p, k in kinds.items() if k == held_out_kind}
        if not test or test == products:
            raise CatalogueError(f"unseen_kind: kind {held_out_kind!r} must name some but not all products "
                                 f"(kinds here: {sorted(set(kinds.values()))})")
    rest = {c: sorted(p - test) for c, p in by_category.items() if p - test}
    dev = _stratified_pick(rest, dev_fraction, rng)
    fit = products - test - dev

    roles: dict[str, list[int]] = {r: [] for r in ROLES}
    fit_train_photos: dict[str, list[int]] = defaultdict(list)
    for i in street:
        it = items[i]
        if it.item_id in test:
            roles["test_unseen"].append(i)
        elif it.item_id in dev:
            roles["dev_unseen"].append(i)
        elif it.split in ("val", "test"):
            roles["test_seen"].append(i)
        else:
            fit_train_photos[it.item_id].append(i)
    for product, idx in sorted(fit_train_photos.items()):
        n_dev = int(round(len(idx) * dev_photo_fraction))
        chosen = set(rng.choice(idx, n_dev, replace=False).tolist()) if n_dev and len(idx) > 1 else set()
        for i in idx:
            roles["dev_seen" if i in chosen else "fit"].append(i)
    shop = [i for i, it in enumerate(items) if it.domain == "shop"]
    return ProtocolSplit(scheme, seed, frozenset(fit), frozenset(dev), frozenset(test),
                         {r: sorted(v) for r, v in roles.items()}, shop,
                         [i for i in shop if items[i].item_id in fit])
