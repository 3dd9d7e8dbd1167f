#!/usr/bin/env python
"""Sustained load: a steady request rate against a real Triton server for a set time; nothing may fail or leak.

    python bench/soak.py                          # 10 minutes at 3 requests/s (the default soak)
    python bench/soak.py --duration 120           # a short look (what bench/results/soak.json holds now)
    python bench/soak.py --rate 20 --duration 3600 --similar-fraction 0.5

It starts its own server (:class:`mildnet.serving.server.TritonServer`, free 127.0.0.1 ports) on a temporary copy of
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

With ``--attack-fraction F`` (the attack soak, written to bench/results/soak_attack.json + .png) a share F of
the requests are attacks, each of which must be refused with a clear error: bad images (truncated, HTML, a
16-bit 6300 x 6300 PNG over the decode budget, a 20000 x 20000 header), malformed filters (nested 5000 deep,
a list value), NaN pixels, shared-memory registration without the admin key; and, at most once every
``--crash-every`` seconds, the one-request crash of Triton 2.51 (a form-encoded body of 4 MB). The server runs
under :func:`mildnet.serving.server.supervise`, as ``mildnet serve`` does. Reported: good requests served / failed,
failed good requests outside the restart windows (target 0), restarts and time to recover, attacks refused,
memory, and this server's ``/dev/shm`` regions at the end (target: none left).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
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
from mildnet.serving import contract  # noqa: E402
RESULTS = ROOT / "bench" / "results"
GROCERY = Path(os.environ.get("MILDNET_GROCERY", ROOT.parent / "shared" / "data" / "grocery"))
TARGET_FAILURES, TARGET_RSS_GROWTH = 0, 0.10
RESTART_GRACE_S = 2.0  # after the supervisor reports the server ready, clients may still hold dead connections


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
    from mildnet.export import export_model
    from mildnet.serving.repository import ServingConfig

    repo = workdir / "model_repository"
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


# ---- attacks ----------------------------------------------------------------------------------------------------
def _png(width: int, height: int, body: bytes | None = None, mode=None) -> bytes:
    import io

    from PIL import Image

    if mode is not None:
        buf = io.BytesIO()
        Image.new(mode, (width, height)).save(buf, "PNG")
        return buf.getvalue()
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def make_attacks(photo: bytes, input_size: int) -> dict:
    """name -> callable(remote, server) that sends one attack and returns None if it was refused as it should be,
    else what went wrong. Crash attacks are separate (see run_load)."""
    import http.client

    from mildnet.serving.client import RemoteInferenceError

    bad_images = {"truncated jpeg": photo[: len(photo) * 6 // 10],
                  "html as image": b"<!doctype html><html><body>Not found</body></html>",
                  "16-bit 6300x6300 png": _png(6300, 6300, mode="I;16"),
                  "20000x20000 header": _png(20000, 20000)}
    bad_filters = {"filter nested 5000 deep": b"[" * 5000 + b"]" * 5000,
                   "filter with a list value": b'{"n": [1, 2]}'}

    def refused(call) -> str | None:
        try:
            call()
        except RemoteInferenceError as e:
            return None if "Traceback" not in str(e) else f"traceback in the error: {str(e)[:100]}"
        except Exception as e:  # noqa: BLE001 - anything else is a wrong answer to an attack
            return f"{type(e).__name__}: {str(e)[:150]}"
        return "accepted"

    def image(data):
        return lambda remote, server: refused(lambda: remote.embed_one(data))

    def filt(text):
        def send(remote, server):
            inputs = [(contract.IMAGE, np.array([[photo]], dtype=object), "BYTES"),
                      (contract.K, np.array([[2]], np.int32), "INT32"),
                      (contract.FILTER, np.array([[text]], dtype=object), "BYTES")]
            return refused(lambda: remote.infer(contract.SIMILAR_MODEL, inputs, [contract.IDS]))
        return send

    def nan_pixels(remote, server):
        pixels = np.full((1, 3, input_size, input_size), np.nan, np.float32)
        return refused(lambda: remote.infer(contract.EMBEDDING_MODEL, [(contract.PIXELS, pixels, "FP32")],
                                            [contract.EMBEDDING]))

    def shm_register(remote, server):
        body = b'{"key": "' + server.shm_prefix.encode() + b'1", "offset": 0, "byte_size": 64}'
        try:
            conn = http.client.HTTPConnection(*server.http_url.split(":"), timeout=10)
            conn.request("POST", "/v2/systemsharedmemory/region/evil/register", body=body,
                         headers={"Content-Type": "application/json"})
            status = conn.getresponse().status
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        return None if status == 403 else f"HTTP {status}"

    attacks = {name: image(data) for name, data in bad_images.items()}
    attacks.update({name: filt(text) for name, text in bad_filters.items()})
    attacks["nan pixels"] = nan_pixels
    attacks["shm register without the key"] = shm_register
    return attacks


def crash_request(http_url: str) -> None:
    """The form-encoded 4 MB body that makes tritonserver 2.51 die with SIGSEGV (Triton issue #5840)."""
    import http.client

    try:
        conn = http.client.HTTPConnection(*http_url.split(":"), timeout=30)
        conn.request("POST", "/v2/models/mildnet/infer", body=os.urandom(4 * 2**20 + 17),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        pass  # the expected outcome: the connection dies with the server


def shm_regions(prefix: str) -> tuple[int, int]:
    """(count, bytes) of the /dev/shm files under a server's prefix."""
    files = [p for p in Path("/dev/shm").glob(prefix + "*")]
    return len(files), sum(p.stat().st_size for p in files if p.exists())


# ---- the load run ---------------------------------------------------------------------------------------------
class Recorder:
    """Thread-safe list of (scheduled time, latency s, ok, error text) for good requests, and of attacks."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows: list[tuple[float, float, bool, str]] = []
        self.attacks: list[tuple[float, float, str, bool, str]] = []  # (time, latency, kind, refused, problem)

    def add(self, t: float, latency: float, ok: bool, error: str = "", kind: str = "") -> None:
        with self.lock:
            if kind:
                self.attacks.append((t, latency, kind, ok, error))
            else:
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


def run_attack(attacks: dict, name: str, remote, server, rec: Recorder, scheduled: float, t0: float) -> None:
    try:
        problem = attacks[name](remote, server)
    except Exception as e:  # noqa: BLE001
        problem = f"{type(e).__name__}: {str(e)[:150]}"
    rec.add(scheduled - t0, time.perf_counter() - scheduled, problem is None, problem or "", kind=name)


def run_load(remote, server, photos, refs, args, attacks: dict | None = None
             ) -> tuple[Recorder, list[dict], list[float]]:
    """The open-loop schedule; returns (outcomes, memory samples, times the crash request was sent)."""
    rec = Recorder()
    memory: list[dict] = []
    crashes: list[float] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample_memory():
        while not stop.is_set():
            proc = server.process  # changes with every restart
            rss, nproc = server_rss(proc.pid) if proc is not None and proc.poll() is None else (0, 0)
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
    names = sorted(attacks or {})
    last_crash = t0
    with ThreadPoolExecutor(args.concurrency, thread_name_prefix="soak") as pool:
        for i in range(n):
            scheduled = t0 + i / args.rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if names and rng.random() < args.attack_fraction:
                if args.crash_every and scheduled - last_crash >= args.crash_every and server.is_ready():
                    last_crash = time.perf_counter()
                    crashes.append(last_crash - t0)
                    pool.submit(crash_request, server.http_url)
                else:
                    pool.submit(run_attack, attacks, names[int(rng.integers(len(names)))], remote, server, rec,
                                scheduled, t0)
            else:
                pool.submit(one_request, remote, photos, refs, rec, i, scheduled, t0,
                            bool(rng.random() < args.similar_fraction), args.k)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    stop.set()
    sampler.join()
    return rec, memory, crashes


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


def summarise_attacks(rec: Recorder, crashes: list[float], events: list[dict], shm: dict, args) -> dict:
    """Restart windows (from a crash request, or a death the supervisor saw, to ready again + a grace), good
    requests lost inside and outside them, attacks refused as they should be, recovery times."""
    windows, used = [], set()
    for r in (e for e in events if e["kind"] == "restarted"):
        noticed = r["t"] - r["downtime_s"]  # when the supervisor saw the server dead (it polls every 0.5 s)
        start = noticed - 1.0
        cause = [c for c in crashes if c not in used and c <= noticed + 1.0]
        if cause:  # opened by the crash request that caused it
            used.add(cause[0])
            start = min(start, cause[0])
        windows.append((start, r["t"] + RESTART_GRACE_S))
    readies = [e for e in events if e["kind"] == "restarted"]
    def inside(t: float, latency: float) -> bool:  # the request was in flight during a restart window
        return any(t <= b and t + latency >= a for a, b in windows)

    failed = [r for r in rec.rows if not r[2]]
    outside = [r for r in failed if not inside(r[0], r[1])]
    by_kind: dict[str, dict] = {}
    for t, latency, kind, ok, problem in rec.attacks:
        d = by_kind.setdefault(kind, {"sent": 0, "refused": 0, "in_restart_window": 0, "problems": {}})
        d["sent"] += 1
        d["refused"] += ok
        d["in_restart_window"] += inside(t, latency)
        if not ok:
            d["problems"][problem[:100]] = d["problems"].get(problem[:100], 0) + 1
    wrong = sum(d["sent"] - d["refused"] for d in by_kind.values())
    wrong_outside = sum(1 for t, latency, _, ok, _ in rec.attacks if not ok and not inside(t, latency))
    recover = [round(r["t"] - w[0], 2) for r, w in zip(readies, windows)]
    return {
        "crash_requests": len(crashes), "restarts": len(readies),
        "recovery_s": recover, "recovery_max_s": max(recover, default=None),
        "restart_windows": [[round(a, 2), round(b, 2)] for a, b in windows],
        "good_requests": len(rec.rows), "good_served": len(rec.rows) - len(failed), "good_failed": len(failed),
        "good_failed_outside_restart_windows": len(outside),
        "good_failed_outside_examples": sorted({r[3][:120] for r in outside})[:5],
        "attacks": len(rec.attacks), "attacks_not_refused": wrong,
        "attacks_not_refused_outside_restart_windows": wrong_outside, "by_attack": by_kind,
        "supervisor_events": events, "shm": shm,
        "met": {"no_good_request_lost_outside_restarts": not outside,
                "every_attack_refused_outside_restarts": wrong_outside == 0,
                "shm_clean_at_end": shm["regions_after_stop"] == 0,
                "server_up_at_end": shm["ready_at_end"]},
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
    attack = result.get("attack")
    if attack:  # shade the restart windows: failures inside them are the crash's, outside they are lost requests
        for a, b in attack["restart_windows"]:
            for axis in ax:
                axis.axvspan(a, b, color="orange", alpha=0.15, lw=0)
        fig.suptitle(f"attack soak: {s['rate']} req/s for {s['duration']:.0f} s, {100 * s['attack_fraction']:.0f} % "
                     f"attacks, {attack['restarts']} restarts (shaded)\n{attack['good_failed']} good requests failed, "
                     f"{attack['good_failed_outside_restart_windows']} outside restart windows")
    else:
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
    p.add_argument("--attack-fraction", type=float, default=0.0,
                   help="share of requests that are attacks (default 0: the plain soak)")
    p.add_argument("--crash-every", type=float, default=150.0,
                   help="with attacks: send the one-request crash at most once per this many seconds (0: never)")
    p.add_argument("--out", type=Path, default=None,
                   help="default bench/results/soak.json, or soak_attack.json with --attack-fraction")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(args.window, round(0.15 * args.duration / args.window) * args.window)
    if args.duration < 2 * args.window or args.warmup >= args.duration:
        p.error("--duration must cover at least two windows and outlast --warmup")

    import torch

    from mildnet.serving.client import TritonEmbedder
    from mildnet.serving.server import TritonServer, supervise

    torch.set_num_threads(1)
    photos = load_photos(args.photos)
    attack_run = args.attack_fraction > 0
    if args.out is None:
        args.out = RESULTS / ("soak_attack.json" if attack_run else "soak.json")
    events: list[dict] = []
    shm: dict = {"dev_shm_files_before": len(os.listdir("/dev/shm"))}
    with tempfile.TemporaryDirectory(prefix="mildnet-soak-") as tmp:
        repo = prepare_repository(Path(tmp), args.variant, args.input_size, args.seed)
        server = TritonServer(repo, model_control_mode="none", log_file=Path(tmp) / "tritonserver.log")
        stop = threading.Event()
        with server:
            url = server.http_url if args.protocol == "http" else server.grpc_url
            with TritonEmbedder(url, protocol=args.protocol, concurrency=args.concurrency) as remote:
                build_index(remote, photos, contract.default_index_path(repo))
                refs = remote.embed(photos)  # also the warm-up of both pipelines
                remote.similar(photos[0], k=args.k)
                shm["regions_at_start"], shm["region_bytes_at_start"] = shm_regions(server.shm_prefix)
                t_start = time.perf_counter()

                def on_event(e):
                    events.append({"t": round(time.perf_counter() - t_start, 2), "kind": e.kind,
                                   "message": e.message.splitlines()[0], "downtime_s": e.downtime_s})
                    print(f"[supervisor] {e.message.splitlines()[0]}", flush=True)

                watcher = threading.Thread(target=supervise, args=(server, stop),
                                           kwargs=dict(on_event=on_event, timeout=300.0), daemon=True)
                watcher.start()
                print(f"server up ({server.http_url}); {args.rate} req/s for {args.duration:.0f} s"
                      + (f", {100 * args.attack_fraction:.0f} % attacks" if attack_run else "") + " ...", flush=True)
                attacks = make_attacks(photos[0], args.input_size) if attack_run else None
                rec, memory, crashes = run_load(remote, server, photos, refs, args, attacks)
                if attack_run:  # a crash near the end: let the supervisor bring it back before judging
                    deadline = time.monotonic() + 300
                    while not server.is_ready() and time.monotonic() < deadline:
                        time.sleep(1)
                shm["ready_at_end"] = server.is_ready()
                shm["regions_at_end"], shm["region_bytes_at_end"] = shm_regions(server.shm_prefix)
                stop.set()
                watcher.join(60)
            log_tail = server.log_tail(10)
        shm["regions_after_stop"], _ = shm_regions(server.shm_prefix)
    shm["dev_shm_files_after"] = len(os.listdir("/dev/shm"))  # the whole machine's: other servers too
    summary = summarise(rec, memory, args)
    result = {
        "benchmark": "soak_attack" if attack_run else "soak",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg": os.getloadavg()},
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "summary": summary,
        "server_log_tail": log_tail if summary["failures"] else "",
    }
    if attack_run:
        result["attack"] = summarise_attacks(rec, crashes, events, shm, args)
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
    if attack_run:
        a = result["attack"]
        print(f"attacks: {a['attacks']} sent, {a['attacks'] - a['attacks_not_refused']} refused as they should be "
              f"({a['attacks_not_refused_outside_restart_windows']} not, outside restart windows); "
              f"{a['crash_requests']} crash requests, {a['restarts']} restarts, recovery {a['recovery_s']} s; "
              f"good requests {a['good_served']}/{a['good_requests']} served, "
              f"{a['good_failed_outside_restart_windows']} lost outside restart windows; /dev/shm regions "
              f"{shm['regions_at_start']} at start, {shm['regions_at_end']} at the end, "
              f"{shm['regions_after_stop']} after stop")
        for kind, d in sorted(a["by_attack"].items()):
            print(f"  {kind:32s} {d['refused']}/{d['sent']} refused" + (f"  {d['problems']}" if d["problems"] else ""))
        print(f"wrote {args.out}")
        return 0 if all(a["met"].values()) else 1
    return 0 if all(summary["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
