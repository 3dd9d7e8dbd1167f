"""``make demo`` (``python client/demo.py``): MILDNet visual search end to end on real data, through the project's
own commands.

    python client/demo.py                                   # what `make demo` runs
    python client/demo.py --slice 4 --queries 4 --epochs 1 --input-size 64 --locust-seconds 5   # a quick one

Stages: data (the Grocery Store dataset from ../shared/data/grocery, else a git clone of its public
repository, else Debian's Fashion-MNIST) -> pretrained backbone (``mildnet weights fetch``) -> ``mildnet
train --catalogue`` (the default recipe: frozen backbone, each image's taps pooled once, seconds an epoch) ->
``mildnet export`` -> Triton on 127.0.0.1 -> ``mildnet index`` over the catalogue images ->
``client/query.py`` on held-out photos -> WORK/results.html + WORK/summary.json -> a short headless locust
run -> a printed summary.

Safe to rerun: the training run lives under WORK in a folder named after its settings, so a second run
reuses it; the export and the index are reused while they
match the checkpoint and the catalogue (an interrupted indexing run resumes from its journal). Queries, the
load test and the reports run again. The server is always stopped, on errors and Ctrl-C too.

The model repository defaults to WORK/model_repository (rendered by ``mildnet export``, as every repository
is); ``--repository model_repository`` exports into the checkout's (gitignored) one instead, which ``make serve``
serves.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Callable, Sequence

from . import query
from .commands import query as query_command  # run in-process: one interpreter start instead of one per photo
from .data.catalogue import CatalogueItem, fashion_mnist_catalogue, grocery_catalogue, index_entries, write_catalogue
from .errors import MildnetError
from .fileio import atomic_write_text, sha256_file
from .index import IndexFileError, load_index, read_index_header
from .index.builder import Journal
from .metric_train import MetricConfig
from .serving import contract
from .serving.client import model_metrics, time_per_request
from .serving.repository import read_served
from .serving.server import TritonServer

GROCERY_REPO = "https://github.com/marcusklasson/GroceryStoreDataset"
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_PER_SPLIT = 2000  # Fashion-MNIST has 70,000 images: a few thousand are plenty for a demo
FASHION_GALLERY_PER_CLASS = 5  # it has no shop catalogue: the first training images of each class stand in
# model -> the ImageNet weights its backbone starts from (``mildnet weights fetch NAME``)
DEMO_MODELS = {"mildnet_effnet_lite0": "effnet_lite0", "mildnet_mobile": "mobilenet_v1"}
TOP = 5


class DemoError(MildnetError, RuntimeError):
    """A stage failed in a way the user can act on; the message says how."""


@dataclass(frozen=True)
class Checkout:
    """Where the demo's inputs and outputs are in the checkout it runs from (client/demo.py says)."""

    root: Path  # the commands run here
    locustfile: Path  # client/locustfile.py, what `make loadtest` runs
    work: Path  # the default working folder
    grocery: Path  # the Grocery Store dataset, when there (../shared/data/grocery)
    record: Path  # --record: the README's figures (bench/results/demo.json) ...
    picture: Path  # ... and one query's results (docs/img/demo_query.png)


# ---- data: which dataset, and the catalogues made from it ----------------------------------------------------
@dataclass(frozen=True)
class DataChoice:
    kind: str  # "grocery" | "fashion-mnist"
    root: Path
    source: str  # where it came from, in words


def is_grocery(root: Path) -> bool:
    return (root / "dataset" / "train.txt").is_file() and (root / "dataset" / "classes.csv").is_file()


def is_fashion(root: Path) -> bool:
    return any((root / f"train-images-idx3-ubyte{s}").is_file() for s in ("", ".gz"))


