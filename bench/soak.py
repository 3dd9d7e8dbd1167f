#!/usr/bin/env python
"""Sustained load: a steady request rate against a real Triton server for a set time; nothing may fail or leak.

    python bench/soak.py                          # 10 minutes at 3 requests/s (the default soak)
    python bench/soak.py --duration 120           # a short look (what bench/results/soak.json holds now)
    python bench/soak.py --rate 20 --duration 3600 --similar-fraction 0.5

It starts its own server (:class:`mildnet.serve.TritonServer`, free 127.0.0.1 ports) on a temporary copy of
``model_repository/`` with a small exported model (seeded, untrained ``mildnet_mobile`` at ``--input-size``)
and an index of real Grocery photos for ``similar``. Requests are scheduled open-loop at ``--rate`` per second
(a slow answer does not slow the schedule, so queueing shows up in the latency instead of hiding), each one a
real photo: ``mildnet_ensemble`` (bytes -> embedding) or, for ``--similar-fraction`` of them, ``similar``
(bytes -> top-k). Every answer is checked against the first answer for the same photo: a wrong answer counts
as a failure, like an error.

Recorded per ``--window`` seconds: requests served, failures, p50/p99 latency (from the scheduled send time),
and the resident memory (VmRSS) of the ``tritonserver`` process plus its Python backend stubs.
Targets: 0 failures; RSS growth after warm-up (mean of the last window over the first window after
``--warmup`` s) below 10 %. Writes bench/results/soak.json and bench/results/soak.png; prints a table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
from mildnet.fileio import atomic_write_text  # noqa: E402
RESULTS = ROOT / "bench" / "results"
GROCERY = Path(os.environ.get("MILDNET_GROCERY", ROOT.parent / "shared" / "data" / "grocery"))
TARGET_FAILURES, TARGET_RSS_GROWTH = 0, 0.10


# ---- server memory ------------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (the Python backend stubs are children of tritonserver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces: split after ")"
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS of one process in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def server_rss(pid: int) -> tuple[int, int]:
    """(total VmRSS of the server and its stubs, number of processes)."""
    pids = process_tree(pid)
    return sum(rss_bytes(p) for p in pids), len(pids)


# ---- setup ----------------------------------------------------------------------------------------------------
def load_photos(n: int) -> list[bytes]:
    """``n`` real store photos, one per fine class first (Grocery train split)."""
    listing = GROCERY / "dataset" / "train.txt"
    if not listing.is_file():
        sys.exit(f"soak.py: Grocery data not found at {GROCERY} (set MILDNET_GROCERY)")
    by_class: dict[str, list[Path]] = {}
    for line in listing.read_text().splitlines():
        rel, fine, _ = [s.strip() for s in line.split(",")]
        by_class.setdefault(fine, []).append(GROCERY / "dataset" / rel)
    paths, round_ = [], 0
    while len(paths) < n:
        row = [ps[round_] for ps in by_class.values() if len(ps) > round_]
        if not row:
            break
        paths += row
        round_ += 1
    return [p.read_bytes() for p in paths[:n]]


def prepare_repository(workdir: Path, variant: str, input_size: int, seed: int) -> Path:
    """A temporary model repository with one exported (seeded, untrained) model."""
    import torch

    from mildnet import models
    from mildnet.export import ServingConfig, export_model

    repo = workdir / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("[0-9]*", "index"))
    torch.manual_seed(seed)
    model = models.create(variant, pretrained=False, input_size=input_size).eval()
    export_model(model, repo, ServingConfig(max_batch_size=16, max_queue_delay_us=2000))
    return repo


def build_index(remote, photos: list[bytes], path: Path) -> None:
    from mildnet.index import create_index

    info = remote.model_info()
    vectors = remote.embed(photos)  # (N, D) through the server: the same space `similar` searches
    index = create_index(info.embedding_dim, kind="flat", model_version=info.model_version)
    index.add([f"photo-{i}" for i in range(len(photos))], vectors, [{"n": i} for i in range(len(photos))])
    index.save(path)


# ---- the load run ---------------------------------------------------------------------------------------------
class Recorder:
    """Thread-safe list of (scheduled time, latency s, ok, error text)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows: list[tuple[float, float, bool, str]] = []

    def add(self, t: float, latency: float, ok: bool, error: str = "") -> None:
        with self.lock:
            self.rows.append((t, latency, ok, error))


