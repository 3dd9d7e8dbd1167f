"""`mildnet train --catalogue`: the default recipe end to end on a small real catalogue (Grocery photos)."""
import csv
import json
from pathlib import Path

import pytest
import torch

from mildnet.cli import main
from mildnet.data.catalogue import grocery_catalogue
from mildnet.models import create, load_checkpoint

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