def online(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def git_clone(url: str, dest: Path) -> None:
    """Shallow clone into a sibling folder renamed into place: an interrupted clone never looks complete."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "--depth", "1", url, str(tmp)], check=True)
    os.replace(tmp, dest)


def choose_data(shared: Path, clone_dir: Path, fashion_root: Path = FASHION_ROOT, *,
                is_online: Callable[[], bool] = online, clone: Callable[[str, Path], None] = git_clone,
                log: Callable[[str], None] = print) -> DataChoice:
    """The Grocery Store dataset at ``shared``, else a clone of its repository (made earlier, or now when
    online), else Fashion-MNIST at ``fashion_root``; :class:`DemoError` saying how to get one otherwise."""
    if is_grocery(shared):
        log(f"data: the Grocery Store dataset at {shared}")
        return DataChoice("grocery", shared, f"Grocery Store dataset ({shared})")
    log(f"data: no Grocery Store dataset at {shared}")
    if is_grocery(clone_dir):
        log(f"data: using the clone made by an earlier run at {clone_dir}")
        return DataChoice("grocery", clone_dir, f"Grocery Store dataset (clone of {GROCERY_REPO})")
    if is_online():
        log(f"data: cloning {GROCERY_REPO} into {clone_dir} (a few hundred MB)")
        try:
            clone(GROCERY_REPO, clone_dir)
        except (OSError, subprocess.CalledProcessError) as e:
            log(f"data: the clone failed ({e}); trying Fashion-MNIST")
        else:
            if is_grocery(clone_dir):
                return DataChoice("grocery", clone_dir, f"Grocery Store dataset (clone of {GROCERY_REPO})")
            log("data: the clone has no dataset/train.txt + classes.csv; trying Fashion-MNIST")
    else:
        log("data: offline (github.com unreachable): cannot clone the Grocery Store dataset; trying Fashion-MNIST")
    if is_fashion(fashion_root):
        log(f"data: Debian's Fashion-MNIST at {fashion_root} (28x28 greyscale product photos, 10 classes)")
        return DataChoice("fashion-mnist", fashion_root, f"Fashion-MNIST ({fashion_root})")
    raise DemoError("no data for the demo; any one of these works:\n"
                    f"  - put the Grocery Store dataset at {shared} (a folder holding dataset/train.txt)\n"
                    f"  - be online: the demo clones {GROCERY_REPO}\n"
                    "  - sudo apt-get install dataset-fashion-mnist")


def spread(seq: Sequence, n: int) -> list:
    """``n`` elements evenly spaced over ``seq`` (all of it when n >= len)."""
    if n >= len(seq):
        return list(seq)
    if n <= 0:
        return []
    return [seq[round(i * (len(seq) - 1) / max(n - 1, 1))] for i in range(n)]


@dataclass
class DemoData:
    items: list[CatalogueItem]  # the training catalogue: every split, gallery included
    gallery: list[CatalogueItem]  # what gets indexed (the shop catalogue)
    queries: list[CatalogueItem]  # held-out photos (val split)
    root: Path  # catalogue paths are written relative to it


def pick_queries(photos: Sequence[CatalogueItem], n: int) -> list[CatalogueItem]:
    """``n`` photos over as many classes as possible: first photos of classes spread over the class list,
    then second photos, ... (deterministic, so reruns ask the same questions)."""
    by_class: dict[str, list[CatalogueItem]] = {}
    for p in photos:
        by_class.setdefault(p.item_id, []).append(p)
    out: list[CatalogueItem] = []
    for layer in zip_longest(*by_class.values()):
        out += spread([p for p in layer if p is not None], n - len(out))
        if len(out) >= n:
            break
    return out


def demo_data(choice: DataChoice, work: Path, *, classes: int | None = None, queries: int = 24) -> DemoData:
    """The catalogues of the demo; ``classes`` keeps that many classes (spread over the list: a quick run)."""
    if choice.kind == "grocery":
        items, root = grocery_catalogue(choice.root), choice.root / "dataset"
    else:
        root = work / "data" / "fashion-mnist"
        items = fashion_mnist_catalogue(choice.root, root, limit_per_split=FASHION_PER_SPLIT)
    if classes:
        keep = set(spread(list(dict.fromkeys(i.item_id for i in items)), classes))
        items = [i for i in items if i.item_id in keep]
    gallery = [i for i in items if i.domain == "shop" and i.split is None]  # Grocery's iconic images
    if not gallery:
        seen: dict[str, int] = {}
        for i in items:
            if i.split == "train" and seen.get(i.item_id, 0) < FASHION_GALLERY_PER_CLASS:
                seen[i.item_id] = seen.get(i.item_id, 0) + 1
                gallery.append(i)
    in_gallery = {i.path for i in gallery}
    held_out = [i for i in items if i.split == "val" and i.path not in in_gallery]
    if not held_out:
        raise DemoError(f"{choice.source}: no val photos to query with")
    return DemoData(items, gallery, pick_queries(held_out, queries), root)


# ---- helpers -----------------------------------------------------------------------------------------------------
def settings_key(**settings) -> str:
    """A short name for a set of settings: a stage's folder, so other settings never reuse its output."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _show(cmd: Sequence) -> str:
    return shlex.join(str(c) for c in cmd).replace(sys.executable, "python")


def run_cmd(cmd: list, *, cwd: Path, capture: bool = False) -> str:
    """Run a project command with its output on the terminal (stdout captured with ``capture``)."""
    print(f"$ {_show(cmd)}", flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        raise DemoError(f"`{_show(cmd)[:120]}` failed (exit {proc.returncode}); see its output above")
    return proc.stdout or ""


def mildnet_cmd(*args) -> list:
    return [sys.executable, "-m", "mildnet", *args]


class Stages:
    """Numbered stage headers and the seconds each stage took."""

    def __init__(self, total: int):
        self.total, self.seconds = total, {}

    @contextlib.contextmanager
    def __call__(self, name: str, title: str):
        print(f"\n=== [{len(self.seconds) + 1}/{self.total}] {title}", flush=True)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 1)


# ---- stages ------------------------------------------------------------------------------------------------------
def train_model(args, data: DemoData, work: Path, data_key: str, cwd: Path) -> Path:
    """``mildnet train --catalogue`` (the default recipe) into a run folder named after the data and the flags;
    reused once finished. The val photos the demo queries with are never trained on: the recipe trains on the
    train split's photos only, and chooses its epoch on products and photos it holds out of that."""
    catalogue = write_catalogue(data.items, work / "data" / data_key / "catalogue.jsonl", root=data.root)
    flags = ["--model", args.model, "--input-size", args.input_size, "--epochs", args.epochs, "--seed", 0]
    # the recipe's defaults name the folder too: a new default recipe never reuses a run of the old one
    out = work / "train" / settings_key(data=data_key, flags=flags, recipe=MetricConfig().recipe())
    best, metrics = out / "best.pt", out / "metrics.json"
    if best.is_file() and metrics.is_file():
        print(f"reusing the checkpoint {best}")
        return best
    run_cmd(mildnet_cmd("train", "--catalogue", catalogue, "--root", data.root, "--out", out, *flags), cwd=cwd)
    return best


def export_model(checkpoint: Path, repository: Path, checkout: Checkout) -> str:
    """Export unless the repository's latest version already is this checkpoint; returns its model_version."""
    try:
        latest = read_served(repository)
        if latest.model_version == contract.model_version(latest.variant, sha256_file(checkpoint)):
            print(f"reusing the export: {repository}/{contract.EMBEDDING_MODEL}/{latest.version} is {checkpoint}")
            return latest.model_version
    except contract.ContractError:  # nothing exported yet
        pass
    run_cmd(mildnet_cmd("export", "--checkpoint", checkpoint, "--repository", repository), cwd=checkout.root)
    return read_served(repository).model_version


def build_index(data: DemoData, work: Path, data_key: str, index_file: Path, model_version: str,
                url: str, cwd: Path) -> dict:
    """``mildnet index`` (client/index.py) over the gallery into the file the `similar` model serves; reused
    when it already holds exactly this catalogue embedded by this model."""
    gallery = write_catalogue(data.gallery, work / "data" / data_key / "gallery.jsonl", root=data.root)
    ids = {e[0] for e in index_entries(gallery, data.root)}  # the ids index.py gives these rows
    pending = [index_file.with_name(index_file.name + s) for s in (".journal", ".partial")]
    if any(p.exists() for p in pending):
        if _pending_model(*pending) not in (None, model_version):  # index.py would refuse to resume it
            print("an interrupted indexing run of another model is pending: starting over")
            for p in pending + [index_file]:
                p.unlink(missing_ok=True)
        # else index.py resumes it
    elif index_file.exists():
        try:
            index = load_index(index_file)
            if index.model_version == model_version and set(index.ids()) == ids:
                print(f"reusing the index {index_file} ({len(ids)} items, {model_version})")
                return {"items": len(ids), "embedded": 0, "reused": True}
            print(f"{index_file} holds another model's or catalogue's items: rebuilding it")
        except IndexFileError as e:
            print(f"{index_file} is unreadable ({e}): rebuilding it")
        index_file.unlink()
    stats = run_cmd(mildnet_cmd("index", gallery, "--root", data.root, "--out", index_file, "--url", url, "--json"),
                    cwd=cwd, capture=True)
    return json.loads(stats)


def _pending_model(journal: Path, partial: Path) -> str | None:
    """The model version an interrupted indexing run embedded with (None: cannot tell)."""
    try:
        if partial.exists():
            return read_index_header(partial).get("model_version")
        return Journal(journal).header().get("model_version")
    except (OSError, ValueError):  # IndexFileError is a ValueError
        return None


def run_queries(data: DemoData, url: str) -> list[dict]:
    """``mildnet query`` (client/query.py; its main, in-process) per query."""
    from tqdm import tqdm

    results = []
    for item in tqdm(data.queries, desc="querying", unit="photo", dynamic_ncols=True):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = query_command.main([str(item.path), "--k", str(TOP), "--json", "--url", url,
                                       "--images", str(data.root)])
        if code != 0:
            raise DemoError(f"client/query.py {item.path} failed (exit {code}); see its message above")
        hits = json.loads(out.getvalue())["hits"]
        rows = [{"rank": h["rank"], "id": h["id"], "item_id": h["metadata"].get("item_id"),
                 "score": h["score"], "path": h["path"], "right": h["metadata"].get("item_id") == item.item_id}
                for h in hits]
        results.append({"query": _rel(item.path, data.root), "path": str(item.path), "item_id": item.item_id,
                        "category": item.category, "hits": rows, "top1": bool(rows and rows[0]["right"]),
                        "top5": any(r["right"] for r in rows)})
    return results


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def run_locust(queries: Sequence[CatalogueItem], work: Path, http_url: str, grpc_url: str, seconds: int,
               users: int, checkout: Checkout) -> dict:
    """A short headless locust run (client/locustfile.py, as `make loadtest`) sending the query photos."""
    images = work / "locust" / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    for n, item in enumerate(queries):
        shutil.copyfile(item.path, images / f"{n:03d}_{item.path.name}")
    stats_file = work / "locust" / "stats"  # locust appends .json
    cmd = [sys.executable, "-m", "locust", "-f", checkout.locustfile, "--headless", "--web-host", "127.0.0.1",
           "-u", users, "-r", users, "-t", f"{seconds}s", "--stop-timeout", 10, "--host", f"http://{http_url}",
           "--grpc-host", grpc_url, "--images", images, "--k", TOP, "--json-file", stats_file,
           "--html", work / "locust" / "report.html", "--only-summary"]
    print(f"$ {_show(cmd)}", flush=True)
    code = subprocess.run([str(c) for c in cmd], cwd=checkout.root).returncode  # 1 = some requests failed: reported
    try:
        # The final statistics (its CSV files are written every second and miss the last requests)
        entries = json.loads(Path(f"{stats_file}.json").read_text())
    except (OSError, ValueError) as e:
        raise DemoError(f"locust wrote no statistics (exit {code}, {e}); see its output above") from None
    return {"seconds": seconds, "users": users, "exit_code": code, **locust_numbers(entries),
            "report": str(work / "locust" / "report.html")}


def locust_numbers(entries: list[dict]) -> dict:
    """Totals over locust's per-request statistics (its --json-file): counts, throughput, latency percentiles."""
    times: dict[int, int] = {}
    for e in entries:
        for ms, count in e["response_times"].items():
            times[int(ms)] = times.get(int(ms), 0) + count
    n = sum(e["num_requests"] for e in entries)

    def percentile(p: float) -> float | None:  # locust's rule: the smallest time that p of the requests beat
        done = 0
        for ms in sorted(times):
            done += times[ms]
            if done >= p * n:
                return float(ms)
        return None

    starts = [e["start_time"] for e in entries]
    ends = [e["last_request_timestamp"] for e in entries if e["last_request_timestamp"]]
    span = max(ends) - min(starts) if starts and ends else 0
    return {"requests": n, "failures": sum(e["num_failures"] for e in entries),
            "requests_per_s": n / span if span > 0 else None,
            "latency_ms": {str(p): percentile(p / 100) for p in (50, 95, 99)},
            "by_request": {f"{e['method']} {e['name']}": e["num_requests"] for e in entries}}


# ---- report ------------------------------------------------------------------------------------------------------
def accuracy(results: Sequence[dict]) -> dict:
    n = len(results)
    top1, top5 = sum(r["top1"] for r in results), sum(r["top5"] for r in results)
    return {"queries": n, "top1_correct": top1, "top5_correct": top5,
            "top1_accuracy": top1 / n if n else None, "top5_accuracy": top5 / n if n else None}


def write_page(path: Path, results: Sequence[dict], summary: dict) -> None:
    """Self-contained HTML (thumbnails inlined): each query beside its top 5, framed green (same product) or
    red. Every text is escaped; the data-* attributes let tests read the page back."""
    esc = html.escape

    def pic(source) -> str:
        img = query.thumbnail(source)
        return f'<img src="{query.data_uri(img)}" alt="">' if img is not None else "<div>no image</div>"

    rows = []
    for r in results:
        cells = [f'<td class="q">{pic(r["path"])}<br><b>{esc(r["item_id"])}</b><br><small>{esc(r["query"])}'
                 "</small></td>"]
        for h in r["hits"]:
            mark, cls = ("&#10003;", "right") if h["right"] else ("&#10007;", "wrong")
            cells.append(f'<td class="hit {cls}" data-id="{esc(h["id"])}" data-rank="{h["rank"]}">'
                         f'{pic(h["path"]) if h["path"] else ""}<br>{h["rank"]}. {esc(str(h["item_id"]))} {mark}'
                         f'<br><small>score {h["score"]:.3f}</small></td>')
        rows.append(f'<tr class="query" data-query="{esc(r["query"])}" data-item="{esc(r["item_id"])}">'
                    + "".join(cells) + "</tr>")
    acc = summary["accuracy"]
    facts = {"data": summary["data"]["source"], "model": summary["model"]["model_version"],
             "catalogue": f"{summary['index']['items']} images indexed",
             "top-1": f"{acc['top1_correct']}/{acc['queries']}", "top-5": f"{acc['top5_correct']}/{acc['queries']}"}
    if summary.get("locust"):
        lo = summary["locust"]
        facts["load test"] = (f"{lo['requests']} requests, {lo['failures']} failures, "
                              f"{_fmt(lo['requests_per_s'])} req/s, p50/p95/p99 "
                              + "/".join(_fmt(lo["latency_ms"][p], 0) for p in ("50", "95", "99")) + " ms")
    head = "".join(f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in facts.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>MILDNet demo: visual search</title><style>
body{{font-family:sans-serif;margin:1em}} td{{text-align:center;padding:4px;font-size:12px;vertical-align:top}}
td img{{max-width:140px;max-height:140px}} td.q{{background:#eef}} td.right img{{border:4px solid #2a2}}
td.wrong img{{border:4px solid #d22}}</style></head><body><h1>MILDNet demo: shop photo &rarr; catalogue</h1>
<ul>{head}</ul><table><tr><th>query</th>{"".join(f"<th>#{i}</th>" for i in range(1, TOP + 1))}</tr>
{"".join(rows)}</table></body></html>
"""
    atomic_write_text(path, page)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


SERVED_MODELS = (contract.ENSEMBLE_MODEL, contract.PREPROCESS_MODEL, contract.EMBEDDING_MODEL, contract.SIMILAR_MODEL)


def served_times(metrics_url: str) -> dict[str, dict]:
    """Triton's cumulative counters of every served model (read before and after the load test)."""
    return {m: model_metrics(metrics_url, m) for m in SERVED_MODELS}


def record(summary: dict, out: Path, picture: Path | None) -> dict:
    """The demo's figures for the README (bench/results/demo.json), and a picture of one query's results."""
    acc, lo = summary["accuracy"], summary.get("locust") or {}
    rec = {"benchmark": "demo", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "make demo-record", "data": summary["data"]["source"], "model": summary["model"],
           "catalogue_items": summary["index"]["items"], "queries": acc["queries"], "top1": acc["top1_accuracy"],
           "top5": acc["top5_accuracy"], "seconds": summary["seconds"], "stage_seconds": summary["stage_seconds"],
           "locust": {"seconds": lo.get("seconds"), "users": lo.get("users"), "requests": lo.get("requests"),
                      "failures": lo.get("failures"), "rps": lo.get("requests_per_s"),
                      **{f"p{p}_ms": (lo.get("latency_ms") or {}).get(p) for p in ("50", "95", "99")}},
           "time_per_request": summary.get("time_per_request", {}),
           "machine": {"cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}}
    write_json(out, rec)
    if picture is not None:
        shown = next((r for r in summary["results"] if r["top1"]), summary["results"][0])
        query.write_png(picture, Path(shown["path"]).read_bytes(), shown["hits"])
        print(f"picture of {shown['query']} and its top {len(shown['hits'])}: {picture}")
    print(f"recorded: {out}")
    return rec


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_summary(summary: dict, page: Path, summary_file: Path) -> None:
    acc, lo = summary["accuracy"], summary.get("locust")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        ("data", f"{summary['data']['source']}: {summary['index']['items']} catalogue images indexed"),
        ("model", f"{summary['model']['model_version']} ({summary['model']['input_size']} px, "
                  f"{summary['model']['epochs']} epochs)"),
        ("queries", f"{acc['queries']} held-out photos: top-1 {acc['top1_correct']}/{acc['queries']} "
                    f"({pct(acc['top1_accuracy'])}), top-5 {acc['top5_correct']}/{acc['queries']} "
                    f"({pct(acc['top5_accuracy'])})"),
    ]
    if lo:
        lat = lo["latency_ms"]
        lines.append(("load test", f"{lo['seconds']} s, {lo['users']} users: {lo['requests']} requests, "
                                   f"{lo['failures']} failures, {_fmt(lo['requests_per_s'])} req/s, latency "
                                   + ", ".join(f"p{p} {_fmt(lat[p], 0)} ms" for p in ("50", "95", "99"))))
    for model, t in summary.get("time_per_request", {}).items():
        if t.get("requests"):
            lines.append((f"  {model}", f"{t['requests']} requests, {t['request_ms']:.1f} ms each in Triton: queue "
                                        f"{t['queue_ms']:.1f}, compute {t['compute_infer_ms']:.1f} ms; "
                                        f"batch {t['avg_batch']:.1f}"))
    lines += [("results page", str(page)), ("summary", str(summary_file)),
              ("time", f"{summary['seconds']:.0f} s (" + ", ".join(f"{k} {v:.0f} s"
                                                            for k, v in summary["stage_seconds"].items()) + ")")]
    print("\n=== summary")
    for k, v in lines:
        print(f"{k:<13} {v}")


# ---- the run -----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None, checkout: Checkout) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--work", type=Path, default=checkout.work, help="working folder (default: %(default)s)")
    p.add_argument("--repository", type=Path, help="model repository to export to (default: WORK/model_repository)")
    p.add_argument("--grocery", type=Path, default=checkout.grocery, help="Grocery Store dataset folder to use "
                   "when present (default: %(default)s)")
    p.add_argument("--fashion-mnist", type=Path, default=FASHION_ROOT, help="Fashion-MNIST IDX folder, the last "
                   "resort (default: %(default)s)")
    p.add_argument("--model", default="mildnet_effnet_lite0", choices=sorted(DEMO_MODELS),
                   help="model to train and serve (default: %(default)s, the most accurate in bench/accuracy.py)")
    p.add_argument("--epochs", type=int, default=MetricConfig.epochs,
                   help="(default: %(default)s, the default recipe's; its best dev epoch is kept)")
    p.add_argument("--input-size", type=int, default=224, help="model input size (default: %(default)s)")
    p.add_argument("--queries", type=int, default=24, help="held-out photos to query (default: %(default)s)")
    p.add_argument("--slice", type=int, metavar="CLASSES", help="keep only this many classes (a quick run)")
    p.add_argument("--locust-seconds", type=int, default=25, help="0 skips the load test (default: %(default)s)")
    p.add_argument("--locust-users", type=int, default=4)
    p.add_argument("--ui", action="store_true", help="keep Triton and the search page running at the end, "
                   "until Ctrl-C (`make demo DEMO_ARGS=--ui`)")
    p.add_argument("--ui-port", type=int, default=8090, help="the search page's port (default: %(default)s; "
                   "a free one when taken)")
    p.add_argument("--record", action="store_true", help="also write bench/results/demo.json and "
                   "docs/img/demo_query.png, the README's figures (`make demo-record`)")
    args = p.parse_args(argv)
    if min(args.epochs, args.input_size, args.queries) < 1 or args.locust_seconds < 0:
        p.error("--epochs, --input-size and --queries must be >= 1, --locust-seconds >= 0")
    return args


def demo(args: argparse.Namespace, checkout: Checkout) -> dict:
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    repository = (args.repository or work / "model_repository").resolve()
    stages = Stages(total=9 if args.locust_seconds else 8)
    t0 = time.perf_counter()

    with stages("data", "data"):
        choice = choose_data(args.grocery.resolve(), work / "data" / "GroceryStoreDataset", args.fashion_mnist)
        data = demo_data(choice, work, classes=args.slice, queries=args.queries)
        data_key = settings_key(kind=choice.kind, root=choice.root, slice=args.slice)
        print(f"{len(data.items)} catalogue rows, {len(data.gallery)} catalogue images to index, "
              f"{len(data.queries)} held-out query photos")
    with stages("weights", "pretrained backbone (offline, cached in ~/.cache/mildnet)"):
        run_cmd(mildnet_cmd("weights", "fetch", DEMO_MODELS[args.model]), cwd=checkout.root)
    with stages("train", f"train {args.model} (default recipe, {args.epochs} epochs, {args.input_size} px)"):
        checkpoint = train_model(args, data, work, data_key, checkout.root)
    with stages("export", f"export to {repository}"):
        model_version = export_model(checkpoint, repository, checkout)

    summary: dict = {"data": {"kind": choice.kind, "root": str(choice.root), "source": choice.source,
                              "slice": args.slice},
                     "model": {"variant": args.model, "checkpoint": str(checkpoint), "model_version": model_version,
                               "input_size": args.input_size, "epochs": args.epochs, "repository": str(repository)}}
    page, summary_file = work / "results.html", work / "summary.json"
    with contextlib.ExitStack() as stack:
        with stages("serve", "start Triton (127.0.0.1)"):
            # The stop is registered before the start: a Ctrl-C while it starts still stops it.
            server = TritonServer(repository, model_control_mode="none", log_file=work / "tritonserver.log")
            stack.callback(stop_server, server)
            server.start()
            print(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url} (log {server.log_file})")
        with stages("index", "index the catalogue (mildnet index)"):
            index_file = contract.default_index_path(repository)
            summary["index"] = {"file": str(index_file), **build_index(data, work, data_key, index_file,
                                                                       model_version, server.http_url,
                                                                       checkout.root)}
        page_server = start_page(server.http_url, index_file, args.ui_port)
        stack.callback(page_server.stop)
        print(f"search page: {page_server.url}" + ("" if args.ui else "  (while the demo runs; "
                                                   "`make demo DEMO_ARGS=--ui` keeps it up)"))
        with stages("query", f"query {len(data.queries)} held-out photos (mildnet query)"):
            results = run_queries(data, server.http_url)
            summary.update(accuracy=accuracy(results), results=results)
            write_page(page, results, summary)  # now, so a failing load test still leaves the page
            write_json(summary_file, summary)
        if args.locust_seconds:
            with stages("locust", f"load test: {args.locust_seconds} s, {args.locust_users} users (locust)"):
                before = served_times(server.metrics_url)
                summary["locust"] = run_locust(data.queries, work, server.http_url, server.grpc_url,
                                               args.locust_seconds, args.locust_users, checkout)
                time.sleep(2.5)  # Triton refreshes its counters every 2 s
                after = served_times(server.metrics_url)
                summary["time_per_request"] = {m: time_per_request(before[m], after[m]) for m in SERVED_MODELS}
        if args.ui:
            wait_for_ctrl_c(f"search page: {page_server.url} (Triton {server.http_url}); Ctrl-C stops both")
        with stages("stop", "stop Triton"):
            stack.close()
    summary.update(page=str(page), stage_seconds=stages.seconds, seconds=round(time.perf_counter() - t0, 1))
    write_page(page, results, summary)
    write_json(summary_file, summary)
    print_summary(summary, page, summary_file)
    if args.record:
        record(summary, checkout.record, checkout.picture)
    return summary


def start_page(triton_url: str, index_file: Path, port: int):
    """The search page (mildnet.ui) over the demo's server and index, on a thread; a free port if taken."""
    from .ui.app import UIConfig, create_app  # lazy: starlette and uvicorn are the optional `ui` extra
    from .ui.server import PageServer  # lazy: uvicorn, the same extra

    app = create_app(UIConfig(urls=[triton_url], index=index_file))
    try:
        return PageServer(app, port=port).start()
    except RuntimeError:
        return PageServer(app, port=0).start()


def wait_for_ctrl_c(message: str) -> None:
    print(f"\n{message}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping the search page and Triton")


def stop_server(server) -> None:
    """Stop Triton with Ctrl-C and SIGTERM held off: a second Ctrl-C must not leave it half stopped."""
    held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.stop()
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)


def main(argv: list[str] | None, checkout: Checkout) -> int:
    """The whole demo (client/demo.py's entry point); returns the exit code."""
    args = parse_args(argv, checkout)

    def _terminate(signum, _frame):  # SIGTERM unwinds like Ctrl-C, so the server is stopped on the way out
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        demo(args, checkout)
    except KeyboardInterrupt:
        print("\ndemo: interrupted (the server was stopped); run it again to resume", file=sys.stderr)
        return 130
    except (DemoError, ValueError, RuntimeError, OSError) as e:
        print(f"\ndemo: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
