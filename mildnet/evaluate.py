"""``mildnet eval``: triplet accuracy (the paper's metric), retrieval recall@k / mAP, a self-retrieval check,
a per-class breakdown, a JSON report and an HTML page of queries with their top 5.

The metrics are pure functions of rankings in :mod:`mildnet.metrics` (``recall_at_k``, ``average_precision``,
...); ``rank`` there turns embeddings into rankings. Tasks on a catalogue with domains
(e.g. Grocery): ``photo_to_catalogue`` (street photos of a split -> shop images, relevant = same item) and
``photo_to_photo`` (street photos of a split among themselves, leave-one-out, relevant = same item). Without
domains: ``item_to_item`` (leave-one-out over the split).
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.catalogue import load_catalogue
from .data.datasets import ImageCache, embed_images, embed_items
from .data.splits import protocol_split
from .data.triplets import read_triplets
from .errors import UsageError
from .fileio import atomic_write_text
from .metrics import rank, recall_at_k, retrieval_metrics, split_report, summarise, triplet_metrics

__all__ = ["evaluate_catalogue", "evaluate_protocol", "evaluate", "write_results_page"]


# --------------------------------------------------------------------------------------------- catalogue eval
def _finite(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1)


def evaluate_catalogue(embeddings: np.ndarray, items: Sequence, split: str | None, *,
                       ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Retrieval tasks on one split of a catalogue whose ``embeddings[i]`` belongs to ``items[i]``
    (rows of NaN = unreadable image, left out). Returns ``{task: metrics}`` plus the rankings for the page."""
    if all(it.split is None for it in items):
        split = None  # a catalogue without splits: evaluate all of it
    ok = _finite(embeddings)
    in_split = [i for i, it in enumerate(items) if ok[i] and (split is None or it.split == split)]
    street = [i for i in in_split if items[i].domain == "street"]
    shop = [i for i, it in enumerate(items) if ok[i] and it.domain == "shop" and (it.split in (None, split))]
    tasks: dict[str, dict] = {}
    rankings: dict[str, tuple] = {}

    def task(name: str, qs: list[int], gs: list[int], leave_one_out: bool) -> None:
        if not qs or not gs:
            return
        exclude = (np.asarray(qs)[:, None] == np.asarray(gs)[None, :]) if leave_one_out else None
        orders, dists = rank(embeddings[qs], embeddings[gs], exclude=exclude)
        labels_q = [items[i].item_id for i in qs]
        labels_g = [items[i].item_id for i in gs]
        m = retrieval_metrics(orders, labels_q, labels_g, ks)
        cats: dict[str, list] = defaultdict(list)
        g = np.asarray(labels_g)
        for o, i in zip(orders, qs):
            cats[items[i].category].append(g[o] == items[i].item_id)
        m["per_category"] = {c: {"queries": len(rs), "recall@1": recall_at_k(rs, 1)} for c, rs in sorted(cats.items())}
        tasks[name] = m
        rankings[name] = (qs, gs, orders, dists)

    if street and shop:
        task("photo_to_catalogue", street, shop, False)
        task("photo_to_photo", street, street, True)
        # self-retrieval: each catalogue image must find itself first (catches preprocessing mismatches)
        orders, dists = rank(embeddings[shop], embeddings[shop])
        tasks["self_retrieval"] = {"queries": len(shop),
                                   "top1_is_self": float(np.mean([o[0] == k for k, o in enumerate(orders)])),
                                   "max_self_distance": float(max(d[list(o).index(k)] for k, (o, d) in
                                                                  enumerate(zip(orders, dists))))}
    else:
        task("item_to_item", in_split, in_split, True)
        orders, dists = rank(embeddings[in_split], embeddings[in_split])
        tasks["self_retrieval"] = {"queries": len(in_split),
                                   "top1_is_self": float(np.mean([o[0] == k for k, o in enumerate(orders)]))}
    return {"tasks": tasks, "rankings": rankings}


