"""``mildnet index`` (also ``python client/index.py`` in a checkout): build or update a catalogue index by
embedding images through Triton's ``mildnet_ensemble``.

    mildnet index CATALOGUE --out catalogue.mindex [--url localhost:8000 --url host2:8000]
    mildnet index more.csv  --out catalogue.mindex --add          # add new items, no rebuild
    mildnet index --out catalogue.mindex --delete ID [ID ...]     # remove items, no rebuild

CATALOGUE: an image folder, a CSV/JSONL catalogue or the Grocery dataset (``mildnet.data.catalogue``).
A crashed or interrupted run resumes when rerun with the same command (see ``mildnet.index.builder``).
Exit codes: 0 ok, 1 error, 2 bad arguments, 3 server down or model not ready (progress is kept).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..serving import client as remote
from ..data.catalogue import index_entries  # the one reader of catalogues: rows -> (id, path, metadata)
from ..errors import MildnetError, UsageError
from .builder import build_index, delete_items

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SERVER = 0, 1, 2, 3


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.formatter_class, p.epilog = argparse.RawDescriptionHelpFormatter, __doc__
    p.add_argument("catalogue", nargs="?", help="image folder, CSV/JSONL catalogue or Grocery dataset root")
    p.add_argument("--out", required=True, type=Path, help="index file to write (e.g. catalogue.mindex)")
    p.add_argument("--root", help="folder the catalogue's relative paths start from")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept catalogue paths outside the root (absolute or ../)")
    p.add_argument("--url", action="append", dest="urls",
                   help="Triton URL; repeat to spread requests over replicas (default localhost:8000, "
                        "or localhost:8001 with --protocol grpc)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--add", action="store_true", help="add the catalogue's items missing from an existing index")
    p.add_argument("--delete", nargs="+", metavar="ID", help="remove these ids from --out and exit")
    p.add_argument("--backend", choices=("faiss", "milvus"), default="faiss")
    p.add_argument("--kind", choices=("auto", "flat", "hnsw", "ivfpq"), default="auto", help="faiss index kind")
    p.add_argument("--milvus-uri", help="Milvus server URI, or a local milvus-lite file (backend milvus)")
    p.add_argument("--collection", default="mildnet", help="Milvus collection (backend milvus)")
    p.add_argument("--chunk", type=int, default=64, help="images per journal record")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--checkpoint-every", type=int, default=2000, help="fold the journal into OUT.partial "
                   "every N embedded items")
    p.add_argument("--json", action="store_true", help="print the run's statistics as JSON")
    p.add_argument("--no-progress", action="store_true")


def check_args(args: argparse.Namespace) -> None:
    """The rules between arguments (argparse checks each alone); ValueError names the broken one."""
    if args.delete is None and not args.catalogue:
        raise UsageError("a CATALOGUE is needed (or --delete ID ...)")
    if args.backend == "milvus" and not args.milvus_uri:
        raise UsageError("--backend milvus needs --milvus-uri")
    if min(args.chunk, args.checkpoint_every, args.concurrency) < 1:
        raise UsageError("--chunk, --concurrency and --checkpoint-every must be >= 1")


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    configure_parser(p)
    args = p.parse_args(argv)
    try:
        check_args(args)
    except UsageError as e:
        p.error(str(e))
    return args


def run(args: argparse.Namespace, prog: str = "mildnet index") -> int:
    try:
        check_args(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    urls = args.urls or (["localhost:8001"] if args.protocol == "grpc" else ["localhost:8000"])
    try:
        if args.delete is not None:
            n = delete_items(args.out, args.delete)
            print(f"removed {n} item(s) from {args.out}")
            return EXIT_OK
        unindexed: list[tuple[str, str]] = []  # files of a folder catalogue that are not images of it
        entries = index_entries(args.catalogue, args.root, args.allow_outside_root, skipped=unindexed)
        params = {"uri": args.milvus_uri, "collection": args.collection} if args.backend == "milvus" else {}
        with remote.TritonEmbedder(urls, protocol=args.protocol, concurrency=args.concurrency) as embedder:
            stats = build_index(entries, args.out, embedder, add=args.add, backend=args.backend,
                                backend_params=params, kind=args.kind, chunk=args.chunk,
                                checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
        stats["not_catalogued"] = [{"path": path, "reason": reason} for path, reason in unindexed]
    except (remote.ServerUnavailable, remote.ModelNotReady, remote.ServerSideError) as e:
        print(f"{prog}: server problem: {e}\n(progress so far is kept; rerun the same command to resume)",
              file=sys.stderr)
        return EXIT_SERVER
    # Ours, and a file that cannot be read or written; anything else is a bug and raises with its traceback.
    except (MildnetError, remote.RemoteInferenceError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"{args.out}: {stats['items']} items (embedded {stats['embedded']}, recovered "
              f"{stats['recovered']}, skipped {len(stats['skipped'])}, not indexed "
              f"{len(stats['not_catalogued'])}) with {stats['model_version']} "
              f"in {stats['seconds']} s" + (f", {stats['images_per_s']} images/s" if stats['images_per_s'] else ""))
        for item_id in stats["skipped"]:
            print(f"  skipped (bad image): {item_id}", file=sys.stderr)
        for row in stats["not_catalogued"]:
            print(f"  not indexed: {row['path']}: {row['reason']}", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None, prog: str = "index.py") -> int:
    """The whole command (``client/index.py``'s entry point); returns the exit code."""
    return run(parse_args(argv, prog), prog)
