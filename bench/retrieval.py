#!/usr/bin/env python
"""The shipped catalogue index (``mildnet.index.create_index(kind=...)``, what ``similar`` and ``client/index.py``
use): build time, size, queries/s and recall@10 of each kind against the exact search of the same run.

    python bench/retrieval.py --sizes 20000 --queries 500          # a quick look (~1 min)
    python bench/retrieval.py --sizes 100000,1000000 --dims 512     # the README's rows (quiet machine only)
    python bench/retrieval.py --sizes 100000 --dims 1024 --milvus   # plus a real Milvus server beside FAISS

Kinds (``--kinds``): ``flat`` (always: it is the ground truth and the baseline), ``hnsw`` (``--ef-search`` swept
at query time), ``ivfpq`` (``--nprobe`` x ``--rerank-factor`` swept at query time) and ``auto`` (the shipped
default: whatever it builds at that size, with the shipped settings). Each is built by one ``add`` of all items.

Timing rule, the same for every row including flat: one untimed warm-up call, then the best of ``--repeats``
calls of ``Index.search`` with all ``--queries`` queries in one batch (Hit objects included: that is what a
caller gets), FAISS limited to ``--threads`` threads. ``latency_ms``: one query per call, after one warm-up call,
mean of ``--latency-queries`` calls. ``index_mb``: the process's resident-memory growth over the build (what
the built index holds: vectors, FAISS structures, ids). Every "x flat" divides by the flat queries/s of the same size and dimension
measured in this run. Recall@10 = |top-10 ∩ exact top-10| / 10, averaged over the queries.

Load: the 1-minute load average is recorded before and after (and before each size). A run that starts above
``--max-load`` (1.5) is refused: on a busy machine the ratios measure the neighbours. ``--force`` runs anyway and
marks the JSON ``"noisy": true``.

Data: synthetic but shaped like real image embeddings, which are clustered and have a low intrinsic
dimension: a Gaussian mixture (``--clusters`` centres, noise ``--spread``) in a ``--latent-dim``-d space,
mapped linearly into the full dimension, plus a little isotropic noise, normalised onto the unit sphere;
queries are fresh draws from the same distribution. (Plain random Gaussian vectors have no neighbourhood
structure, so every ANN index looks unrealistically bad on them.) Not real embeddings: treat the recall
numbers as indicative and re-check on your catalogue.

``--milvus`` also measures a Milvus 2.3.5 standalone server (started here on 127.0.0.1 in a temp folder by
``mildnet.index.milvus_server``, or ``--milvus-uri``) on the same vectors and queries, through the shipped
``mildnet.index`` Milvus backend: its HNSW and IVF_FLAT indexes (rows ``milvus-hnsw``, ``milvus-ivfflat``).
Build time = insert + flush + index build until every row is indexed; memory = the server's resident set after
loading (the whole server, not only the index); the server uses the machine's cores as it likes.

Writes bench/results/retrieval.json (atomically; a partial file after each size) and prints a table.
Target: the shipped ``auto`` reaches recall@10 >= 0.95 at >= 50x the exact search's queries/s at 1M vectors.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
from mildnet.fileio import atomic_write_text  # noqa: E402
from mildnet.index import create_index  # noqa: E402
from mildnet.index.faiss_index import DEFAULT_PARAMS  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "retrieval.json"
TARGET_RECALL, TARGET_SPEEDUP = 0.95, 50.0
KINDS = ("flat", "hnsw", "ivfpq", "auto")
K = 10


def clustered_unit_vectors(n: int, dim: int, args, rng: np.random.Generator,
                           model: tuple[np.ndarray, np.ndarray] | None = None):
    """``float32[n, dim]`` unit vectors with the structure of image embeddings (see module docstring).

    A Gaussian mixture (``args.clusters`` centres, noise of norm ``args.spread``) in a ``args.latent_dim``-d
    latent space, mapped to ``dim`` by a fixed random linear map, plus small isotropic noise
    (``args.ambient_noise``), normalised onto the unit sphere. Returns (vectors, model) where ``model`` =
    (centres, map) lets queries come from the same distribution.
    """
    if model is None:
        centres = rng.standard_normal((args.clusters, args.latent_dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        proj = (rng.standard_normal((args.latent_dim, dim)) / np.sqrt(args.latent_dim)).astype(np.float32)
        model = (centres, proj)
    centres, proj = model
    out = np.empty((n, dim), np.float32)
    step = 100_000  # chunks keep the temporaries small
    for s in range(0, n, step):
        m = min(step, n - s)
        z = centres[rng.integers(0, len(centres), m)]
        z = z + rng.standard_normal((m, args.latent_dim), dtype=np.float32) * (args.spread / np.sqrt(args.latent_dim))
        x = z @ proj + rng.standard_normal((m, dim), dtype=np.float32) * (args.ambient_noise / np.sqrt(dim))
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, model


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def labels_of(hits: list[list], k: int) -> np.ndarray:
    """Hit lists -> int labels[Q, k] (ids are str(row)); -1 where fewer than k came back."""
    return np.array([[int(h.id) for h in row] + [-1] * (k - len(row)) for row in hits], dtype=np.int64)


def timed_search(index, queries: np.ndarray, k: int, repeats: int) -> tuple[float, np.ndarray]:
    """(queries/s of the best of ``repeats`` batched calls after one untimed warm-up call, labels[Q, k])."""
    hits = index.search(queries, k)  # warm-up: first-touch page faults, lazily built caches, thread pool start
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        hits = index.search(queries, k)
        best = min(best, time.perf_counter() - t)
    return len(queries) / best, labels_of(hits, k)


def latency_ms(index, queries: np.ndarray, k: int, n: int) -> float:
    """Mean ms of one single-query call (what one ``similar`` request pays), after one warm-up call."""
    index.search(queries[:1], k)
    n = min(n, len(queries))
    t = time.perf_counter()
    for i in range(n):
        index.search(queries[i:i + 1], k)
    return (time.perf_counter() - t) / n * 1000


def recall_at(labels: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(labels, truth)]))


def resident_mb() -> float:
    """This process's resident memory now (not the peak: large freed buffers go back to the OS)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def shipped(name: str, value) -> bool:
    return DEFAULT_PARAMS.get(name) == value


