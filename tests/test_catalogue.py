"""Catalogue formats and adapters: good rows load, every bad row gets a CatalogueError naming it."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mildnet.data.catalogue import (CatalogueError, CatalogueItem, check_images, fashion_mnist_catalogue,
                                    folder_catalogue, grocery_catalogue, index_entries, load_catalogue,
                                    read_idx, read_triplet_csv, write_catalogue)


def _img(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    for name in ("a1", "a2", "b1", "c1"):
        _img(tmp_path / "img" / f"{name}.png")
    return tmp_path


def _write_csv(root: Path, text: str) -> Path:
    p = root / "cat.csv"
    p.write_text(text)
    return p


def test_csv_loads_rows_with_metadata(images):
    p = _write_csv(images, "path,item_id,category,domain,split,price\n"
                           "img/a1.png,a,fruit,street,train,1.5\n"
                           "img/a2.png,a,fruit,shop,,2\n")
    items = load_catalogue(p)
    assert [i.item_id for i in items] == ["a", "a"]
    assert items[0].path == (images / "img" / "a1.png").resolve()
    assert (items[0].domain, items[0].split, items[0].metadata) == ("street", "train", {"price": "1.5"})
    assert (items[1].domain, items[1].split) == ("shop", None)
    assert items[1].row == 3


def test_jsonl_and_roundtrip(images, tmp_path):
    p = images / "cat.jsonl"
    p.write_text(json.dumps({"path": "img/b1.png", "item_id": "b", "category": "veg",
                             "metadata": {"name": "Beet"}}) + "\n\n" +
                 json.dumps({"image": "img/c1.png", "item": "c", "category": "veg", "domain": "street"}) + "\n")
    items = load_catalogue(p)
    assert items[0].metadata == {"name": "Beet"} and items[1].domain == "street"
    out = write_catalogue(items, images / "again.csv")
    assert load_catalogue(out) == items


@pytest.mark.parametrize("text, needle", [
    ("path,item_id,category\nimg/a1.png,a,fruit\nimg/missing.png,a,fruit\n", "line 3: image file not found"),
    ("path,item_id,category\nimg/a1.png,a,fruit\nimg/a1.png,b,fruit\n", "row 3: image"),
    ("path,item_id,catgory\nimg/a1.png,a,fruit\n", "unknown column 'catgory': did you mean 'category'"),
    ("path,item_id\nimg/a1.png,a\n", "missing column(s) ['category']"),
    ("path,item_id,category\n../outside.png,a,fruit\n", "line 2: image path '../outside.png' leaves"),
    ("path,item_id,category\n/etc/passwd,a,fruit\n", "line 2: image path '/etc/passwd' leaves"),
    ("path,item_id,category,domain\nimg/a1.png,a,fruit,moon\n", "line 2: domain must be one of"),
    ("path,item_id,category\nimg/a1.png,,fruit\n", "line 2: empty item_id"),
    ("path,item_id,category\nimg/a1.png,a\n", "line 2: 2 fields, the header has 3"),
])
def test_bad_csv_rows_name_the_row(images, text, needle):
    with pytest.raises(CatalogueError) as e:
        load_catalogue(_write_csv(images, text))
    assert needle in str(e.value) and "cat.csv" in str(e.value)


def test_duplicate_ids_refused_only_where_ids_must_be_unique(images):
    p = _write_csv(images, "path,item_id,category\nimg/a1.png,a,fruit\nimg/a2.png,a,fruit\n")
    assert len(load_catalogue(p)) == 2
    with pytest.raises(CatalogueError, match="row 3: duplicate item_id 'a'"):
        load_catalogue(p, unique_ids=True)


def test_outside_root_allowed_on_request(images, tmp_path):
    outside = _img(tmp_path.parent / f"{tmp_path.name}_outside.png")
    p = _write_csv(images, f"path,item_id,category\n{outside},a,fruit\n")
    assert load_catalogue(p, allow_outside_root=True)[0].path == outside.resolve()


def test_bad_jsonl_line(images):
    p = images / "cat.jsonl"
    p.write_text('{"path": "img/a1.png", "item_id": "a", "category": "x"}\n{not json\n')
    with pytest.raises(CatalogueError, match="line 2: not valid JSON"):
        load_catalogue(p)


def test_grocery_adapter(grocery_root):
    items = grocery_catalogue(grocery_root, "val")
    photos = [i for i in items if i.domain == "street"]
    shop = [i for i in items if i.domain == "shop"]
    assert len(photos) == 296 and all(i.split == "val" for i in photos)
    assert len(shop) == 81 and all(i.split is None for i in shop) and len({i.item_id for i in shop}) == 81
    apples = {i.item_id for i in items if i.category == "Apple"}
    assert {"Granny-Smith", "Pink-Lady"} <= apples
    assert all(p.path.is_file() for p in photos[:5] + shop[:5])
    # auto-detected from the folder, every split
    assert len(load_catalogue(grocery_root)) == 2640 + 296 + 81


def test_folder_tree_two_levels_and_splits(tmp_path):
    _img(tmp_path / "train" / "fruit" / "apple" / "1.png")
    _img(tmp_path / "train" / "fruit" / "pear" / "1.png")
    _img(tmp_path / "val" / "shoes" / "x.jpg")
    items = folder_catalogue(tmp_path)
    got = sorted((i.split, i.category, i.item_id) for i in items)
    assert got == [("train", "fruit", "apple"), ("train", "fruit", "pear"), ("val", "shoes", "shoes")]
    assert load_catalogue(tmp_path) == items


def test_triplet_csv_groups_query_and_positive(images):
    p = images / "triplets.csv"
    p.write_text("img/a1.png,img/a2.png,img/b1.png\nimg/a2.png,img/a1.png,img/c1.png\n")
    assert read_triplet_csv(p)[0] == ("img/a1.png", "img/a2.png", "img/b1.png")
    items = {i.path.name: i for i in load_catalogue(p)}
    assert items["a1.png"].item_id == items["a2.png"].item_id != items["b1.png"].item_id
    assert items["b1.png"].item_id != items["c1.png"].item_id


def _write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_idx_reader_and_fashion_mnist_adapter(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (6, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 2, 5, 7, 1, 9], np.uint8))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs[:2])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 8], np.uint8))
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    items = fashion_mnist_catalogue(tmp_path, tmp_path / "png")
    assert [(i.split, i.item_id, i.category) for i in items[:3]] == [
        ("train", "T-shirt/top", "tops"), ("train", "Pullover", "tops"), ("train", "Sandal", "footwear")]
    assert items[-1].split == "val" and items[-1].item_id == "Bag"
    np.testing.assert_array_equal(np.asarray(Image.open(items[1].path)), imgs[1])
    again = load_catalogue(write_catalogue(items, tmp_path / "fashion.csv"))  # its metadata names no column alias
    assert [(i.item_id, i.metadata["class_index"]) for i in again] == [(i.item_id, str(i.metadata["class_index"]))
                                                                         for i in items]
    (tmp_path / "bad-idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(CatalogueError, match="IDX body is 3 bytes"):
        read_idx(tmp_path / "bad-idx")


def test_one_unreadable_image_is_reported_not_fatal(tmp_path):
    items = [CatalogueItem(_img(tmp_path / f"{k}.png"), f"i{k}", "c", row=k + 2) for k in range(30)]
    (tmp_path / "7.png").write_bytes(b"this is not a png")
    with pytest.warns(UserWarning, match="row 9"):
        good, bad = check_images(items)
    assert len(good) == 29 and len(bad) == 1 and "7.png" in bad[0]
    for k in range(8):
        (tmp_path / f"{k}.png").write_bytes(b"")
    with pytest.raises(CatalogueError, match="8 of 30 images are unreadable"), pytest.warns(UserWarning):
        check_images(items)


def test_index_entries_ids_metadata_and_checks(images):
    """What client/index.py stores: id = the ``id`` column, else the path under the root; ids unique; the
    root check of load_catalogue applies."""
    p = _write_csv(images, "path,item_id,category,id,price\nimg/a1.png,a,fruit,sku-1,2\nimg/b1.png,b,veg,,3\n")
    (id1, path1, meta1), (id2, _, meta2) = index_entries(p)
    assert (id1, id2) == ("sku-1", "img/b1.png") and path1 == (images / "img" / "a1.png").resolve()
    # the path relative to the catalogue root: a served hit must not show the server's file system
    assert meta1 == {"price": "2", "item_id": "a", "category": "fruit", "domain": "shop", "path": "img/a1.png"}
    assert "id" not in meta2
    p = _write_csv(images, "path,item_id,category,id\nimg/a1.png,a,fruit,x\nimg/a2.png,a,fruit,x\n")
    with pytest.raises(CatalogueError, match="id 'x' used by two images"):
        index_entries(p)
    p = _write_csv(images, "path,item_id,category\n../outside.png,a,fruit\n")
    with pytest.raises(CatalogueError, match="leaves the catalogue root"):
        index_entries(p)
