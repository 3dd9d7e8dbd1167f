"""Triplet creation invariants, on a synthetic catalogue and on the real Grocery one, plus the CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mildnet.cli import main
from mildnet.data.catalogue import CatalogueError, CatalogueItem, grocery_catalogue
from mildnet.data.triplets import TripletOptions, make_triplets, read_triplets


def _catalogue(root: Path) -> list[CatalogueItem]:
    """fruit: apple, pear, plum; veg: onion. Street photos in train/val, one shared shop image per item."""
    items = []
    for item, cat in (("apple", "fruit"), ("pear", "fruit"), ("plum", "fruit"), ("onion", "veg")):
        items.append(CatalogueItem(root / f"shop_{item}.png", item, cat, "shop", None))
        for split, n in (("train", 4), ("val", 2)):
            items += [CatalogueItem(root / f"{split}_{item}_{k}.png", item, cat, "street", split) for k in range(n)]
    return items


def _check_invariants(triplets, items):
    assert triplets
    for t in triplets:
        q, p, n = items[t.q], items[t.p], items[t.n]
        assert t.q != t.p and p.item_id == q.item_id, "positive shares the item"
        assert n.item_id != q.item_id, "negative is another item"
        if t.kind.endswith("in_class"):
            assert n.category == q.category
        else:
            assert n.category != q.category
        assert q.split == t.split or t.split == "all"
        for other in (p, n):  # splits never mix: only the same split or the shared catalogue
            assert other.split in (q.split, None)


@pytest.mark.parametrize("options", [
    TripletOptions(per_query=6, in_class_ratio=0.5, seed=0),
    TripletOptions(per_query=4, in_class_ratio=1.0, positives="any", negative_domain="any", seed=3),
    TripletOptions(per_query=3, in_class_ratio=0.0, positives="shop", seed=1),
])
def test_invariants_synthetic(tmp_path, options):
    items = _catalogue(tmp_path)
    triplets = make_triplets(items, options)
    _check_invariants(triplets, items)
    queries = [i for i, it in enumerate(items) if it.split is not None]
    assert {t.q for t in triplets} == set(queries) and len(triplets) == options.per_query * len(queries)
    if options.positives in ("auto", "shop"):  # street -> shop
        assert all(items[t.p].domain == "shop" for t in triplets)
    if options.negative_domain == "positive":
        assert all(items[t.n].domain == items[t.p].domain for t in triplets)


def test_category_with_one_item_falls_back_to_out_of_class(tmp_path):
    items = _catalogue(tmp_path)
    triplets = make_triplets(items, TripletOptions(per_query=4, in_class_ratio=1.0))
    onion = [t for t in triplets if items[t.q].item_id == "onion"]
    assert onion and all(t.kind == "out_class" for t in onion)
    apple = [t for t in triplets if items[t.q].item_id == "apple"]
    assert all(t.kind == "in_class" for t in apple)


def test_deterministic_per_seed(tmp_path):
    items = _catalogue(tmp_path)
    a = make_triplets(items, TripletOptions(seed=5))
    assert a == make_triplets(items, TripletOptions(seed=5))
    assert a != make_triplets(items, TripletOptions(seed=6))


def test_single_image_class_names_the_row(tmp_path):
    items = _catalogue(tmp_path) + [CatalogueItem(tmp_path / "lonely.png", "kiwi", "fruit", "street", "val", row=42)]
    with pytest.raises(CatalogueError, match=r"row 42 \(lonely.png\): item 'kiwi' has no other image"):
        make_triplets(items)
    with pytest.warns(UserWarning, match="kiwi"):
        triplets = make_triplets(items, TripletOptions(skip_singletons=True))
    assert all(items[t.q].item_id != "kiwi" for t in triplets)


def test_hard_negatives_are_the_nearest_wrong_items(tmp_path):
    items = _catalogue(tmp_path)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(items), 8)).astype(np.float32)
    plum_shop = next(i for i, it in enumerate(items) if it.item_id == "plum" and it.domain == "shop")
    apples = [i for i, it in enumerate(items) if it.item_id == "apple"]
    emb[apples] = emb[plum_shop] + 0.01 * rng.normal(size=(len(apples), 8))  # plum's image sits on the apples
    triplets = make_triplets(items, TripletOptions(per_query=2, hard_ratio=0.5, hard_pool=1), embeddings=emb)
    _check_invariants(triplets, items)
    hard = [t for t in triplets if items[t.q].item_id == "apple" and t.kind.startswith("hard")]
    assert hard and all(t.n == plum_shop and t.kind == "hard_in_class" for t in hard)
    with pytest.raises(ValueError, match="need embeddings"):
        make_triplets(items, TripletOptions(hard_ratio=0.5))


def test_grocery_invariants(grocery_root):
    items = grocery_catalogue(grocery_root)
    triplets = make_triplets(items, TripletOptions(per_query=4, seed=0))
    _check_invariants(triplets, items)
    kinds = {t.kind for t in triplets}
    assert kinds == {"in_class", "out_class"}
    val = [t for t in triplets if t.split == "val"]
    assert {t.q for t in val} == {i for i, it in enumerate(items) if it.split == "val"}


def test_files_and_cli(tmp_path):
    cat = tmp_path / "cat.csv"
    rows = ["path,item_id,category,domain,split"]
    for item, colour, category in (("a", (255, 0, 0), "x"), ("b", (0, 255, 0), "x"), ("c", (0, 0, 255), "y")):
        for k in range(3):
            Image.new("RGB", (8, 8), colour).save(tmp_path / f"{item}{k}.png")
            rows.append(f"{item}{k}.png,{item},{category},street,{'train' if k < 2 else 'val'}")
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{item}_shop.png")
        rows.append(f"{item}_shop.png,{item},{category},shop,")
    cat.write_text("\n".join(rows) + "\n")
    out = tmp_path / "trip"
    assert main(["triplets", str(cat), "--out", str(out), "--per-query", "2", "--seed", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"]["triplets"] == 12 and summary["splits"]["val"]["triplets"] == 6
    lines = list(csv.reader((out / "train.csv").open()))
    assert len(lines) == 12 and all(len(r) == 3 for r in lines)  # the official q,p,n layout, no header
    rows_, kinds = read_triplets(out / "val.csv")
    assert all(p.is_file() for r in rows_ for p in r) and len(kinds) == 6
    assert sum(summary["splits"]["val"]["by_kind"].values()) == 6
    # --hard-ratio without a model is a clear error
    assert main(["triplets", str(cat), "--out", str(out), "--hard-ratio", "0.5"]) == 1