def bench_one(n: int, dim: int, args, rng) -> list[dict]:
    """Every requested kind at one (n, dim), against the flat search measured here."""
    rows: list[dict] = []
    t = time.perf_counter()
    base, model = clustered_unit_vectors(n, dim, args, rng)
    queries, _ = clustered_unit_vectors(args.queries, dim, args, rng, model)
    ids = [str(i) for i in range(n)]
    load = load_1m()
    print(f"\n[{n} x {dim}] data {time.perf_counter() - t:.1f} s, load average {load}", flush=True)

    def build(kind: str, **params):
        """(index, build seconds, MB): the memory is what the built index holds (vectors, FAISS structures,
        ids), as resident-memory growth; serialising a 1M x 1024 index to size it would need gigabytes more."""
        gc.collect()
        before, t = resident_mb(), time.perf_counter()
        index = create_index(dim, kind=kind, model_version="bench", **params)
        index.add(ids, base)
        build_s = time.perf_counter() - t
        gc.collect()
        return index, build_s, round(resident_mb() - before, 1)

    def measure(name: str, index, params: dict, build_s: float, size_mb: float) -> dict:
        qps, labels = timed_search(index, queries, K, args.repeats)
        row = {"n": n, "dim": dim, "index": name, "built_kind": getattr(index, "built_kind", name),
               "params": params, "shipped_defaults": all(shipped(k, v) for k, v in params.items()),
               "build_s": round(build_s, 2), "index_mb": size_mb, "qps": round(qps, 1),
               "latency_ms": round(latency_ms(index, queries, K, args.latency_queries), 3),
               "recall@10": round(recall_at(labels, truth, K), 4) if truth is not None else 1.0,
               "flat_qps": round(flat_qps or qps, 1), "load_1m_before": load}
        row["speedup_vs_flat"] = round(qps / (flat_qps or qps), 1)
        rows.append(row)
        measure.labels = labels
        print(f"  {name:8s} {row['built_kind']:6s} {json.dumps(params):52s} build {build_s:7.1f} s "
              f"{size_mb:8.1f} MB {qps:9.1f} q/s ({row['speedup_vs_flat']:6.1f}x) {row['latency_ms']:7.3f} ms/q "
              f"recall@10 {row['recall@10']:.4f}", flush=True)
        return row

    # exact: the ground truth and the baseline, measured with the same rule as the others
    truth = flat_qps = None
    flat, build_s, size = build("flat")
    measure("flat", flat, {}, build_s, size)
    flat_qps, truth = rows[0]["qps"], measure.labels
    del flat

    if "hnsw" in args.kinds:
        index, build_s, size = build("hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
        for ef in args.ef_search:
            index.set_search_params(ef_search=ef)
            measure("hnsw", index, {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction,
                                    "ef_search": ef}, build_s, size)
        del index
    if "ivfpq" in args.kinds:
        index, build_s, size = build("ivfpq", pq_dims_per_byte=args.pq_dims_per_byte)
        for nprobe in args.nprobe:
            for factor in args.rerank_factor:
                index.set_search_params(nprobe=nprobe, rerank_factor=factor)
                measure("ivfpq", index, {"pq_dims_per_byte": args.pq_dims_per_byte, "nprobe": nprobe,
                                         "rerank_factor": factor}, build_s, size)
        del index
    if "auto" in args.kinds:  # the shipped default, shipped settings: what a user gets without choosing
        index, build_s, size = build("auto")
        measure("auto", index, {}, build_s, size)
        del index
    if args.milvus_uri:
        bench_milvus(base, ids, queries, measure, args)
    return rows


def server_rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process group (the Milvus forwarder + server), from /proc; None if unknown."""
    if pid is None:
        return None
    total = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == pid:
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return round(total / 1024, 1)


def bench_milvus(base: np.ndarray, ids: list[str], queries: np.ndarray, measure, args) -> None:
    """The Milvus server's HNSW and IVF_FLAT through mildnet.index (same data, queries and truth as FAISS)."""
    n, dim = base.shape
    nlist = max(64, int(np.sqrt(n)))
    configs = [("HNSW", {"M": args.hnsw_m, "efConstruction": args.ef_construction},
                [{"ef": ef} for ef in args.ef_search]),
               ("IVF_FLAT", {"nlist": nlist}, [{"nprobe": p} for p in args.nprobe])]
    for index_type, build_params, sweep in configs:
        name = f"bench_{index_type.lower()}_{n}_{dim}"
        index = create_index(dim, backend="milvus", uri=args.milvus_uri, collection=name, model_version="bench",
                             index_type=index_type, build_params=build_params, timeout=600,
                             consistency=args.milvus_consistency)
        try:
            t = time.perf_counter()
            index.add(ids, base)
            index._c.flush(name)
            deadline = time.monotonic() + args.milvus_build_timeout
            while True:  # the server builds the index in the background: wait until every row is in it
                info = index._c.describe_index(name, index_name="vector")
                if int(info.get("indexed_rows", 0)) >= n and int(info.get("pending_index_rows", 0)) == 0:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Milvus indexed {info.get('indexed_rows', 0)} of {n} rows of {name} in "
                                       f"{args.milvus_build_timeout:.0f} s (--milvus-build-timeout)")
                time.sleep(1)
            index._c.release_collection(name)
            index._c.load_collection(name)  # serve the sealed, indexed segments
            build = time.perf_counter() - t
            rss = server_rss_mb(args.milvus_pid) or 0.0
            for params in sweep:
                index.search_params = params
                row = measure(f"milvus-{index_type.lower().replace('_', '')}", index,
                              {**build_params, **params, "consistency": args.milvus_consistency}, build, rss)
                row["index_mb_is"] = "resident memory of the whole Milvus server (index not measurable alone)"
                row["shipped_defaults"] = False
        finally:
            index.drop()
            index.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--sizes", type=ints, default=[100_000, 1_000_000])
    p.add_argument("--dims", type=ints, default=[512], help="e.g. 512,1024 (1024 = mildnet_mobile)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2, help="FAISS threads for every kind")
    p.add_argument("--repeats", type=int, default=7, help="timed batched calls per row (best kept: this machine has slow spells of a second or so), after a warm-up")
    p.add_argument("--latency-queries", type=int, default=100, help="single-query calls per row")
    p.add_argument("--kinds", type=lambda x: [k for k in x.split(",") if k], default=list(KINDS[1:]),
                   help=f"kinds besides flat (always measured: the truth and the baseline), of {','.join(KINDS)}")
    p.add_argument("--clusters", type=int, default=1000, help="mixture components (product groups)")
    p.add_argument("--spread", type=float, default=1.0, help="latent noise norm around a cluster centre")
    p.add_argument("--latent-dim", type=int, default=48, help="intrinsic dimension of the data")
    p.add_argument("--ambient-noise", type=float, default=0.1, help="isotropic noise norm in the full space")
    p.add_argument("--hnsw-m", type=int, default=DEFAULT_PARAMS["hnsw_m"])
    p.add_argument("--ef-construction", type=int, default=DEFAULT_PARAMS["ef_construction"])
    p.add_argument("--ef-search", type=ints, default=[32, 64, 128], help="HNSW (swept at query time)")
    p.add_argument("--pq-dims-per-byte", type=int, default=DEFAULT_PARAMS["pq_dims_per_byte"], help="IVF-PQ code size")
    p.add_argument("--nprobe", type=ints, default=[DEFAULT_PARAMS["nprobe"], 2 * DEFAULT_PARAMS["nprobe"]],
                   help="IVF lists probed (swept at query time; default: the shipped value and twice it)")
    p.add_argument("--rerank-factor", type=ints, default=[DEFAULT_PARAMS["rerank_factor"]],
                   help="IVF-PQ shortlist = k * this, re-ranked exactly (swept at query time)")
    p.add_argument("--max-load", type=float, default=1.5, help="refuse to start above this 1-minute load average")
    p.add_argument("--force", action="store_true", help="run above --max-load anyway; the JSON says noisy")
    p.add_argument("--milvus", action="store_true", help="also measure a Milvus server started here (see above)")
    p.add_argument("--milvus-uri", default="", help="measure this running Milvus server instead of starting one")
    p.add_argument("--milvus-consistency", default="Session", help="read consistency of the Milvus searches "
                   "(mildnet's default Session; Strong waits for the server's time tick, ~0.5 s a call)")
    p.add_argument("--milvus-build-timeout", type=float, default=3 * 3600,
                   help="seconds to wait for the server to index every row before giving up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown kind(s) {sorted(unknown)}: choose from {', '.join(KINDS)}")
    args.load_before = [round(x, 2) for x in os.getloadavg()]
    args.noisy = args.load_before[0] > args.max_load
    if args.noisy and not args.force:
        print(f"refusing to run: the 1-minute load average is {args.load_before[0]} (> --max-load "
              f"{args.max_load}); queries/s would measure the other processes. Wait for a quiet machine "
              "(`uptime`), or pass --force to write a result marked noisy.", file=sys.stderr)
        return 2
    faiss.omp_set_num_threads(args.threads)
    args.milvus_pid = None
    if args.milvus and not args.milvus_uri:
        import tempfile

        from mildnet.index.milvus_server import MilvusServer

        server = MilvusServer(Path(tempfile.mkdtemp(prefix="mildnet-bench-milvus-")), remove_data=True).start()
        args.milvus_uri, args.milvus_pid = server.uri, server.pid
        try:
            return run(args)
        finally:
            server.stop()
    return run(args)


def run(args) -> int:
    rng = np.random.default_rng(args.seed)
    started = time.time()
    rows: list[dict] = []
    for dim in args.dims:
        for n in args.sizes:
            rows += bench_one(n, dim, args, rng)
            write_result(args, rows, started, done=False)  # a partial file survives an interrupted run
    result = write_result(args, rows, started, done=True)

    print(f"\n{'n':>8} {'dim':>5} {'index':9} {'built':6} {'params':52} {'build s':>8} {'MB':>8} {'q/s':>9} "
          f"{'x flat':>7} {'ms/q':>7} {'R@10':>6}")
    for r in rows:
        print(f"{r['n']:8d} {r['dim']:5d} {r['index']:9} {r['built_kind']:6} {json.dumps(r['params']):52} "
              f"{r['build_s']:8.1f} {r['index_mb']:8.1f} {r['qps']:9.1f} {r['speedup_vs_flat']:7.1f} "
              f"{r['latency_ms']:7.3f} {r['recall@10']:6.3f}")
    for v in result["verdicts"]:
        auto = v["auto"]
        auto_desc = (f"auto built {auto['built_kind']}: recall@10 {auto['recall@10']}, {auto['speedup_vs_flat']}x "
                     f"-> {'MET' if v['auto_target_met'] else 'MISSED'}") if auto else "auto not measured"
        b = v["best"]
        best_desc = f"best {b['index']} {json.dumps(b['params'])}: recall@10 {b['recall@10']}, " \
                    f"{b['speedup_vs_flat']}x" if b else "no ANN row reached the recall target"
        print(f"target at {v['n']} x {v['dim']}: {auto_desc}; {best_desc}")
    print(f"load average before {result['load_average']['before']}, after {result['load_average']['after']}"
          f"{' (NOISY: started above --max-load)' if result['noisy'] else ''}")
    print(f"wrote {result_path(args.out)} ({result['wall_s']} s)")
    return 0


def result_path(path: Path) -> str:
    """``path`` relative to the checkout when inside it (settings never record this machine's folders)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def milvus_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"milvus {version('milvus')} (standalone wheel), pymilvus {version('pymilvus')}"
    except PackageNotFoundError:
        return "unknown"


def write_result(args, rows: list[dict], started: float, done: bool) -> dict:
    """Verdicts (largest size measured, per dim) + settings + machine -> JSON, written atomically."""
    verdicts = []
    for dim in args.dims:
        sizes = [r["n"] for r in rows if r["dim"] == dim]
        if not sizes:
            continue
        n = max(sizes)
        ann = [r for r in rows if r["n"] == n and r["dim"] == dim and r["index"] != "flat"]
        met = lambda r: r["recall@10"] >= TARGET_RECALL and r["speedup_vs_flat"] >= TARGET_SPEEDUP  # noqa: E731
        best = max((r for r in ann if met(r)), key=lambda r: r["qps"], default=None)
        close = max((r for r in ann if r["recall@10"] >= TARGET_RECALL), key=lambda r: r["qps"], default=None)
        auto = next((r for r in ann if r["index"] == "auto"), None)
        verdicts.append({"n": n, "dim": dim, "auto": auto, "auto_target_met": bool(auto and met(auto)),
                         "target_met": best is not None, "best": best or close})
    settings = {k: (result_path(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("milvus_pid", "milvus_uri", "load_before", "noisy")}
    result = {
        "benchmark": "retrieval", "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": done, "measures": "mildnet.index.create_index(kind=...) (the shipped code)",
        "timing": f"warm-up call, then best of {args.repeats} batched calls of {args.queries} queries; "
                  f"{args.threads} FAISS threads for every kind; x flat = the flat row of the same n and dim",
        "settings": settings,
        "load_average": {"before": args.load_before, "after": [round(x, 2) for x in os.getloadavg()],
                         "max_load": args.max_load},
        "noisy": args.noisy,
        "data": "synthetic: latent Gaussian mixture (low intrinsic dim) mapped to dim + isotropic noise, "
                "unit-normalised; queries from the same distribution",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "faiss": faiss.__version__, "numpy": np.__version__, "threads": args.threads,
                    "peak_rss_mb": round(rss_mb(), 1),
                    **({"milvus_server": milvus_version()} if args.milvus or args.milvus_uri else {})},
        "shipped_defaults": DEFAULT_PARAMS,
        "target": {"recall@10": TARGET_RECALL, "speedup_vs_flat": TARGET_SPEEDUP}, "verdicts": verdicts,
        "rows": rows, "wall_s": round(time.time() - started, 1),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main())
