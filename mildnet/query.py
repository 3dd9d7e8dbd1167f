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
import base64
import html
import io
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .fileio import atomic_write_bytes, atomic_write_text
from .imageio import ImageDecodeError, decode_image
from .index import MAX_K, Hit, IndexFileError, load_index

EXIT_OK, EXIT_INPUT, EXIT_SERVER = 0, 1, 3
THUMB = 160


def parse_filter(pairs: Sequence[str] | None) -> dict[str, Any] | None:
    """``["category=Apple", "rank:=2"]`` -> ``{"category": "Apple", "rank": 2}``."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if ":=" in pair:
            key, raw = pair.split(":=", 1)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise ValueError(f"--filter {pair!r}: {raw!r} is not a JSON value (use KEY=VALUE for text)") from None
        elif "=" in pair:
            key, value = pair.split("=", 1)
        else:
            raise ValueError(f"--filter {pair!r}: expected KEY=VALUE, e.g. category=Apple")
        if not key.strip():
            raise ValueError(f"--filter {pair!r}: empty key")
        out[key.strip()] = value
    return out or None


def search(image: bytes, k: int, filter: dict | None, urls: list[str], protocol: str,
           index_path: Path | None) -> list[Hit]:
    """Top-k hits for one encoded image, server-side (``similar``) or with a local index file."""
    from .serving.client import TritonEmbedder

    with TritonEmbedder(urls, protocol=protocol) as embedder:
        if index_path is None:
            return list(embedder.similar(image, k, filter=filter))
        index = load_index(index_path)
        served = embedder.model_info().model_version
        if served != index.model_version:
            raise ValueError(f"{index_path} was built with model version {index.model_version!r}, the server "
                             f"serves {served!r}: its embeddings are not comparable (rebuild the index)")
        vector = embedder.embed([image])  # (1, D)
    return index.search(vector, k=k, filter=filter)[0]


# ---- output ---------------------------------------------------------------------------------------------------
def hit_rows(hits: Sequence[Hit], images: Path | None = None) -> list[dict[str, Any]]:
    """Hits -> printable rows; a catalogue-relative ``path`` is joined to ``images`` when given."""
    rows = []
    for rank, h in enumerate(hits, 1):
        meta = dict(h.metadata)
        path = str(meta.pop("path", ""))
        if path and images is not None and not Path(path).is_absolute():
            path = str(images / path)
        rows.append({"rank": rank, "id": h.id, "score": round(float(h.score), 4), "path": path, "metadata": meta})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "no results (empty index, or nothing matches the filter)"
    cells = [[str(r["rank"]), r["id"], f"{r['score']:.4f}", _short(r["path"], 48),
              _short(", ".join(f"{k}={v}" for k, v in sorted(r["metadata"].items())), 60)] for r in rows]
    head = ["rank", "id", "score", "image", "metadata"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    widths[1] = min(widths[1], 40)
    line = lambda c: "  ".join(_short(x, w).ljust(w) if i != 0 else x.rjust(w)  # noqa: E731
                               for i, (x, w) in enumerate(zip(c, widths))).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in cells])


def _short(text: str, width: int) -> str:
    text = str(text)
    return text if len(text) <= width else "…" + text[-(width - 1):]


def thumbnail(source) -> "Image.Image | None":
    try:
        img = decode_image(source)
    except ImageDecodeError:
        return None
    img.thumbnail((THUMB, THUMB))
    return img


def data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(path: Path, query_path: Path, query_bytes: bytes, rows: Sequence[dict[str, Any]],
               title: str) -> None:
    """A self-contained contact sheet (thumbnails inline): the query beside its results. All text escaped."""
    def card(img, caption_lines: list[str], cls: str = "") -> str:
        pic = f'<img src="{data_uri(img)}" alt="">' if img is not None else '<div class="missing">no image</div>'
        caption = "<br>".join(html.escape(c) for c in caption_lines)
        return f'<figure class="{cls}">{pic}<figcaption>{caption}</figcaption></figure>'

    cards = [card(thumbnail(query_bytes), ["query", query_path.name], "query")]
    for r in rows:
        meta = ", ".join(f"{k}={v}" for k, v in sorted(r["metadata"].items()))
        cards.append(card(thumbnail(r["path"]) if r["path"] else None,
                          [f"#{r['rank']}  {r['score']:.4f}", r["id"], meta]))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} .grid{{display:flex;flex-wrap:wrap;gap:12px}}
figure{{margin:0;width:{THUMB}px;font-size:12px;word-break:break-all}} figure img{{max-width:{THUMB}px}}
figure.query{{border-right:3px solid #333;padding-right:12px}} .missing{{width:{THUMB}px;height:{THUMB}px;
background:#eee;display:flex;align-items:center;justify-content:center}}</style></head>
<body><h1>{html.escape(title)}</h1><div class="grid">{''.join(cards)}</div></body></html>
"""
    atomic_write_text(path, page)


def write_png(path: Path, query_bytes: bytes, rows: Sequence[dict[str, Any]], columns: int = 5) -> None:
    """The contact sheet as one PNG: query top-left, results in rank order, captions under each."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cell_w, cell_h = THUMB + 10, THUMB + 46
    n = len(rows) + 1
    cols = min(columns + 1, n)
    sheet = Image.new("RGB", (cols * cell_w, ((n + cols - 1) // cols) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    items = [(thumbnail(query_bytes), ["QUERY"])] + [
        (thumbnail(r["path"]) if r["path"] else None, [f"#{r['rank']}   score {r['score']:.3f}", _short(r["id"], 26)])
        for r in rows]
    for i, (img, caption) in enumerate(items):
        x, y = (i % cols) * cell_w + 5, (i // cols) * cell_h + 5
        if img is None:
            draw.rectangle([x, y, x + THUMB, y + THUMB], fill=(230, 230, 230))
            draw.text((x + 40, y + THUMB // 2), "no image", fill="black", font=font)
        else:
            sheet.paste(img, (x + (THUMB - img.width) // 2, y + (THUMB - img.height) // 2))
        for j, text in enumerate(caption):
            draw.text((x, y + THUMB + 4 + 14 * j), text, fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    atomic_write_bytes(path, buf.getvalue())


# ---- CLI -------------------------------------------------------------------------------------------------------
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
    from .serving.client import ModelNotReady, ServerSideError, ServerUnavailable

    urls = args.urls or (["localhost:8001"] if args.protocol == "grpc" else ["localhost:8000"])
    try:
        filter = parse_filter(args.filter)
        query_bytes = args.image.read_bytes() if args.image.is_file() else None
        if query_bytes is None:
            raise ValueError(f"{args.image}: no such image file")
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
    except (ImageDecodeError, IndexFileError, ValueError, OSError, RuntimeError) as e:
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
