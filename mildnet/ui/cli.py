"""``mildnet ui``: the search page in front of a running Triton server, until Ctrl-C."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..errors import UsageError
from ..serving.contract import INDEX_ENV, default_index_path
from .server import DEFAULT_HOST, DEFAULT_PORT

# The file the `similar` model serves by default when Triton runs on ./model_repository.
DEFAULT_INDEX = default_index_path("model_repository")


def configure_parser(p: argparse.ArgumentParser) -> None:
    from .app import MAX_UPLOAD_BYTES  # lazy: app needs starlette (the optional `ui` extra)

    p.add_argument("--url", action="append", dest="urls", help="Triton URL; repeat for replicas "
                   "(default localhost:8000, or localhost:8001 with --protocol grpc)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--index", type=Path, default=Path(os.environ.get(INDEX_ENV, DEFAULT_INDEX)),
                   help="the index file the server's `similar` model serves: the page shows its size and "
                        "categories (default: $MILDNET_INDEX or %(default)s)")
    p.add_argument("--catalogue-root", type=Path, help="folder the catalogue images are served from "
                   "(default: the common folder of the indexed images)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default %(default)s; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 1024 / 1024,
                   help="largest photo accepted (default %(default)s)")
    p.add_argument("--k", type=int, default=10, help="results shown first (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from .app import MAX_PAGE_K, UIConfig, create_app  # lazy: starlette and uvicorn are the optional `ui` extra
    from .server import PageServer  # lazy: uvicorn, the same extra

    if not 1 <= args.k <= MAX_PAGE_K:
        raise UsageError(f"--k must be between 1 and {MAX_PAGE_K}")
    if args.max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    if args.catalogue_root is not None and not args.catalogue_root.is_dir():
        raise UsageError(f"--catalogue-root {args.catalogue_root} is not a folder")
    urls = args.urls or (["localhost:8001"] if args.protocol == "grpc" else ["localhost:8000"])
    config = UIConfig(urls=urls, index=args.index, protocol=args.protocol, catalogue_root=args.catalogue_root,
                      max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), default_k=args.k)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the search page listens on {args.host}, reachable from other machines")
    with PageServer(create_app(config), args.host, args.port) as server:
        print(f"search page: {server.url}  (Triton {', '.join(urls)}; index {args.index}); Ctrl-C stops it",
              flush=True)
        while True:
            time.sleep(3600)