def one_request(remote, photos, refs, rec: Recorder, i: int, scheduled: float, t0: float, use_similar: bool,
                k: int) -> None:
    j = i % len(photos)
    try:
        if use_similar:
            hits = remote.similar(photos[j], k=k)
            ok = len(hits) == k and hits[0].id == f"photo-{j}"  # a photo of the catalogue finds itself first
            error = "" if ok else f"wrong top hit {hits[0].id if hits else None} for photo-{j}"
        else:
            v = remote.embed_one(photos[j])
            ok = bool(np.allclose(v, refs[j], atol=1e-4))
            error = "" if ok else f"embedding of photo {j} changed"
    except Exception as e:  # noqa: BLE001 - every failure is recorded, none stops the run
        ok, error = False, f"{type(e).__name__}: {str(e)[:200]}"
    rec.add(scheduled - t0, time.perf_counter() - scheduled, ok, error)


def run_load(remote, server, photos, refs, args) -> tuple[Recorder, list[dict]]:
    rec = Recorder()
    memory: list[dict] = []
    stop = threading.Event()
    pid = server.process.pid
    t0 = time.perf_counter()

    def sample_memory():
        while not stop.is_set():
            rss, nproc = server_rss(pid)
            memory.append({"t": round(time.perf_counter() - t0, 2), "rss_mb": round(rss / 2**20, 2),
                           "processes": nproc})
            stop.wait(args.memory_every)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    rng = np.random.default_rng(args.seed)
    n = int(args.duration * args.rate)
    try:
        from tqdm import tqdm
        bar = tqdm(total=n, unit="req", desc="soak", dynamic_ncols=True, mininterval=5)
    except ImportError:
        bar = None
    with ThreadPoolExecutor(args.concurrency, thread_name_prefix="soak") as pool:
        for i in range(n):
            scheduled = t0 + i / args.rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one_request, remote, photos, refs, rec, i, scheduled, t0,
                        bool(rng.random() < args.similar_fraction), args.k)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    stop.set()
    sampler.join()
    return rec, memory


