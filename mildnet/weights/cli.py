"""``mildnet weights fetch NAME`` / ``mildnet weights list``: the offline ImageNet backbones."""
from __future__ import annotations

import argparse

from . import SOURCES, fetch, weights_path
from .cache import cache_dir


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = sub.add_parser("fetch", help="download, verify, convert and cache pretrained weights")
    f.add_argument("names", nargs="+", choices=sorted(SOURCES), metavar="NAME",
                   help=f"one or more of: {', '.join(SOURCES)}")
    f.add_argument("--force", action="store_true", help="convert again even if cached")
    sub.add_parser("list", help="show the available weights and whether they are cached")


def run(args: argparse.Namespace) -> int:
    if args.action == "fetch":
        for name in args.names:
            path = fetch(name, force=args.force)
            print(f"{name}: {path}")
        return 0
    print(f"cache: {cache_dir()}  (set MILDNET_CACHE to move it)")
    for name, (_, description) in SOURCES.items():
        path = weights_path(name)
        state = f"cached ({path.stat().st_size / 1e6:.1f} MB)" if path.is_file() else "not cached"
        print(f"{name:<14} {state:<20} {description}")
    return 0
