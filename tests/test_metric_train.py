"""`mildnet train --catalogue`: the default recipe end to end on a small real catalogue (Grocery photos)."""
import csv
import json
from pathlib import Path

import pytest
import torch

from mildnet.cli import main
from mildnet.data.catalogue import grocery_catalogue, load_catalogue
from mildnet.data.splits import protocol_split
from mildnet.errors import UsageError
from mildnet.metric_train import MetricConfig, pool_items
from mildnet.models import create, load_checkpoint
from mildnet.models.head import DenseHead, ResidualHead, centre_head

GROCERY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "grocery"


@pytest.fixture(scope="module")
def small_catalogue(tmp_path_factory):
    """10 products x 6 store photos + each product's catalogue image, as a user's CSV catalogue."""
    items = grocery_catalogue(GROCERY, "train")
    products = sorted({it.item_id for it in items})[::8][:10]
    rows, per = [], {}
    for it in items:
        if it.item_id in products and per.get((it.item_id, it.domain), 0) < (6 if it.domain == "street" else 1):
            per[(it.item_id, it.domain)] = per.get((it.item_id, it.domain), 0) + 1
            rows.append({"path": str(it.path.relative_to(GROCERY / "dataset")), "item_id": it.item_id, "category": it.category,
                         "domain": it.domain})
    path = tmp_path_factory.mktemp("cat") / "catalogue.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "item_id", "category", "domain"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def trained(small_catalogue, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", "--catalogue", str(small_catalogue), "--root", str(GROCERY / "dataset"), "--out", str(out),
               "--input-size", "64",
               "--epochs", "2", "--P", "4", "--K", "3", "--no-progress", "--threads", "2"])
    assert rc == 0
    return out


def test_default_recipe_writes_a_loadable_checkpoint(trained):
    model = load_checkpoint(trained / "best.pt")
    assert model.variant == "mildnet_effnet_lite0" and model.spec.input_size == 64
    assert model.model_kwargs["final_relu"] is False  # the recipe's head, rebuilt from the checkpoint
    assert model.model_kwargs["residual"] is True and model.embedding_dim == 1280  # the last map's width
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["config"]["loss"] == "proxy_anchor"
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2]
    assert metrics["best"]["epoch"] in (1, 2)
    assert (trained / "curves.png").stat().st_size > 0


def test_dev_products_never_train(trained):
    split = json.loads((trained / "metrics.json").read_text())["split"]
    assert split["products"]["dev"] == 2 and split["products"]["fit"] == 8 and split["products"]["test"] == 0
    assert split["photo_products"]["dev_unseen"] == 2


def test_only_the_head_trains(trained):
    model = load_checkpoint(trained / "best.pt")
    fresh = create("mildnet_effnet_lite0", pretrained=True, **model.model_kwargs)
    theirs = fresh.state_dict()
    for k, v in model.state_dict().items():
        same = torch.equal(v, theirs[k])
        assert same != k.startswith("head."), k  # backbone unchanged, head moved


@pytest.mark.parametrize("argv, match", [
    (["--out", "x"], "neither"),
    (["--out", "x", "--catalogue", "c.csv", "--train", "t.csv"], "both"),
])
def test_train_needs_one_recipe(argv, match, capsys):
    assert main(["train", *argv]) == 1
    assert match in capsys.readouterr().err


def test_triplet_recipe_refuses_a_batch_loss(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("a.jpg,b.jpg,c.jpg\n")
    assert main(["train", "--train", str(tmp_path / "t.csv"), "--out", str(tmp_path), "--loss",
                 "multi_similarity"]) == 1
    assert "--train (the triplet recipe) takes --loss" in capsys.readouterr().err


def test_residual_head_starts_at_the_zero_shot_backbone():
    """Before any training the residual recipe's embedding IS the ImageNet backbone's (GAP of the last map, L2);
    training then moves only the correction."""
    torch.manual_seed(0)
    ours = create("mildnet_effnet_lite0", pretrained=True, input_size=64, residual=True).eval()
    zero_shot = create("effnet_lite0_gap", pretrained=True, input_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), zero_shot(x), atol=1e-5, rtol=1e-4)
        ours.head.correction[-1].weight.add_(0.01)  # any correction moves it
        assert not torch.allclose(ours(x), zero_shot(x), atol=1e-3)


def test_centre_head_removes_the_mean_hand_computed():
    """ResidualHead output = L2(last columns) + correction; with a zero correction the mean removed is the mean of
    the normalised last columns, computed here by hand."""
    head = ResidualHead(in_dim=4, last_dim=2, hidden=3, dropout=0.5)
    pooled = torch.tensor([[1.0, 0.0, 3.0, 4.0], [0.0, 1.0, 0.0, 2.0]])  # last columns (3, 4) and (0, 2)
    mean = centre_head(head, pooled)
    torch.testing.assert_close(mean, torch.tensor([(0.6 + 0.0) / 2, (0.8 + 1.0) / 2]))
    torch.testing.assert_close(head.correction[-1].bias, -mean)
    torch.testing.assert_close(head.eval()(pooled), torch.tensor([[0.3, -0.1], [-0.3, 0.1]]))