# --------------------------------------------------------------------------------------------- results page
def _thumb(image: torch.Tensor, size: int = 96) -> str:
    from PIL import Image

    img = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_results_page(path: str | os.PathLike, title: str, items: Sequence, images: dict[int, torch.Tensor],
                       ranking: tuple, *, n_queries: int = 24, top: int = 5, summary: dict | None = None) -> Path:
    """An HTML page (self-contained, thumbnails inlined) of ``n_queries`` queries spread over the list, each
    with its top ``top`` results framed green (same item) or red. Every text is HTML-escaped."""
    qs, gs, orders, dists = ranking
    esc = html.escape
    picks = np.unique(np.linspace(0, len(qs) - 1, min(n_queries, len(qs))).round().astype(int))
    rows = []
    for k in picks:
        qi = qs[k]
        cells = [f'<td class="q"><img src="{_thumb(images[qi])}"><br><b>{esc(items[qi].item_id)}</b><br>'
                 f'<small>{esc(items[qi].path.name)}</small></td>']
        for r, (gj, d) in enumerate(zip(orders[k][:top], dists[k][:top]), 1):
            gi = gs[gj]
            right = items[gi].item_id == items[qi].item_id
            cells.append(f'<td class="{"right" if right else "wrong"}"><img src="{_thumb(images[gi])}"><br>'
                         f'{r}. {esc(items[gi].item_id)} {"&#10003;" if right else "&#10007;"}<br>'
                         f'<small>d={d:.3f}</small></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<li>{esc(str(k))}: {esc(str(v))}</li>" for k, v in (summary or {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title><style>
body{{font-family:sans-serif}} td{{text-align:center;padding:4px;font-size:12px;vertical-align:top}}
td.q{{background:#eef}} td.right img{{border:4px solid #2a2}} td.wrong img{{border:4px solid #d22}}
</style></head><body><h1>{esc(title)}</h1><ul>{head}</ul>
<table><tr><th>query</th>{"".join(f"<th>#{i}</th>" for i in range(1, top + 1))}</tr>{"".join(rows)}</table>
</body></html>"""
    atomic_write_text(path, page)
    return Path(path)


def evaluate_protocol(model: torch.nn.Module, items: Sequence, scheme: str, *, seed: int = 0, out: str | os.PathLike,
                      batch_size: int = 64, device: str = "cpu", cache: str | None = None, progress: bool = True,
                      label: str | None = None, n_boot: int = 1000) -> dict:
    """The protocol's reported roles for one model: ``{role: {"metrics", "spread", "queries"}}`` in results.json.
    Which products are held out is a function of (catalogue, scheme, seed): a model trained by
    ``bench/accuracy.py`` with the same seed never saw them."""
    split = protocol_split(items, scheme, seed=seed)
    roles = ("test_unseen", "test_seen") if scheme == "unseen_products" else ("test_unseen",)
    needed = sorted({i for r in roles for i in split.roles[r]} | set(split.catalogue))
    emb = np.full((len(items), model.embedding_dim), np.nan, np.float32)
    emb[needed] = embed_items(model, [items[i] for i in needed], batch_size=batch_size, device=device,
                              cache_path=cache, progress=progress)
    report = {"model": label or getattr(model, "variant", "?"), "protocol": scheme, "seed": seed,
              "split": split.summary(items), "roles": {}}
    for role in roles:
        rep = split_report(emb, items, split.roles[role], split.catalogue)
        report["roles"][role] = {"metrics": summarise(rep, n_boot=n_boot), "spread": rep["spread"],
                                 "queries": rep["queries"]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(report, indent=2, default=float))
    return report


def evaluate(model: torch.nn.Module, *, catalogue=None, split: str | None = "val", triplets: str | None = None,
             image_root: str | None = None, out: str | os.PathLike, root=None, allow_outside_root: bool = False,
             page_queries: int = 24, batch_size: int = 64, device: str = "cpu", cache: str | None = None,
             progress: bool = True, label: str | None = None) -> dict:
    """Everything ``mildnet eval`` reports, for an in-memory model; writes results.json (+ results.html)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    items = []
    if catalogue is not None:
        items = catalogue if isinstance(catalogue, list) else load_catalogue(
            catalogue, root=root, allow_outside_root=allow_outside_root)
    trip_rows, kinds = ([], None)
    if triplets:
        trip_rows, kinds = read_triplets(triplets, image_root, allow_outside_root=allow_outside_root)
    needed = [it.path for it in items if split is None or it.split in (split, None)] + \
        [p for t in trip_rows for p in t]
    if not needed:
        raise UsageError("nothing to evaluate: give --catalogue and/or --triplets")
    img_cache = ImageCache.build(needed, model.spec, cache, progress=progress)
    emb_all = embed_images(model, img_cache.images, batch_size=batch_size, device=device, progress=progress)
    report: dict = {"model": label or getattr(model, "variant", "?"), "split": split,
                    "input_size": model.spec.input_size, "embedding_dim": int(model.embedding_dim),
                    "unreadable_images": img_cache.bad}
    if trip_rows:
        usable = [i for i, t in enumerate(trip_rows) if all(p in img_cache for p in t)]
        rows = torch.tensor([img_cache.rows(trip_rows[i]) for i in usable], dtype=torch.long)
        report["triplets"] = triplet_metrics(emb_all, rows, kinds=[kinds[i] for i in usable] if kinds else None)
    if items:
        nan = np.full((len(items), emb_all.shape[1]), np.nan, np.float32)
        for i, it in enumerate(items):
            if it.path in img_cache:
                nan[i] = emb_all[img_cache.index[it.path]]
        res = evaluate_catalogue(nan, items, split)
        report["retrieval"] = res["tasks"]
        main_task = next((t for t in ("photo_to_catalogue", "item_to_item") if t in res["rankings"]), None)
        if main_task and page_queries > 0:
            ranking = res["rankings"][main_task]
            shown = set(ranking[0]) | set(ranking[1])
            images = {i: img_cache.images[img_cache.index[items[i].path]] for i in shown}
            summary = {"model": report["model"], "task": main_task, "split": split,
                       **{k: f"{v:.4f}" for k, v in res["tasks"][main_task].items() if k.startswith(("recall", "mAP"))}}
            write_results_page(out / "results.html", f"{report['model']}: {main_task}", items, images, ranking,
                               n_queries=page_queries, summary=summary)
            report["results_page"] = str(out / "results.html")
    report["seconds"] = round(time.time() - t0, 2)
    atomic_write_text(out / "results.json", json.dumps(report, indent=2, default=float))
    return report
