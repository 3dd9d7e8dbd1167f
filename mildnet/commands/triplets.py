"""``mildnet triplets``: a triplet CSV (q,p,n) per split from a catalogue (see :mod:`mildnet.data.triplets`);
with ``--checkpoint``, hard negatives mined with a trained model."""
from __future__ import annotations

import argparse

from ..data.catalogue import check_images, load_catalogue
from ..data.datasets import embed_items
from ..data.triplets import TripletOptions, make_triplets, write_triplets
from ..errors import UsageError
from ..models import load_checkpoint


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("catalogue", help="catalogue CSV/JSONL, a folder-per-class tree or the Grocery dataset folder")
    p.add_argument("--out", required=True, help="output folder for <split>.csv, <split>.details.csv, summary.json")
    p.add_argument("--root", help="folder relative catalogue paths are resolved against (default: its folder)")
    p.add_argument("--allow-outside-root", action="store_true", help="accept image paths outside the root")
    p.add_argument("--splits", help="comma-separated splits to make triplets for (default: all present)")
    p.add_argument("--per-query", type=int, default=8, help="triplets per query image (default 8)")
    p.add_argument("--in-class-ratio", type=float, default=0.5,
                   help="share of non-hard negatives taken from the query's category (default 0.5)")
    p.add_argument("--hard-ratio", type=float, default=0.0, help="share of hard negatives (needs --checkpoint)")
    p.add_argument("--hard-pool", type=int, default=10, help="hard negatives come from this many nearest")
    p.add_argument("--checkpoint", help="trained model checkpoint for hard-negative mining")
    p.add_argument("--positives", choices=("auto", "shop", "any"), default="auto",
                   help="auto: street photo -> shop image of the item where one exists (default)")
    p.add_argument("--negative-domain", choices=("positive", "any"), default="positive",
                   help="negatives from the positive's domain (default) or any domain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-singletons", action="store_true",
                   help="leave out queries whose item has no other image instead of failing")
    p.add_argument("--no-verify-images", action="store_true", help="do not decode every image first")
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size for --checkpoint")


def run(args: argparse.Namespace) -> int:
    items = load_catalogue(args.catalogue, root=args.root, allow_outside_root=args.allow_outside_root)
    if not args.no_verify_images:
        items, bad = check_images(items)
        for msg in bad:
            print(f"skipped unreadable image: {msg}")
    options = TripletOptions(per_query=args.per_query, in_class_ratio=args.in_class_ratio,
                             hard_ratio=args.hard_ratio, hard_pool=args.hard_pool, positives=args.positives,
                             negative_domain=args.negative_domain, seed=args.seed,
                             skip_singletons=args.skip_singletons)
    embeddings = None
    if args.checkpoint:
        embeddings = embed_items(load_checkpoint(args.checkpoint), items, batch_size=args.batch_size)
    elif options.hard_ratio > 0:
        raise UsageError("--hard-ratio needs --checkpoint (a trained model to find the nearest wrong items)")
    splits = args.splits.split(",") if args.splits else None
    triplets = make_triplets(items, options, splits=splits, embeddings=embeddings)
    summary = write_triplets(args.out, triplets, items, options=options,
                             extra={"catalogue": str(args.catalogue), "checkpoint": args.checkpoint})
    for split, s in summary["splits"].items():
        print(f"{split}: {s['triplets']} triplets from {s['queries']} queries  {s['by_kind']}")
    print(f"wrote {args.out}/summary.json")
    return 0
