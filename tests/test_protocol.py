"""The evaluation protocol (product-disjoint splits), the P x K sampler, the batch losses and the per-query
metrics, on hand-computed values and on the real Grocery catalogue."""
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mildnet.data.catalogue import CatalogueItem, grocery_catalogue
from mildnet.data.samplers import PKSampler
from mildnet.data.splits import ROLES, SCHEMES, protocol_split
from mildnet.losses import NormSoftmax, ProxyAnchor, multi_similarity, similarity_preservation
from mildnet.metrics import (bootstrap_interval, paired_interval, per_query_retrieval, per_query_triplets,
                             split_report, spread, summarise)

GROCERY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "grocery"


@pytest.fixture(scope="module")
def grocery():
    return grocery_catalogue(GROCERY)


# --------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("scheme", SCHEMES)
def test_no_product_leaks_between_roles(grocery, scheme):
    sp = protocol_split(grocery, scheme, seed=0)
    assert not (sp.fit_products & sp.test_products)
    assert not (sp.fit_products & sp.dev_products)
    assert not (sp.dev_products & sp.test_products)
    assert sp.fit_products | sp.dev_products | sp.test_products == {it.item_id for it in grocery}
    # every street photo has exactly one role
    seen = Counter(i for r in ROLES for i in sp.roles[r])
    assert set(seen.values()) == {1}
    assert set(seen) == {i for i, it in enumerate(grocery) if it.domain == "street"}
    # training reads fit products only, never a val photo
    train = sp.training_images()
    assert {grocery[i].item_id for i in train} == set(sp.fit_products)
    assert all(grocery[i].split != "val" for i in train if grocery[i].domain == "street")
    for role, products in (("test_unseen", sp.test_products), ("dev_unseen", sp.dev_products)):
        assert {grocery[i].item_id for i in sp.roles[role]} == set(products)
    for role in ("fit", "dev_seen", "test_seen"):
        assert {grocery[i].item_id for i in sp.roles[role]} <= sp.fit_products
    assert not set(sp.roles["fit"]) & set(sp.roles["dev_seen"])
    assert all(grocery[i].split == "val" for i in sp.roles["test_seen"])
    # the catalogue every query searches is the whole catalogue
    assert len(sp.catalogue) == 81


def test_unseen_products_is_a_stratified_third(grocery):
    sp = protocol_split(grocery, "unseen_products", seed=0)
    assert abs(len(sp.test_products) - 27) <= 1
    per_category: dict[str, list[str]] = {}
    for it in grocery:
        per_category.setdefault(it.category, [])
        if it.item_id not in per_category[it.category]:
            per_category[it.category].append(it.item_id)
    for cat, products in per_category.items():
        held = sum(p in sp.test_products for p in products)
        assert math.floor(len(products) / 3) <= held <= math.ceil(len(products) / 3), cat


def test_unseen_kind_holds_out_every_package(grocery):
    sp = protocol_split(grocery, "unseen_kind", seed=0)
    packages = {it.item_id for it in grocery if it.metadata["kind"] == "Packages"}
    assert len(packages) == 31
    assert sp.test_products == packages
    assert {it.metadata["kind"] for it in grocery if it.item_id in sp.fit_products} == {"Fruit", "Vegetables"}


def test_split_is_seeded(grocery):
    a, b = protocol_split(grocery, seed=0), protocol_split(grocery, seed=0)
    assert a.roles == b.roles and a.test_products == b.test_products
    assert protocol_split(grocery, seed=1).test_products != a.test_products


@pytest.mark.parametrize("kw, match", [({"scheme": "nope"}, "scheme"), ({"test_fraction": 1.0}, "test_fraction"),
                                       ({"scheme": "unseen_kind", "held_out_kind": "Toys"}, "Toys")])
def test_split_refuses_bad_settings(grocery, kw, match):
    with pytest.raises(ValueError, match=match):
        protocol_split(grocery, **kw)


# --------------------------------------------------------------------------------------------- sampler
def _labels(n_products=5, photos=6):
    labels = [f"p{i}" for i in range(n_products) for _ in range(photos)] + [f"p{i}" for i in range(n_products)]
    shop = [False] * (n_products * photos) + [True] * n_products
    return labels, shop


