"""``mildnet eval``: triplet accuracy, retrieval metrics and a results page (see :mod:`mildnet.evaluate`)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data.catalogue import load_catalogue
from ..errors import UsageError
from ..evaluate import evaluate, evaluate_protocol
from ..models import create, load_checkpoint


def configure_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a trained checkpoint (best.pt)")
    src.add_argument("--model", help="a zoo model name (e.g. the zero-shot mobilenet_v1_gap)")
    p.add_argument("--pretrained", action="store_true", help="with --model: ImageNet backbone weights")
    p.add_argument("--input-size", type=int, help="with --model: input size")
    p.add_argument("--catalogue", help="catalogue (CSV/JSONL/folder/Grocery dataset) for retrieval metrics")
    p.add_argument("--root", help="root for the catalogue's relative paths")
    p.add_argument("--allow-outside-root", action="store_true")
    p.add_argument("--split", default="val", help="catalogue split whose photos are the queries (default val)")
    p.add_argument("--triplets", help="triplet CSV for triplet accuracy (kinds from <name>.details.csv)")
    p.add_argument("--image-root", help="folder the triplet paths are relative to (default: summary.json)")
    p.add_argument("--out", required=True, help="folder for results.json and results.html")
    p.add_argument("--page-queries", type=int, default=24, help="queries shown on the results page")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", help="decoded-image cache file to reuse")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--protocol", choices=("unseen_products", "unseen_kind"),
                   help="with --catalogue: the metric-learning protocol (mildnet.data.splits): metrics on the "
                        "held-out products' photos (and, for unseen_products, on the seen products' val photos), "
                        "with 95%% bootstrap intervals over queries")
    p.add_argument("--protocol-seed", type=int, default=0, help="seed of the protocol's product split")


def run(args: argparse.Namespace) -> int:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint)
        label = f"{model.variant} ({args.checkpoint})"
    else:
        kw = {"input_size": args.input_size} if args.input_size else {}
        model = create(args.model, pretrained=args.pretrained, **kw).eval()
        label = args.model + (" (pretrained)" if args.pretrained else "")
    model.to(device)
    if args.protocol:
        if not args.catalogue:
            raise UsageError("--protocol needs --catalogue (a catalogue with store photos and catalogue images)")
        items = load_catalogue(args.catalogue, root=args.root, allow_outside_root=args.allow_outside_root)
        rep = evaluate_protocol(model, items, args.protocol, seed=args.protocol_seed, out=args.out,
                                batch_size=args.batch_size, device=device, cache=args.cache,
                                progress=not args.no_progress, label=label)
        for role, r in rep["roles"].items():
            print(f"{role}: " + " ".join(f"{k}={v['value']:.4f} [{v['lo']:.3f}, {v['hi']:.3f}]"
                                         for k, v in r["metrics"].items())
                  + f" margin={r['spread']['margin']:.4f}")
        print(f"wrote {Path(args.out) / 'results.json'}")
        return 0
    rep = evaluate(model, catalogue=args.catalogue, split=args.split, triplets=args.triplets,
                   image_root=args.image_root, out=args.out, root=args.root,
                   allow_outside_root=args.allow_outside_root, page_queries=args.page_queries,
                   batch_size=args.batch_size, device=device, cache=args.cache, progress=not args.no_progress,
                   label=label)
    if "triplets" in rep:
        t = rep["triplets"]
        print(f"triplet accuracy {t['accuracy']:.4f} on {t['triplets']} triplets "
              + " ".join(f"{k[9:]}={v:.4f}" for k, v in t.items() if k.startswith("accuracy_")))
    for name, m in rep.get("retrieval", {}).items():
        print(f"{name}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()
                                     if isinstance(v, float) and not k.startswith("max")))
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0
