"""``mildnet query`` (also ``python client/query.py`` in a checkout): the catalogue items most similar to a photo.

    mildnet query img.jpg [--k 10] [--filter category=Apple] [--json] [--html out.html] [--png out.png]
    mildnet query img.jpg --url host1:8000 --url host2:8000      # spread over replicas
    mildnet query img.jpg --index catalogue.mindex               # search a local index file

By default the server does everything (Triton ``similar``: embed + search its index). With ``--index`` the
server only embeds (``mildnet_ensemble``) and the search runs here, on a local index file of the same model
version. ``--filter KEY=VALUE`` (repeatable) keeps items whose metadata equals VALUE (a string;
``KEY:=JSON`` for numbers/booleans). Hits name their image relative to the catalogue root; ``--images DIR``
(that root, here) finds them for the thumbnails of ``--html``/``--png``. Exit codes: 0 ok, 1 bad input,
3 a server-side problem (down, model not ready, its index unusable, an internal error).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MildnetError, UsageError
from ..imageio import ImageDecodeError, decode_image
from ..index import MAX_K
from ..query import (EXIT_INPUT, EXIT_OK, EXIT_SERVER, format_table, hit_rows, parse_filter, search, write_html,
                     write_png)
from ..serving.client import ModelNotReady, RemoteInferenceError, ServerSideError, ServerUnavailable


def _k(text: str) -> int:
    k = int(text)
    if k < 1:
        raise argparse.ArgumentTypeError("--k must be >= 1")
    if k > MAX_K:
        raise argparse.ArgumentTypeError(f"--k must be <= {MAX_K} (results per query)")
    return k


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.formatter_class, p.epilog = argparse.RawDescriptionHelpFormatter, __doc__
    p.add_argument("image", type=Path, help="the query photo")
    p.add_argument("--k", type=_k, default=10,
                   help=f"how many results (default 10, at most {MAX_K}; fewer if the catalogue is smaller)")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE", help="metadata equality; repeatable")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--html", type=Path, metavar="OUT.html", help="write a contact sheet page")
    p.add_argument("--png", type=Path, metavar="OUT.png", help="write a contact sheet image")
    p.add_argument("--url", action="append", dest="urls", help="Triton URL; repeat for replicas "
                   "(default localhost:8000, or localhost:8001 with --protocol grpc)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--index", type=Path, help="search this local index file instead of the server's")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="the catalogue root here: hits' relative image paths are under it (for thumbnails)")


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    configure_parser(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace, prog: str = "mildnet query") -> int:
    urls = args.urls or (["localhost:8001"] if args.protocol == "grpc" else ["localhost:8000"])
    try:
        filter = parse_filter(args.filter)
        query_bytes = args.image.read_bytes() if args.image.is_file() else None
        if query_bytes is None:
            raise UsageError(f"{args.image}: no such image file")
        decode_image(query_bytes, name=str(args.image))  # a clear local message beats a server error
        hits = search(query_bytes, args.k, filter, urls, args.protocol, args.index)
        rows = hit_rows(hits, args.images)
        title = f"{args.image.name}: top {args.k}" + (f" where {filter}" if filter else "")
        if args.html:
            write_html(args.html, args.image, query_bytes, rows, title)
        if args.png:
            write_png(args.png, query_bytes, rows)
    except (ServerUnavailable, ModelNotReady, ServerSideError) as e:
        print(f"{prog}: server problem: {e}", file=sys.stderr)
        return EXIT_SERVER
    # Ours, and a file that cannot be read or written; anything else is a bug and raises with its traceback.
    except (MildnetError, ImageDecodeError, RemoteInferenceError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    if args.json:
        print(json.dumps({"query": str(args.image), "k": args.k, "filter": filter, "hits": rows}, indent=2))
    else:
        print(format_table(rows))
        for out in (args.html, args.png):
            if out:
                print(f"wrote {out}", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None, prog: str = "query.py") -> int:
    """The whole command (``client/query.py``'s entry point); returns the exit code."""
    return run(parse_args(argv, prog), prog)
