"""client/demo.py (`make demo`; its library is mildnet/demo.py): the data chooser and catalogue picking with
fakes, then the whole pipeline on a small slice of Grocery against a real Triton server, its page and summary
checked against the index."""
from __future__ import annotations

import dataclasses
import gzip
import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mildnet import demo
from mildnet.data.catalogue import CatalogueItem, load_catalogue, write_catalogue
from mildnet.index import load_index
from mildnet.metric_train import MetricConfig

ROOT = Path(__file__).resolve().parents[1]


# ---- the data chooser, with fake folders, network and git ---------------------------------------------------------
def fake_grocery(root: Path) -> Path:
    (root / "dataset").mkdir(parents=True)
    (root / "dataset" / "train.txt").write_text("")
    (root / "dataset" / "classes.csv").write_text("")
    return root


def fake_fashion(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"")
    return root


class Net:
    """Fake network + git: records clones; ``works`` makes the clone produce a Grocery folder."""

    def __init__(self, up: bool, works: bool = True):
        self.up, self.works, self.clones = up, works, []

    def online(self) -> bool:
        return self.up

    def clone(self, url: str, dest: Path) -> None:
        self.clones.append(url)
        if not self.works:
            raise subprocess.CalledProcessError(128, ["git", "clone", url])
        fake_grocery(dest)


def choose(tmp_path, net: Net, shared=False, cloned=False, fashion=False):
    paths = tmp_path / "shared", tmp_path / "work" / "clone", tmp_path / "fashion"
    for make, want, path in zip((fake_grocery, fake_grocery, fake_fashion), (shared, cloned, fashion), paths):
        if want:
            make(path)
    log: list[str] = []
    choice = demo.choose_data(*paths, is_online=net.online, clone=net.clone, log=log.append)
    return choice, paths, log


def test_chooser_takes_the_shared_grocery_first(tmp_path):
    net = Net(up=True)
    choice, (shared, _, _), log = choose(tmp_path, net, shared=True, cloned=True, fashion=True)
    assert (choice.kind, choice.root) == ("grocery", shared)
    assert net.clones == [] and str(shared) in log[0]


def test_chooser_reuses_an_earlier_clone_without_the_network(tmp_path):
    net = Net(up=False)
    choice, (_, clone_dir, _), _ = choose(tmp_path, net, cloned=True, fashion=True)
    assert (choice.kind, choice.root) == ("grocery", clone_dir) and net.clones == []


def test_chooser_clones_the_public_repository_when_online(tmp_path):
    net = Net(up=True)
    choice, (_, clone_dir, _), log = choose(tmp_path, net, fashion=True)
    assert (choice.kind, choice.root) == ("grocery", clone_dir)
    assert net.clones == [demo.GROCERY_REPO] and any("cloning" in m for m in log)


@pytest.mark.parametrize("net", [Net(up=False), Net(up=True, works=False)], ids=["offline", "clone-fails"])
def test_chooser_falls_back_to_fashion_mnist(tmp_path, net):
    choice, (_, _, fashion), log = choose(tmp_path, net, fashion=True)
    assert (choice.kind, choice.root) == ("fashion-mnist", fashion)
    assert any(("offline" if not net.up else "failed") in m for m in log)


def test_chooser_says_how_to_get_data_when_there_is_none(tmp_path):
    with pytest.raises(demo.DemoError) as e:
        choose(tmp_path, Net(up=False))
    msg = str(e.value)
    assert "shared" in msg and demo.GROCERY_REPO in msg and "apt-get install dataset-fashion-mnist" in msg


# ---- picking the catalogue and the queries ---------------------------------------------------------------------------
def test_spread_and_query_picking_cover_the_classes():
    assert demo.spread(list(range(10)), 3) == [0, 4, 9]  # ends included, evenly spaced
    assert demo.spread([1, 2], 5) == [1, 2] and demo.spread([1, 2], 0) == []
    photos = [CatalogueItem(Path(f"/{c}{i}.jpg"), c, "cat", "street", "val") for c in "abcd" for i in range(3)]
    assert [p.path.name for p in demo.pick_queries(photos, 2)] == ["a0.jpg", "d0.jpg"]
    six = demo.pick_queries(photos, 6)  # every class once, then second photos
    assert [p.path.name for p in six[:4]] == ["a0.jpg", "b0.jpg", "c0.jpg", "d0.jpg"]
    assert len(demo.pick_queries(photos, 50)) == 12