def summarise(rec: Recorder, memory: list[dict], args) -> dict:
    rows = sorted(rec.rows)
    windows = []
    for w0 in np.arange(0, args.duration, args.window):
        part = [r for r in rows if w0 <= r[0] < w0 + args.window]
        lat = np.array([r[1] for r in part if r[2]]) * 1000
        mem = [m["rss_mb"] for m in memory if w0 <= m["t"] < w0 + args.window]
        windows.append({
            "t_start": float(w0), "requests": len(part), "served": int(sum(r[2] for r in part)),
            "failures": int(sum(not r[2] for r in part)),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "rss_mb": round(float(np.mean(mem)), 2) if mem else None,
        })
    after = [w for w in windows if w["t_start"] >= args.warmup and w["rss_mb"] is not None]
    base, last = (after[0]["rss_mb"], after[-1]["rss_mb"]) if after else (None, None)
    growth = (last - base) / base if base else None
    errors: dict[str, int] = {}
    for r in rows:
        if not r[2]:
            key = r[3][:120]
            errors[key] = errors.get(key, 0) + 1
    all_lat = np.array([r[1] for r in rows if r[2]]) * 1000
    failures = sum(not r[2] for r in rows)
    return {
        "requests": len(rows), "served": len(rows) - failures, "failures": failures,
        "achieved_rate": round(len(rows) / args.duration, 2),
        "p50_ms": round(float(np.percentile(all_lat, 50)), 2) if len(all_lat) else None,
        "p99_ms": round(float(np.percentile(all_lat, 99)), 2) if len(all_lat) else None,
        "rss_after_warmup_mb": base, "rss_end_mb": last,
        "rss_growth_after_warmup": round(growth, 4) if growth is not None else None,
        "rss_max_mb": max((m["rss_mb"] for m in memory), default=None),
        "targets": {"failures": TARGET_FAILURES, "rss_growth_after_warmup": TARGET_RSS_GROWTH},
        "met": {"failures": failures <= TARGET_FAILURES,
                "rss_growth": growth is not None and growth < TARGET_RSS_GROWTH},
        "errors": errors, "windows": windows, "memory": memory,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = result["summary"]["windows"]
    t = [x["t_start"] + result["settings"]["window"] / 2 for x in w]
    fig, ax = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    ax[0].plot(t, [x["served"] / result["settings"]["window"] for x in w], label="served/s")
    ax[0].plot(t, [x["failures"] for x in w], "r", label="failures per window")
    ax[0].legend()
    ax[0].set_ylabel("requests")
    ax[1].plot(t, [x["p50_ms"] for x in w], label="p50")
    ax[1].plot(t, [x["p99_ms"] for x in w], label="p99")
    ax[1].set_ylabel("latency (ms)")
    ax[1].legend()
    mem = result["summary"]["memory"]
    ax[2].plot([m["t"] for m in mem], [m["rss_mb"] for m in mem])
    ax[2].axvline(result["settings"]["warmup"], color="grey", ls="--", label="end of warm-up")
    ax[2].set_ylabel("server RSS (MB)")
    ax[2].set_xlabel("time (s)")
    ax[2].legend()
    s = result["settings"]
    fig.suptitle(f"soak: {s['rate']} req/s for {s['duration']} s ({result['summary']['failures']} failures, "
                 f"RSS growth {100 * (result['summary']['rss_growth_after_warmup'] or 0):.1f}%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600 = 10 min)")
    p.add_argument("--rate", type=float, default=3.0,
                   help="requests per second, steady (default 3; above the server's capacity latency grows)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per reported window")
    p.add_argument("--warmup", type=float, default=None, help="seconds before memory counts (default 15%% of "
                   "--duration, at least one window)")
    p.add_argument("--memory-every", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--similar-fraction", type=float, default=0.25, help="share of `similar` requests")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--photos", type=int, default=32, help="distinct Grocery photos to send")
    p.add_argument("--variant", default="mildnet_mobile")
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(args.window, round(0.15 * args.duration / args.window) * args.window)
    if args.duration < 2 * args.window or args.warmup >= args.duration:
        p.error("--duration must cover at least two windows and outlast --warmup")

    import torch

    from mildnet.remote import TritonEmbedder
    from mildnet.serve import TritonServer

    torch.set_num_threads(1)
    photos = load_photos(args.photos)
    with tempfile.TemporaryDirectory(prefix="mildnet-soak-") as tmp:
        repo = prepare_repository(Path(tmp), args.variant, args.input_size, args.seed)
        with TritonServer(repo, model_control_mode="none", log_file=Path(tmp) / "tritonserver.log") as server:
            url = server.http_url if args.protocol == "http" else server.grpc_url
            with TritonEmbedder(url, protocol=args.protocol, concurrency=args.concurrency) as remote:
                build_index(remote, photos, repo / "similar" / "index" / "catalogue.mindex")
                refs = remote.embed(photos)  # also the warm-up of both pipelines
                remote.similar(photos[0], k=args.k)
                print(f"server up ({server.http_url}); {args.rate} req/s for {args.duration:.0f} s ...", flush=True)
                rec, memory = run_load(remote, server, photos, refs, args)
            log_tail = server.log_tail(10)
    summary = summarise(rec, memory, args)
    result = {
        "benchmark": "soak",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform()},
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "summary": summary,
        "server_log_tail": log_tail if summary["failures"] else "",
    }
    atomic_write_text(args.out, json.dumps(result, indent=1))
    png = args.out.with_suffix(".png")
    plot(result, png)

    print(f"\n{'t (s)':>6} {'served':>7} {'fail':>5} {'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>8}")
    for w in summary["windows"]:
        print(f"{w['t_start']:6.0f} {w['served']:7d} {w['failures']:5d} {w['p50_ms'] or float('nan'):8.1f} "
              f"{w['p99_ms'] or float('nan'):8.1f} {w['rss_mb'] or float('nan'):8.1f}")
    g = summary["rss_growth_after_warmup"]
    print(f"\n{summary['served']}/{summary['requests']} served, {summary['failures']} failures "
          f"(target {TARGET_FAILURES}); p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms; RSS "
          f"{summary['rss_after_warmup_mb']} -> {summary['rss_end_mb']} MB after warm-up "
          f"({100 * g:+.1f}%, target < {100 * TARGET_RSS_GROWTH:.0f}%)" if g is not None else "")
    for err, count in summary["errors"].items():
        print(f"  {count} x {err}")
    print(f"wrote {args.out} and {png}")
    return 0 if all(summary["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
