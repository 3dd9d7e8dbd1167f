"""Retrieval metrics on hand-computed toy rankings, ranking itself, the catalogue tasks and the results page."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mildnet.data.catalogue import CatalogueItem
from mildnet.evaluate import evaluate_catalogue, write_results_page
from mildnet.metrics import average_precision, mean_average_precision, rank, recall_at_k, retrieval_metrics

R = np.array  # ranked relevance of one query's results


@pytest.mark.parametrize("relevance, expected", [
    ([1, 0, 0], 1.0),
    ([0, 1, 0, 1], (1 / 2 + 2 / 4) / 2),  # relevant at ranks 2 and 4
    ([0, 0, 1], 1 / 3),
    ([1, 1, 0, 0, 1], (1 + 1 + 3 / 5) / 3),
])
def test_average_precision(relevance, expected):
    assert average_precision(R(relevance, bool)) == pytest.approx(expected)


def test_average_precision_without_relevant_is_nan():
    assert math.isnan(average_precision(R([0, 0], bool)))


def test_recall_and_map_over_queries():
    rankings = [R([0, 1, 0], bool), R([1, 0, 0], bool), R([0, 0, 0], bool), R([0, 0, 1], bool)]
    # the third query has nothing relevant: left out of both metrics
    assert recall_at_k(rankings, 1) == pytest.approx(1 / 3)
    assert recall_at_k(rankings, 2) == pytest.approx(2 / 3)
    assert recall_at_k(rankings, 3) == pytest.approx(1.0)
    assert mean_average_precision(rankings) == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)


def test_rank_and_leave_one_out():
    q = np.array([[0.0, 0.0], [10.0, 0.0]])
    g = np.array([[0.0, 0.0], [1.0, 0.0], [9.0, 0.0]])
    orders, dists = rank(q, g)
    assert [o.tolist() for o in orders] == [[0, 1, 2], [2, 1, 0]]
    np.testing.assert_allclose(dists[1], [1.0, 9.0, 10.0], atol=1e-5)
    orders, _ = rank(q, g, exclude=np.array([[True, False, False], [False, False, False]]))
    assert orders[0].tolist() == [1, 2]


def test_retrieval_metrics_per_class():
    orders = [np.array([1, 0]), np.array([0, 1])]
    m = retrieval_metrics(orders, ["a", "b"], ["a", "b"], ks=(1, 2))
    assert m["recall@1"] == 0.0 and m["recall@2"] == 1.0 and m["mAP"] == pytest.approx(0.5)
    assert m["per_class"]["a"] == {"queries": 1, "recall@1": 0.0, "AP": 0.5}


def test_evaluate_catalogue_tasks(tmp_path):
    # two items with one shop image each; street photos near their item's shop image
    items = [CatalogueItem(tmp_path / f"{n}.png", item, cat, dom, split) for n, item, cat, dom, split in [
        ("s0", "apple", "fruit", "shop", None), ("s1", "pear", "fruit", "shop", None),
        ("p0", "apple", "fruit", "street", "val"), ("p1", "apple", "fruit", "street", "val"),
        ("p2", "pear", "fruit", "street", "val"), ("t0", "pear", "fruit", "street", "train")]]
    emb = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0, 1]], np.float32)
    res = evaluate_catalogue(emb, items, "val", ks=(1,))
    t = res["tasks"]
    assert t["photo_to_catalogue"]["recall@1"] == pytest.approx(2 / 3)  # p1 is nearer the pear image
    assert t["photo_to_catalogue"]["queries"] == 3  # the train photo is not a val query
    # photo->photo, leave-one-out among p0 p1 p2: p0's nearest is p1 (apple, right); p1's is p2 (pear, wrong);
    # p2 (the only val pear) has nothing relevant and is left out of the recall
    assert t["photo_to_photo"]["recall@1"] == pytest.approx(1 / 2)
    assert t["photo_to_photo"]["queries_without_relevant"] == 1
    assert t["self_retrieval"]["top1_is_self"] == 1.0

    images = {i: torch.full((3, 8, 8), 40 * i, dtype=torch.uint8) for i in range(len(items))}
    items[2] = CatalogueItem(tmp_path / "<script>.png", "<b>apple</b>", "fruit", "street", "val")
    page = write_results_page(tmp_path / "r.html", "t<&>", items, images, res["rankings"]["photo_to_catalogue"],
                              top=2, summary={"x": "<i>"})
    text = Path(page).read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text and "&lt;b&gt;apple&lt;/b&gt;" in text
    assert text.count('class="right"') + text.count('class="wrong"') == 3 * 2
    assert "data:image/jpeg;base64," in text
