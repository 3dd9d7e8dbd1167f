"""``mildnet models``: list the zoo with parameter counts, embedding sizes and preprocessing."""
from __future__ import annotations

import argparse
import json

import torch

from . import create, list_models, model_info


def describe(name: str) -> dict:
    """Sizes of a model without allocating its weights (built on the meta device)."""
    with torch.device("meta"):
        model = create(name, pretrained=False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.trainable_parameters())
    return {"name": name, "params": total, "trainable": trainable, "embedding_dim": model.embedding_dim,
            "input_size": model.spec.input_size, "spec": model.spec.to_dict(),
            "paper": model_info(name).paper, "description": model_info(name).description}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="models to show (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    rows = [describe(n) for n in (args.names or list_models())]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<24} {'params':>12} {'trainable':>12} {'dim':>5} {'input':>5}  description")
    for r in rows:
        print(f"{r['name']:<24} {r['params']:>12,} {r['trainable']:>12,} {r['embedding_dim']:>5} "
              f"{r['input_size']:>5}  {r['description']}")
    return 0
