"""``mildnet export``: a checkpoint (or a seeded untrained model) -> the next version in a Triton model
repository (see :mod:`mildnet.export`)."""
from __future__ import annotations

import argparse

import torch

from .. import models
from ..export import export_model
from ..serving import contract
from ..serving.repository import ServingConfig


def configure_parser(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="mildnet checkpoint to export")
    src.add_argument("--untrained", metavar="VARIANT",
                     help="export a freshly initialised VARIANT (seeded; for tests and speed benchmarks)")
    parser.add_argument("--input-size", type=int, default=None, help="with --untrained: override the input size")
    parser.add_argument("--seed", type=int, default=0, help="with --untrained: initialisation seed")
    parser.add_argument("--repository", default="model_repository", help="model repository (default: %(default)s)")
    parser.add_argument("--model-name", default=contract.EMBEDDING_MODEL,
                        help="name of the embedding model (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--instances", type=int, default=1, help="model instances (each a process)")
    parser.add_argument("--kind", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000,
                        help="how long dynamic batching waits to fill a batch (default: %(default)s)")
    parser.add_argument("--max-queue-size", type=int, default=256,
                        help="requests queued before the server answers new ones with an error (default: "
                             "%(default)s); 0: no queue policy, nothing shed (see docs/serving.md)")
    parser.add_argument("--no-dynamic-batching", action="store_true", help="serve every request alone")
    parser.add_argument("--forward-batch", type=int, default=None,
                        help="images per forward pass, a larger batch runs in passes; 0 = one pass "
                             "(default: 4 on CPU, where bigger batches run slower per image; 0 on GPU)")
    parser.add_argument("--no-freeze", action="store_true",
                        help="serve the eager model on CPU instead of a frozen TorchScript copy")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="write only the embedding model, leave preprocess/ensemble/similar alone")


def load_model_for_export(args: argparse.Namespace):
    if args.checkpoint:
        return models.load_checkpoint(args.checkpoint)
    torch.manual_seed(args.seed)
    kw = {"input_size": args.input_size} if args.input_size else {}
    return models.create(args.untrained, pretrained=False, **kw).eval()


def run(args: argparse.Namespace) -> int:
    cfg = ServingConfig(model_name=args.model_name, max_batch_size=args.max_batch_size, instances=args.instances,
                        kind=args.kind, dynamic_batching=not args.no_dynamic_batching,
                        max_queue_delay_us=args.max_queue_delay_us, max_queue_size=args.max_queue_size,
                        forward_batch=args.forward_batch, freeze=not args.no_freeze)
    model = load_model_for_export(args)
    result = export_model(model, args.repository, cfg, source_checkpoint=args.checkpoint,
                          pipeline=not args.no_pipeline)
    served = result.served
    print(f"exported {served.variant} (dim {served.embedding_dim}, input {served.spec.input_size}, model_version "
          f"{served.model_version}) as {cfg.model_name} version {result.version} -> {result.version_dir}")
    return 0