def test_pk_sampler_batches_p_products_k_images():
    labels, shop = _labels()
    s = PKSampler(labels, P=3, K=4, is_catalogue=shop, catalogue_share=0.0, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 30 // 12
    for b in batches:
        counts = Counter(labels[i] for i in b)
        assert len(counts) == 3 and set(counts.values()) == {4}
        assert not any(shop[i] for i in b)


def test_pk_sampler_catalogue_share_and_seed():
    labels, shop = _labels()
    all_shop = PKSampler(labels, P=2, K=3, is_catalogue=shop, catalogue_share=1.0, seed=0)
    for b in all_shop:  # the first slot of each product is a photo, the others its catalogue image
        assert [shop[i] for i in b] == [False, True, True] * 2
    a, b = PKSampler(labels, P=2, K=3, seed=5), PKSampler(labels, P=2, K=3, seed=5)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_pk_sampler_takes_whole_categories():
    """groups: products p0-p2 are one category, p3-p4 another, p5 a third; with P=3 a batch is one whole category
    or, when it starts with a small one, that category and then products of the next, cut to fit."""
    labels, shop = _labels(n_products=6)
    cat = {"p0": "a", "p1": "a", "p2": "a", "p3": "b", "p4": "b", "p5": "c"}
    s = PKSampler(labels, P=3, K=2, is_catalogue=shop, groups=[cat[x] for x in labels], seed=0,
                  batches_per_epoch=200)
    firsts = Counter()
    for b in s:
        products = list(dict.fromkeys(labels[i] for i in b))  # in batch order
        assert len(products) == 3
        cats = [cat[p] for p in products]
        firsts[cats[0]] += 1
        assert cats == sorted(cats, key=cats.index)  # categories come whole, one after another
        if cats[0] == "a":
            assert set(products) == {"p0", "p1", "p2"}
        elif cats[0] == "b":
            assert set(products[:2]) == {"p3", "p4"}
        else:
            assert cats[1] != "c" and (cats[1] == "b" and set(products[1:]) == {"p3", "p4"} or cats[1] == "a")
    assert set(firsts) == {"a", "b", "c"}  # every category leads some batches
    plain = PKSampler(labels, P=3, K=2, is_catalogue=shop, seed=0, batches_per_epoch=200)
    together = sum({"p0", "p1", "p2"} <= {labels[i] for i in b} for b in plain)
    assert together < 40  # without groups, siblings meet by chance (1 in 20 batches)
    with pytest.raises(ValueError, match="groups has 1 entries"):
        PKSampler(labels, groups=["a"])


def test_pk_sampler_refuses_k1():
    with pytest.raises(ValueError, match="K must be >= 2"):
        PKSampler(["a", "b"], K=1)


# --------------------------------------------------------------------------------------------- losses
def test_multi_similarity_hand_computed():
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1])
    # anchor 0: s_pos 0.6, s_neg 0.8; anchor 1: s_pos 0.6, s_neg 0.96; anchor 2 has no positive (left out)
    a0 = 0.5 * math.log1p(math.exp(-0.2)) + 0.02 * math.log1p(math.exp(15))
    a1 = 0.5 * math.log1p(math.exp(-0.2)) + 0.02 * math.log1p(math.exp(50 * 0.46))
    assert multi_similarity(emb, labels).item() == pytest.approx((a0 + a1) / 2, rel=1e-5)


def test_multi_similarity_mines_away_easy_pairs():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # positives 1, negatives 0: all easy
    assert multi_similarity(emb, torch.tensor([0, 0, 1, 1])).item() == 0.0


def test_norm_softmax_hand_computed():
    loss = NormSoftmax(2, 2, temperature=0.5)
    with torch.no_grad():
        loss.proxies.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))  # normalised inside
    value = loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert value.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)


def test_proxy_anchor_hand_computed():
    loss = ProxyAnchor(2, 2, margin=0.1, alpha=32.0)
    with torch.no_grad():
        loss.proxies.copy_(torch.eye(2))
    value = loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    expected = math.log1p(math.exp(-32 * 0.9)) + (0.0 + math.log1p(math.exp(32 * 0.1))) / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_similarity_preservation_hand_computed():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6]])
    # pairs of different products: (0, 2) cosine 0.8 against 0.6, (1, 2) 0.8 against 0.8; the pair (0, 1) is one
    # product and free (cosine 1 against 0); each unordered pair counts twice in the (B, B) mean
    value = similarity_preservation(emb, ref, torch.tensor([0, 0, 1]))
    assert value.item() == pytest.approx((0.2 ** 2 + 0.0) / 2, rel=1e-5)
    assert similarity_preservation(ref, ref, torch.tensor([0, 1, 2])).item() == 0.0
    assert similarity_preservation(emb, ref, torch.tensor([0, 0, 0])).item() == 0.0  # nothing to keep


@pytest.mark.parametrize("make", [lambda: (lambda e, y: multi_similarity(e, y)),
                                  lambda: NormSoftmax(3, 4), lambda: ProxyAnchor(3, 4)])
def test_batch_losses_train_something(make):
    torch.manual_seed(0)
    loss_fn = make()
    x = torch.randn(12, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2] * 4)
    value = loss_fn(torch.nn.functional.normalize(x, dim=1), y)
    value.backward()
    assert torch.isfinite(value) and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- metrics
def test_per_query_retrieval_hand_computed():
    g = np.eye(4, dtype=np.float32)
    # the query is nearest to g2, then g1, g3, g0: relevance (label a at g0, g1) ranks [0, 1, 0, 1] -> AP 0.5
    q = np.array([[0.1, 0.5, 0.9, 0.2]], np.float32)
    r = per_query_retrieval(q, g, ["a"], ["a", "a", "c", "b"], ks=(1, 2))
    assert r["hit@1"].tolist() == [0.0] and r["hit@2"].tolist() == [1.0]
    assert r["AP"].tolist() == [pytest.approx(0.5)]


