"""Training on a real Grocery slice: it learns, resumes exactly, runs under torchrun (gloo), and evaluates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mildnet.cli import main
from mildnet.data.catalogue import grocery_catalogue, write_catalogue
from mildnet.data.datasets import ImageCache, TripletDataset
from mildnet.data.transforms import PaperAugment
from mildnet.data.triplets import TripletOptions, make_triplets, write_triplets
from mildnet.imageio import decode_resized, normalize, preprocess
from mildnet.models import create, load_checkpoint
from mildnet.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SLICE = ("Granny-Smith", "Red-Delicious", "Banana", "Watermelon", "Yellow-Onion", "Lemon", "Oatly-Oat-Milk",
         "Arla-Standard-Milk")


@pytest.fixture(scope="module")
def grocery_slice(tmp_path_factory, grocery_root):
    """8 items (2 apples, 2 milks, 4 singles) of real Grocery photos: triplets + a catalogue CSV."""
    out = tmp_path_factory.mktemp("slice")
    items = [it for it in grocery_catalogue(grocery_root) if it.item_id in SLICE]
    write_triplets(out / "triplets", make_triplets(items, TripletOptions(per_query=2, seed=0)), items)
    write_catalogue(items, out / "catalogue.csv", root=grocery_root / "dataset")
    return out


@pytest.fixture(scope="module")
def trained(grocery_slice):
    """A short real run: pretrained MILDNet-Mobile, backbone frozen (head only), 64 px, 48 triplets, 3 epochs."""
    torch.set_num_threads(2)
    cfg = TrainConfig(train=str(grocery_slice / "triplets" / "train.csv"),
                      val=str(grocery_slice / "triplets" / "val.csv"), out=str(grocery_slice / "run"),
                      model="mildnet_mobile", pretrained=True, input_size=64, epochs=3, batch_size=8,
                      max_train_triplets=48, optimizer="adamw", lr=1e-3, augment=False, freeze_units=14,
                      freeze_bn=True, progress=False)
    return cfg, train(cfg)


def test_training_raises_val_triplet_accuracy(trained):
    cfg, result = trained
    start, *epochs = result["history"]
    assert start["epoch"] == 0 and len(epochs) == 3
    assert epochs[-1]["val_loss"] < start["val_loss"] - 0.01
    assert max(e["val_accuracy"] for e in epochs) > start["val_accuracy"] + 0.02
    out = Path(cfg.out)
    for name in ("metrics.csv", "metrics.json", "curves.png", "last.pt"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == result["best"]["epoch"] and ckpt["variant"] == "mildnet_mobile"
    model = load_checkpoint(out / "best.pt")
    assert model.spec.input_size == 64


def test_eval_cli_on_trained_checkpoint(trained, grocery_slice, grocery_root):
    cfg, _ = trained
    out = grocery_slice / "eval"
    assert main(["eval", "--checkpoint", str(Path(cfg.out) / "best.pt"), "--catalogue",
                 str(grocery_slice / "catalogue.csv"), "--root", str(grocery_root / "dataset"), "--split", "val",
                 "--triplets", str(grocery_slice / "triplets" / "val.csv"), "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "results.json").read_text())
    best = json.loads((Path(cfg.out) / "metrics.json").read_text())["best"]
    assert rep["triplets"]["accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-6)  # same metric, same data
    r = rep["retrieval"]
    assert set(r) == {"photo_to_catalogue", "photo_to_photo", "self_retrieval"}
    assert r["self_retrieval"]["top1_is_self"] == 1.0
    assert 0.0 <= r["photo_to_catalogue"]["recall@1"] <= r["photo_to_catalogue"]["recall@5"] <= 1.0
    assert set(r["photo_to_catalogue"]["per_class"]) <= set(SLICE)
    assert "Granny-Smith" in (out / "results.html").read_text()


def test_resume_after_interruption_gives_identical_weights(grocery_slice, tmp_path):
    base = dict(train=str(grocery_slice / "triplets" / "train.csv"), val=str(grocery_slice / "triplets" / "val.csv"),
                model="mildnet_mobile_noskip", input_size=32, epochs=2, batch_size=4, max_train_triplets=12,
                max_val_triplets=8, augment=True, seed=3, progress=False, cache=str(tmp_path / "cache.pt"),
                freeze_units=8)  # half the backbone trains: quicker, still BN + dropout + augmentation
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **base))
    # interrupted in the middle of epoch 2 (after 4 of 6 steps), then resumed
    cut = train(TrainConfig(out=str(tmp_path / "cut"), max_steps=4, **base))
    assert cut["stopped"] and json.loads((tmp_path / "cut" / "metrics.json").read_text())["history"][-1]["epoch"] == 1
    resumed = train(TrainConfig(out=str(tmp_path / "cut"), **base), resume=True)
    assert resumed["step"] == whole["step"] == 6
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["val_loss"] for h in whole["history"]] == [h["val_loss"] for h in resumed["history"]]
    with pytest.raises(ValueError, match="seed=3"):
        train(TrainConfig(out=str(tmp_path / "cut"), **{**base, "seed": 4}), resume=True)


@pytest.mark.parametrize("tap_norm", [False, True])
def test_pooling_once_trains_like_the_full_forward(grocery_slice, tmp_path, tap_norm, capsys):
    """Head-only, unaugmented training on taps pooled once equals running the frozen backbone every step."""
    base = dict(train=str(grocery_slice / "triplets" / "train.csv"), val=str(grocery_slice / "triplets" / "val.csv"),
                model="mildnet_mobile", input_size=48, epochs=2, batch_size=4, max_train_triplets=16,
                max_val_triplets=12, augment=False, freeze_backbone=True, seed=5, progress=False,
                optimizer="adamw", lr=1e-3, cache=str(tmp_path / "cache.pt"),
                model_kwargs={"tap_norm": True} if tap_norm else {})
    full = train(TrainConfig(out=str(tmp_path / "full"), pool_once=False, **base))
    assert "pooling the taps" not in capsys.readouterr().out
    once = train(TrainConfig(out=str(tmp_path / "once"), **base))
    assert "pooling the taps of" in capsys.readouterr().out
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "once" / "last.pt", weights_only=True)["model"]
    torch.manual_seed(5)  # train() builds the model right after seeding: these are its starting weights
    start = create("mildnet_mobile", **base["model_kwargs"]).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
        assert torch.equal(a[k], start[k]) != k.startswith("head."), k  # only the head trained
    for h_full, h_once in zip(full["history"], once["history"], strict=True):
        assert h_once["val_loss"] == pytest.approx(h_full["val_loss"], abs=1e-4)
        assert h_once["train_loss"] == pytest.approx(h_full["train_loss"], abs=1e-4, nan_ok=True)


def test_pool_once_is_not_used_when_the_backbone_trains_or_images_are_augmented(grocery_slice, tmp_path, capsys):
    base = dict(train=str(grocery_slice / "triplets" / "train.csv"), model="mildnet_mobile_noskip", input_size=32,
                epochs=1, batch_size=4, max_train_triplets=4, progress=False, cache=str(tmp_path / "cache.pt"))
    train(TrainConfig(out=str(tmp_path / "a"), augment=False, freeze_units=8, **base))  # top of backbone trains
    train(TrainConfig(out=str(tmp_path / "b"), augment=True, freeze_backbone=True, **base))
    assert "pooling the taps" not in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("head_only", [False, True], ids=["backbone", "head_only_pooled"])
def test_torchrun_ddp_two_processes_gloo(grocery_slice, tmp_path, head_only):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mildnet", "train", "--train", str(grocery_slice / "triplets" / "train.csv"),
           "--val", str(grocery_slice / "triplets" / "val.csv"), "--out", str(out), "--model", "mildnet_mobile_noskip",
           "--input-size", "32", "--epochs", "1", "--batch-size", "4", "--max-train-triplets", "16",
           "--max-val-triplets", "8", "--no-progress", "--device", "cpu"]
    cmd += ["--freeze-backbone", "--no-augment"] if head_only else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("pooling the taps" in proc.stdout) == head_only
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[-1]["epoch"] == 1 and history[-1]["step"] == 2  # 16 triplets / (2 processes x 4)
    assert (out / "best.pt").is_file()


def test_cache_matches_imageio_and_skips_unreadable(grocery_photos, tmp_path):
    spec = create("mildnet_mobile_noskip", input_size=48).spec
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.warns(UserWarning, match="bad.jpg"):
        cache = ImageCache.build([*grocery_photos[:3], bad], spec, tmp_path / "c.pt", progress=False)
    assert len(cache) == 3 and len(cache.bad) == 1
    x = normalize(cache.images[:1], spec)[0]
    torch.testing.assert_close(x, preprocess(grocery_photos[0], spec), atol=1e-6, rtol=0)
    assert torch.equal(decode_resized(grocery_photos[1], spec), cache.images[1])
    ds = TripletDataset(cache, [tuple(grocery_photos[:3]), (grocery_photos[0], grocery_photos[1], bad)],
                        PaperAugment(), seed=1)
    assert len(ds) == 1 and ds.skipped == 1
    a, b = ds[0], ds[0]
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 48, 48) and torch.equal(a, b)  # seeded per (seed, epoch, i)
    ds.set_epoch(1)
    assert not torch.equal(a, ds[0])