def test_grocery_slice_indexes_iconic_images_and_queries_val_photos(grocery_root, tmp_path):
    choice = demo.DataChoice("grocery", grocery_root, "test")
    data = demo.demo_data(choice, tmp_path, classes=3, queries=5)
    classes = {i.item_id for i in data.items}
    assert len(classes) == 3 and len(data.gallery) == 3
    assert all(i.domain == "shop" and "Iconic" in i.path.name for i in data.gallery)
    assert len(data.queries) == 5 and {q.item_id for q in data.queries} == classes
    assert all(q.split == "val" and q.domain == "street" for q in data.queries)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_gallery_comes_from_train_and_queries_from_val(tmp_path):
    root = tmp_path / "fashion"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, labels in (("train", np.repeat(np.arange(3), 8)), ("t10k", np.repeat(np.arange(3), 2))):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (len(labels), 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    data = demo.demo_data(demo.DataChoice("fashion-mnist", root, "test"), tmp_path / "work", queries=4)
    assert len(data.gallery) == 3 * demo.FASHION_GALLERY_PER_CLASS
    assert all(i.split == "train" for i in data.gallery)
    assert len(data.queries) == 4 and all(q.split == "val" for q in data.queries)
    assert all(i.path.is_relative_to(data.root) for i in data.items)
    # the catalogue the demo writes for `mildnet train --catalogue` reads back
    written = write_catalogue(data.items, tmp_path / "catalogue.jsonl", root=data.root)
    assert len(load_catalogue(written, root=data.root)) == len(data.items)


def test_locust_numbers_merge_the_request_types():
    entries = [{"method": "HTTP", "name": "similar", "num_requests": 3, "num_failures": 1, "start_time": 100.0,
                "last_request_timestamp": 110.0, "response_times": {"10": 2, "30": 1}},
               {"method": "gRPC", "name": "similar", "num_requests": 2, "num_failures": 0, "start_time": 101.0,
                "last_request_timestamp": 105.0, "response_times": {"20": 1, "500": 1}}]
    got = demo.locust_numbers(entries)
    assert (got["requests"], got["failures"], got["requests_per_s"]) == (5, 1, 0.5)
    assert got["latency_ms"] == {"50": 20.0, "95": 500.0, "99": 500.0}
    assert got["by_request"] == {"HTTP similar": 3, "gRPC similar": 2}


# ---- the real thing -------------------------------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.slow
def test_demo_end_to_end_on_a_slice(tmp_path, grocery_root):
    work, queries = tmp_path / "demo", 5
    cmd = [sys.executable, str(ROOT / "client" / "demo.py"), "--work", str(work), "--grocery", str(grocery_root),
           "--slice", "6", "--queries", str(queries), "--epochs", "1", "--input-size", "64",
           "--locust-seconds", "4", "--locust-users", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "=== summary" in r.stdout and "stop Triton" in r.stdout
    assert "search page: http://127.0.0.1:" in r.stdout  # the page ran while the demo did (--ui keeps it)

    summary = json.loads((work / "summary.json").read_text())
    page = (work / "results.html").read_text()
    index = load_index(summary["index"]["file"])
    assert len(index) == 6 and index.model_version == summary["model"]["model_version"]

    # the page, read back: one row per query, each with its top hits marked right/wrong
    rows = re.findall(r'<tr class="query" data-query="([^"]*)" data-item="([^"]*)">(.*?)</tr>', page, re.S)
    assert len(rows) == queries == summary["accuracy"]["queries"] == len(summary["results"])
    top1 = top5 = 0
    for (query, item, cells), result in zip(rows, summary["results"]):
        hits = re.findall(r'<td class="hit (right|wrong)" data-id="([^"]*)" data-rank="(\d+)">', cells)
        assert (query, item) == (result["query"], result["item_id"])
        assert [h[1] for h in hits] == [h["id"] for h in result["hits"]] and len(hits) == 5
        assert all(h[1] in index for h in hits), "every id on the page is in the index"
        for mark, hit_id, _ in hits:  # right = the hit's product (as the index knows it) is the query's
            assert (mark == "right") == (index.get(hit_id)[1]["item_id"] == item)
        top1 += hits[0][0] == "right"
        top5 += any(h[0] == "right" for h in hits)
    acc = summary["accuracy"]
    assert (acc["top1_correct"], acc["top5_correct"]) == (top1, top5)
    assert acc["top1_accuracy"] == pytest.approx(top1 / queries)
    assert f"{top1}/{queries}" in page and f"{top5}/{queries}" in page

    lo = summary["locust"]
    assert lo["requests"] > 0 and lo["failures"] == 0 and lo["latency_ms"]["50"] is not None
    assert Path(lo["report"]).stat().st_size > 10_000


def test_a_new_default_recipe_never_reuses_an_old_demo_run(tmp_path, monkeypatch):
    """The demo reuses a finished training run only when the recipe's defaults are the same: its folder is named
    after them as well as after the data and the flags."""
    runs = []
    monkeypatch.setattr(demo, "run_cmd", lambda cmd, **kw: runs.append(Path(cmd[cmd.index("--out") + 1])))
    monkeypatch.setattr(demo, "write_catalogue", lambda *a, **kw: tmp_path / "catalogue.jsonl")
    args = SimpleNamespace(model="mildnet_effnet_lite0", input_size=64, epochs=2)
    data = SimpleNamespace(items=[], root=tmp_path)
    demo.train_model(args, data, tmp_path, "data", tmp_path)
    demo.train_model(args, data, tmp_path, "data", tmp_path)
    monkeypatch.setattr(demo, "MetricConfig", lambda: dataclasses.replace(MetricConfig(), centre=False))
    demo.train_model(args, data, tmp_path, "data", tmp_path)
    assert runs[0] == runs[1] != runs[2]