def test_leave_one_out_and_queries_without_relevant():
    e = np.eye(3, dtype=np.float32)
    r = per_query_retrieval(e, e, ["a", "a", "b"], ["a", "a", "b"], exclude_self=np.arange(3))
    assert r["kept"].tolist() == [0, 1]  # "b" has no other photo: nothing to find, left out


def test_triplets_spread_and_intervals():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    t = per_query_triplets(emb, ["a", "a", "b", "b"], ["x", "x", "x", "y"])
    assert t["in_class"][0] == 1.0 and np.isnan(t["in_class"][3])  # b in category y has no in-class negative
    assert t["out_class"][3] == 1.0
    s = spread(emb[:2], emb, ["a", "a", "b", "b"])
    assert s["margin"] > 0.8
    assert bootstrap_interval(np.ones(10)) == (1.0, 1.0)
    d = paired_interval(np.array([1.0, 1.0, 0.0]), np.array([0.0, 1.0, 0.0]))
    assert d["diff"] == pytest.approx(1 / 3) and 0.0 <= d["lo"] <= d["hi"] <= 1.0


def test_split_report_on_items():
    items = [CatalogueItem(Path(f"/x/{i}.jpg"), it, cat, dom) for i, (it, cat, dom) in enumerate(
        [("a", "x", "street"), ("a", "x", "street"), ("b", "x", "street"), ("b", "x", "street"),
         ("a", "x", "shop"), ("b", "x", "shop")])]
    emb = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [1, 0.05], [0.05, 1]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rep = summarise(split_report(emb, items, [0, 1, 2, 3], [4, 5]), n_boot=50)
    for name in ("photo_to_photo_mAP", "photo_to_catalogue_recall@1", "triplet_accuracy_in_class"):
        assert rep[name]["value"] == 1.0 and rep[name]["n"] == 4


def test_eval_protocol_cli(tmp_path, capsys):
    """`mildnet eval --protocol` on the real catalogue: the held-out products' photos, with intervals."""
    from mildnet.cli import main

    rc = main(["eval", "--model", "effnet_lite0_gap", "--pretrained", "--input-size", "64", "--catalogue",
               str(GROCERY), "--protocol", "unseen_kind", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    import json
    rep = json.loads((tmp_path / "results.json").read_text())
    role = rep["roles"]["test_unseen"]
    assert rep["split"]["products"]["test"] == 31
    assert role["queries"]["products"] == 31
    m = role["metrics"]["photo_to_catalogue_recall@5"]
    assert 0.0 <= m["lo"] <= m["value"] <= m["hi"] <= 1.0
    assert "test_unseen: photo_to_photo_recall@1=" in capsys.readouterr().out


def test_retrieval_augment_is_seeded_and_keeps_shape():
    from mildnet.data.transforms import RetrievalAugment

    img = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    aug = RetrievalAugment()
    a = aug(img, torch.Generator().manual_seed(1))
    assert a.shape == img.shape and a.dtype == torch.uint8
    assert torch.equal(a, aug(img, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, aug(img, torch.Generator().manual_seed(2)))


def test_the_default_recipe_is_what_the_study_chose():
    """MetricConfig's defaults are the recipe bench/accuracy.py chose on the dev split and reported."""
    import dataclasses
    import json

    from mildnet.metric_train import MetricConfig

    recipe = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" / "accuracy.json").read_text())[
        "settings"]["recipe"]
    defaults = dataclasses.asdict(MetricConfig())
    assert {k: defaults[k] for k in recipe if k not in ("model", "input_size", "seed")} == \
        {k: v for k, v in recipe.items() if k not in ("model", "input_size", "seed")}


def test_the_study_chooses_by_the_mean_over_seeds():
    """The screening ranks on the first seed; the choice is the best mean over all seeds of the confirmed ones,
    which can overturn the screening's order, and a candidate trained with one seed is never chosen."""
    from bench.accuracy import confirmed_best, screening_best

    study = {"a": {"study_score": 0.80}, "b": {"study_score": 0.79}, "c": {"study_score": 0.78},
             "d": {"study_score": 0.70}}
    assert screening_best(study, 3) == ["a", "b", "c"]
    study["a"]["study_score_mean"], study["b"]["study_score_mean"] = 0.75, 0.77
    study["c"]["study_score_mean"] = 0.76
    assert confirmed_best(study) == "b"
    with pytest.raises(ValueError, match="more than one seed"):
        confirmed_best({"d": {"study_score": 0.9}})


def test_centred_zero_shot_row_hand_computed():
    """bench/accuracy.py's centred backbone row: minus the mean of the training rows only, L2 again; an unreadable
    image (NaN row) stays NaN and is left out of the mean."""
    from bench.accuracy import _centred

    emb = np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, np.nan], [1.0, 1.0]])
    out = _centred(emb, [0, 1, 2])  # mean (0.5, 0.5); row 3 is not a training row
    s = np.sqrt(0.5)
    np.testing.assert_allclose(out[[0, 1]], [[s, -s], [-s, s]])
    np.testing.assert_allclose(out[3], [s, s])  # (1, 1) - (0.5, 0.5), L2
    assert np.isnan(out[2]).all()