def test_centre_head_on_a_dense_head_and_its_refusal():
    torch.manual_seed(0)
    rows = torch.randn(5, 6)
    linear_end = DenseHead(6, 4, dropout=0.5, final_relu=False)
    centre_head(linear_end, rows)
    torch.testing.assert_close(linear_end.eval()(rows).mean(0), torch.zeros(4), atol=1e-6, rtol=0)
    assert linear_end.training is False  # eval() above; centre_head itself restores the mode it found
    relu_end = DenseHead(6, 4, dropout=0.5, final_relu=True)
    with pytest.raises(UsageError, match="cannot be centred"):
        centre_head(relu_end, rows)
    with pytest.raises(UsageError, match="centre needs a head that ends in a linear layer"):
        MetricConfig(residual=False, final_relu=True, centre=True)


def test_the_kept_head_is_centred_on_the_training_images(small_catalogue, trained):
    """The checkpoint's embedding before L2 averages zero over the images it trained on (cfg.centre), the split
    rebuilt as `mildnet train --catalogue` makes it."""
    model = load_checkpoint(trained / "best.pt").eval()
    assert json.loads((trained / "metrics.json").read_text())["config"]["centre"] is True
    items = load_catalogue(small_catalogue, root=GROCERY / "dataset")
    split = protocol_split(items, "unseen_products", seed=0, test_fraction=0.0, dev_fraction=0.2,
                           dev_photo_fraction=0.15)
    with torch.no_grad():
        z = model.head(pool_items(model, [items[i] for i in split.training_images()], progress=False))  # (N, D)
    assert z.mean(0).abs().max() < 1e-4 < z.abs().mean()


def _synthetic_run(tmp_path, name, photo_views, shift, **recipe):
    """train_metric on random pooled taps of 8 products x 6 photos + a catalogue image each (no image is read):
    ``views`` gives each photo ``photo_views`` copies equal to its own taps plus ``shift``. Returns (the trained
    model, the pooled taps, the items)."""
    from pathlib import Path as P

    from mildnet.data.catalogue import CatalogueItem
    from mildnet.metric_train import train_metric

    items = [CatalogueItem(P(f"/none/{p}_{d}{k}.jpg"), f"p{p}", f"c{p % 2}", d)
             for p in range(8) for d, n in (("street", 6), ("shop", 1)) for k in range(n)]
    split = protocol_split(items, "unseen_products", seed=0, test_fraction=0.0, dev_fraction=0.25)
    torch.manual_seed(0)  # the same random head in every run
    model = create("mildnet_effnet_lite0", pretrained=False, input_size=64, residual=True, final_relu=False)
    pooled = torch.randn(len(items), model.pooled_dim, generator=torch.Generator().manual_seed(0)).abs()
    views = {i: pooled[i].expand(max(photo_views, 1), -1) + shift for i, it in enumerate(items)
             if it.domain == "street"}
    cfg = MetricConfig(out=str(tmp_path / name), **{"epochs": 2, "preserve": 0.0, **recipe}, P=4, K=2,
                       catalogue_views=0, photo_views=photo_views, progress=False, threads=1)
    return train_metric(cfg, items, split, pooled=pooled, views=views, model=model)["model"], pooled, items


def test_photo_views_are_what_photos_train_on(tmp_path):
    """Copies equal to the photo itself train exactly as no copies; shifted copies train something else: the
    photos' rows of the view table are the copies ``views`` gives."""
    plain, same, moved = (_synthetic_run(tmp_path, name, n, shift)[0].head.state_dict()
                          for name, n, shift in (("plain", 0, 0.0), ("same", 2, 0.0), ("moved", 2, 5.0)))
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    assert not all(torch.equal(plain[k], moved[k]) for k in plain)


def test_preserve_keeps_the_zero_shot_cosines_between_products(tmp_path):
    """With a preservation weight, the cosines between images of different products move less from the zero-shot
    backbone's than without it (same data, seed and epochs)."""
    from mildnet.metric_train import embed_pooled_rows

    def change(preserve):
        model, pooled, items = _synthetic_run(tmp_path / f"p{preserve}", "run", 0, 0.0, epochs=6, lr=3e-4,
                                              centre=False, preserve=preserve)
        emb = torch.from_numpy(embed_pooled_rows(model, pooled))
        ref = model.zero_shot_embedding(pooled)
        labels = [it.item_id for it in items]
        other = torch.tensor([[a != b for b in labels] for a in labels])
        return (emb @ emb.T - ref @ ref.T)[other].pow(2).mean().item()

    free, kept = change(0.0), change(50.0)
    assert kept < 0.5 * free, (kept, free)
