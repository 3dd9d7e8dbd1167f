"""``mildnet train``: the default recipe on a catalogue (:mod:`mildnet.metric_train`) or the paper's triplet
recipe (:mod:`mildnet.train`)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..data.catalogue import CatalogueError, load_catalogue
from ..config import add_config_arguments, config_from_args
from ..data.splits import protocol_split
from ..errors import UsageError
from ..losses import LOSSES
from ..metric_train import MetricConfig, train_metric
from ..train import TrainConfig, _dist_info, train


# Options of the recipe only (model, loss, lr, epochs, weight decay, seed, threads: mildnet.train's, for both).
_RECIPE_FLAGS = ("temperature", "P", "K", "catalogue_share", "dropout", "catalogue_views", "photo_views", "preserve")


def add_arguments(p) -> None:
    """``mildnet train --catalogue`` options; types and defaults from :class:`MetricConfig` (one definition)."""
    p.add_argument("--catalogue", help="train the default recipe on this catalogue (CSV/JSONL/folder/Grocery)")
    p.add_argument("--root", help="folder the catalogue's relative paths are resolved against")
    p.add_argument("--dev-fraction", type=float, default=0.2,
                   help="share of products held out of training to choose the epoch on (default 0.2)")
    p.add_argument("--dev-photo-fraction", type=float, default=0.15,
                   help="share of each training product's photos held out for the same (default 0.15)")
    for f in dataclasses.fields(MetricConfig):
        if f.name in _RECIPE_FLAGS:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                           help=f"(--catalogue recipe) default {f.default}")


def run_catalogue(args) -> int:
    """``mildnet train --catalogue CAT --out DIR``: the default recipe on a user's catalogue."""
    items = load_catalogue(args.catalogue, root=args.root, allow_outside_root=args.allow_outside_root)
    if not any(it.domain == "street" for it in items):  # photos only: every image is a photo of its product
        items = [dataclasses.replace(it, domain="street") for it in items]
    split = protocol_split(items, "unseen_products", seed=args.seed, test_fraction=0.0,
                           dev_fraction=args.dev_fraction, dev_photo_fraction=args.dev_photo_fraction)
    if len(split.fit_products) < 2:
        raise CatalogueError(f"{args.catalogue}: fewer than 2 products are left to train on after the dev split")
    shared = {"model": args.model, "input_size": args.input_size, "loss": args.loss, "lr": args.lr,
              "epochs": args.epochs, "seed": args.seed, "threads": args.threads, "weight_decay": args.weight_decay}
    cfg = MetricConfig(**{k: v for k, v in shared.items() if v is not None},
                       **{k: getattr(args, k) for k in _RECIPE_FLAGS}, out=args.out, progress=args.progress)
    print(f"training {cfg.model} on {len(split.roles['fit'])} photos of {len(split.fit_products)} products; "
          f"choosing the epoch on {len(split.dev_products)} held-out products and "
          f"{len(split.roles['dev_seen'])} held-out photos", flush=True)
    res = train_metric(cfg, items, split)
    b = res["best"]
    print(f"best: epoch {b['epoch']} (dev score {b['selection_score']:.4f}) -> {Path(args.out) / 'best.pt'} "
          f"in {res['seconds']:.0f} s")
    return 0


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_arguments(p)  # --catalogue: the default recipe (mildnet.metric_train)
    add_config_arguments(p, TrainConfig)  # --train: the paper's recipe, one flag per TrainConfig field
    p.add_argument("--tap-norm", action="store_true",
                   help="L2-normalise each pooled tap before the concat (MobileNet/EfficientNet models)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")


def triplet_config(args: argparse.Namespace) -> TrainConfig:
    """The ``--train`` recipe's config: the flags, paths made absolute (``last.pt`` compares them on resume)."""
    return config_from_args(TrainConfig, args, train=str(Path(args.train).resolve()),
                            val=str(Path(args.val).resolve()) if args.val else None,
                            model_kwargs={"tap_norm": True} if args.tap_norm else {})


def run(args: argparse.Namespace) -> int:
    if bool(args.catalogue) == bool(args.train):
        raise UsageError("give --catalogue CATALOGUE (the default recipe) or --train TRIPLETS.csv (the paper's "
                         "triplet recipe), not " + ("both" if args.catalogue else "neither"))
    if args.catalogue:
        return run_catalogue(args)
    if args.loss is not None and args.loss not in LOSSES:
        raise UsageError(f"--train (the triplet recipe) takes --loss {'/'.join(LOSSES)}, got {args.loss!r}")
    result = train(triplet_config(args), resume=args.resume)
    if _dist_info()[1] == 0:
        b = result["best"]
        if b:
            print(f"best: epoch {b['epoch']} ({b['select']} {b['score']:.4f}) -> {Path(args.out) / 'best.pt'}")
    return 0
