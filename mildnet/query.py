"""The library behind ``mildnet query`` (:mod:`mildnet.commands.query`): search a photo through a running server
(Triton ``similar``: embed + search its index) or embed it there and search a local index file of the same
model version; the hits as a table, JSON, an HTML contact sheet or a PNG one.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Sequence

from .errors import UsageError
from .fileio import atomic_write_bytes, atomic_write_text
from .imageio import ImageDecodeError, decode_image
from .index import Hit, ModelVersionError, load_index
from .serving.client import TritonEmbedder

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
                raise UsageError(f"--filter {pair!r}: {raw!r} is not a JSON value (use KEY=VALUE for text)") from None
        elif "=" in pair:
            key, value = pair.split("=", 1)
        else:
            raise UsageError(f"--filter {pair!r}: expected KEY=VALUE, e.g. category=Apple")
        if not key.strip():
            raise UsageError(f"--filter {pair!r}: empty key")
        out[key.strip()] = value
    return out or None


def search(image: bytes, k: int, filter: dict | None, urls: list[str], protocol: str,
           index_path: Path | None) -> list[Hit]:
    """Top-k hits for one encoded image, server-side (``similar``) or with a local index file."""
    with TritonEmbedder(urls, protocol=protocol) as embedder:
        if index_path is None:
            return list(embedder.similar(image, k, filter=filter))
        index = load_index(index_path)
        served = embedder.model_info().model_version
        if served != index.model_version:
            raise ModelVersionError(f"{index_path} was built with model version {index.model_version!r}, the server "
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
