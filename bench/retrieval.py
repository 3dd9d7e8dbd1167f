#!/usr/bin/env python
"""FAISS Flat vs HNSW vs IVF-Flat vs IVF-PQ: build time, memory, queries/s (2 threads) and recall@10 against exact search.

    python bench/retrieval.py                        # 100k and 1M vectors, 512-d (~10 min on 2 cores)
    python bench/retrieval.py --dims 512,1024        # plus mildnet_mobile's 1024-d (1M x 1024 = 4 GB)
    python bench/retrieval.py --sizes 20000 --queries 500   # a quick look
    python bench/retrieval.py --sizes 100000 --dims 1024 --milvus   # plus a real Milvus server beside FAISS

Data: synthetic but shaped like real image embeddings, which are clustered and have a low intrinsic
dimension: a Gaussian mixture (``--clusters`` centres, noise ``--spread``) in a ``--latent-dim``-d space,
mapped linearly into the full dimension, plus a little isotropic noise, normalised onto the unit sphere;
queries are fresh draws from the same distribution. (Plain random Gaussian vectors have no neighbourhood
structure, so every ANN index looks unrealistically bad on them.) Not real embeddings: treat the recall
numbers as indicative and re-check on your catalogue. Recall@10 = |ANN top-10 ∩ exact top-10| / 10, averaged.

Queries/s: all ``--queries`` queries in one batched call with ``--threads`` FAISS threads, best of 2 runs;
``latency_ms`` is one query at a time (what one ``similar`` request pays). Writes bench/results/retrieval.json
and prints a table. Target: some index with recall@10 >= 0.95 at >= 50x exact queries/s at 1M vectors.

``--milvus`` also measures a Milvus 2.3.5 standalone server (started here on 127.0.0.1 in a temp folder by
``mildnet.index.milvus_server``, or ``--milvus-uri``) on the same vectors and queries, through the shipped
``mildnet.index`` Milvus backend: its HNSW and IVF_FLAT indexes (rows ``milvus-hnsw``, ``milvus-ivfflat``).
Build time = insert + flush + index build until every row is indexed; memory = the server's resident set after
loading (the whole server, not only the index); queries/s = the same batched call, best of 2, over gRPC on
loopback; the server uses the machine's cores as it likes (FAISS: ``--threads``).
"""
from __future__ import annotations

import argparse
import datetime as dt
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
RESULTS = ROOT / "bench" / "results" / "retrieval.json"
TARGET_RECALL, TARGET_SPEEDUP = 0.95, 50.0


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


def index_bytes(index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def timed_search(index, queries: np.ndarray, k: int, repeats: int = 2) -> tuple[float, np.ndarray]:
    """(queries/s of the best run, labels[Q, k])."""
    best, labels = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        _, labels = index.search(queries, k)
        best = min(best, time.perf_counter() - t)
    return len(queries) / best, labels


def latency_ms(index, queries: np.ndarray, k: int, n: int = 100) -> float:
    t = time.perf_counter()
    for q in queries[:n]:
        index.search(q[None], k)
    return (time.perf_counter() - t) / min(n, len(queries)) * 1000


def recall_at(labels: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(labels, truth)]))


def bench_one(n: int, dim: int, args, rng) -> list[dict]:
    rows: list[dict] = []
    t = time.perf_counter()
    base, model = clustered_unit_vectors(n, dim, args, rng)
    queries, _ = clustered_unit_vectors(args.queries, dim, args, rng, model)
    print(f"\n[{n} x {dim}] data {time.perf_counter() - t:.1f} s", flush=True)
    k = 10

    def record(name: str, params: dict, build_s: float, size: int, qps: float, labels, lat: float) -> dict:
        row = {"n": n, "dim": dim, "index": name, "params": params, "build_s": round(build_s, 2),
               "index_mb": round(size / 2**20, 1), "qps": round(qps, 1), "latency_ms": round(lat, 3),
               "recall@10": round(recall_at(labels, truth, k), 4)}
        row["speedup_vs_flat"] = round(qps / flat_qps, 1)
        rows.append(row)
        print(f"  {name:8s} {json.dumps(params):48s} build {build_s:7.1f} s  {size / 2**20:8.1f} MB  "
              f"{qps:9.1f} q/s ({row['speedup_vs_flat']:6.1f}x)  {lat:7.3f} ms/q  recall@10 {row['recall@10']:.4f}",
              flush=True)
        return row

    # exact: the ground truth and the baseline
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(base)
    build = time.perf_counter() - t
    flat_qps, truth = timed_search(flat, queries, k, repeats=1)
    flat_lat = latency_ms(flat, queries, k, n=20)
    record("flat", {}, build, n * dim * 4, flat_qps, truth, flat_lat)
    del flat

    # HNSW: one build, efSearch swept at query time
    if "hnsw" in args.indexes:
        bench_hnsw(base, queries, truth, record, args)
    if "ivfflat" in args.indexes or "ivfpq" in args.indexes:
        bench_ivf(base, queries, record, args, rng)
    if args.milvus_uri:
        bench_milvus(base, queries, record, args)
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


def bench_milvus(base: np.ndarray, queries: np.ndarray, record, args) -> None:
    """The Milvus server's HNSW and IVF_FLAT through mildnet.index (same data, queries and truth as FAISS)."""
    from mildnet.index import create_index

    n, dim, k = base.shape[0], base.shape[1], 10
    nlist = args.nlist or max(64, int(np.sqrt(n)))
    configs = [("HNSW", {"M": args.hnsw_m, "efConstruction": args.ef_construction},
                [{"ef": ef} for ef in args.ef_search]),
               ("IVF_FLAT", {"nlist": nlist}, [{"nprobe": p} for p in args.nprobe])]
    ids = [str(i) for i in range(n)]
    for index_type, build_params, sweep in configs:
        name = f"bench_{index_type.lower()}_{n}_{dim}"
        index = create_index(dim, backend="milvus", uri=args.milvus_uri, collection=name, model_version="bench",
                             index_type=index_type, build_params=build_params, timeout=600,
                             consistency=args.milvus_consistency)
        try:
            t = time.perf_counter()
            index.add(ids, base)
            index._c.flush(name)
            while True:  # the server builds the index in the background: wait until every row is in it
                info = index._c.describe_index(name, index_name="vector")
                if int(info.get("indexed_rows", 0)) >= n and int(info.get("pending_index_rows", 0)) == 0:
                    break
                time.sleep(1)
            index._c.release_collection(name)
            index._c.load_collection(name)  # serve the sealed, indexed segments
            build = time.perf_counter() - t
            rss = server_rss_mb(args.milvus_pid) or 0.0
            for params in sweep:
                index.search_params = params

                class _Labels:  # the FAISS-shaped adapter timed_search and latency_ms expect
                    @staticmethod
                    def search(q, kk):
                        hits = index.search(q, kk)
                        return None, np.array([[int(h.id) for h in row] + [-1] * (kk - len(row)) for row in hits])

                qps, labels = timed_search(_Labels, queries, k)
                row = record(f"milvus-{index_type.lower().replace('_', '')}",
                             {**build_params, **params, "consistency": args.milvus_consistency}, build,
                             int(rss * 2**20), qps, labels, latency_ms(_Labels, queries, k))
                row["index_mb_is"] = "resident memory of the whole Milvus server (index not measurable alone)"
        finally:
            index.drop()
            index.close()


def bench_hnsw(base: np.ndarray, queries: np.ndarray, truth: np.ndarray, record, args) -> None:
    n, dim, k = base.shape[0], base.shape[1], 10
    t = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = args.ef_construction
    hnsw.add(base)
    build = time.perf_counter() - t
    size = index_bytes(hnsw)
    for ef in args.ef_search:
        hnsw.hnsw.efSearch = ef
        qps, labels = timed_search(hnsw, queries, k)
        record("hnsw", {"M": args.hnsw_m, "efConstruction": args.ef_construction, "efSearch": ef}, build, size,
               qps, labels, latency_ms(hnsw, queries, k))
    del hnsw


def bench_ivf(base: np.ndarray, queries: np.ndarray, record, args, rng) -> None:
    n, dim, k = base.shape[0], base.shape[1], 10
    # IVF: one coarse quantizer (k-means, trained once) shared by IVF-Flat and IVF-PQ
    nlist = args.nlist or max(64, int(np.sqrt(n)))
    t = time.perf_counter()
    train = base[rng.choice(n, min(n, max(30 * nlist, 30_000)), replace=False)]
    kmeans = faiss.Kmeans(dim, nlist, niter=10, spherical=True, seed=args.seed)
    kmeans.train(train)
    train_s = time.perf_counter() - t

    t = time.perf_counter()
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(kmeans.centroids)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.is_trained = True
    ivf.add(base)
    build = train_s + time.perf_counter() - t
    size = index_bytes(ivf)
    for nprobe in (args.nprobe if "ivfflat" in args.indexes else []):
        ivf.nprobe = nprobe
        qps, labels = timed_search(ivf, queries, k)
        record("ivfflat", {"nlist": nlist, "nprobe": nprobe}, build, size, qps, labels, latency_ms(ivf, queries, k))
    del ivf
    if "ivfpq" not in args.indexes:
        return

    # IVF-PQ: 8-bit codes of dim/pq_dims_per_code bytes; "+rf" re-ranks a k*k_factor shortlist exactly
    m = dim // args.pq_dims_per_code
    t = time.perf_counter()
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(kmeans.centroids)
    ivfpq = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    ivfpq.train(train[: min(len(train), 256 * 40)])  # coarse quantizer already trained: PQ only
    refine = faiss.IndexRefineFlat(ivfpq)
    refine.add(base)
    build = train_s + time.perf_counter() - t
    pq_size = index_bytes(ivfpq)
    for nprobe in args.nprobe_pq:
        ivfpq.nprobe = nprobe
        qps, labels = timed_search(ivfpq, queries, k)
        record("ivfpq", {"nlist": nlist, "m": m, "nbits": 8, "nprobe": nprobe}, build, pq_size, qps, labels,
               latency_ms(ivfpq, queries, k))
        for k_factor in args.k_factor:
            refine.k_factor = k_factor
            qps, labels = timed_search(refine, queries, k)
            record("ivfpq+rf", {"nlist": nlist, "m": m, "nprobe": nprobe, "k_factor": k_factor}, build,
                   pq_size + n * dim * 4, qps, labels, latency_ms(refine, queries, k))
    del refine, ivfpq


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--sizes", type=ints, default=[100_000, 1_000_000])
    p.add_argument("--dims", type=ints, default=[512], help="e.g. 512,1024 (1024 = mildnet_mobile)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clusters", type=int, default=1000, help="mixture components (product groups)")
    p.add_argument("--spread", type=float, default=1.0, help="latent noise norm around a cluster centre")
    p.add_argument("--latent-dim", type=int, default=48, help="intrinsic dimension of the data")
    p.add_argument("--ambient-noise", type=float, default=0.1, help="isotropic noise norm in the full space")
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=ints, default=[16, 32, 64, 128])
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (default sqrt(n))")
    p.add_argument("--nprobe", type=ints, default=[4, 8, 16, 32], help="IVF-Flat probes (swept)")
    p.add_argument("--nprobe-pq", type=ints, default=[16, 64], help="IVF-PQ probes (swept)")
    p.add_argument("--pq-dims-per-code", type=int, default=16, help="PQ: dim / this = bytes per vector")
    p.add_argument("--k-factor", type=ints, default=[10], help="IVF-PQ re-ranking shortlist = k * this (swept)")
    p.add_argument("--indexes", type=lambda x: x.split(","), default=["hnsw", "ivfflat", "ivfpq"],
                   help="which ANN indexes to measure (flat always runs: it is the ground truth)")
    p.add_argument("--milvus", action="store_true", help="also measure a Milvus server started here (see above)")
    p.add_argument("--milvus-uri", default="", help="measure this running Milvus server instead of starting one")
    p.add_argument("--milvus-consistency", default="Session", help="read consistency of the Milvus searches "
                   "(mildnet's default Session; Strong waits for the server's time tick, ~0.5 s a call)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
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
    args.load_average_at_start = round(os.getloadavg()[0], 2)
    rows: list[dict] = []
    for dim in args.dims:
        for n in args.sizes:
            rows += bench_one(n, dim, args, rng)
            write_result(args, rows, started, done=False)  # a partial file survives an interrupted run
    result = write_result(args, rows, started, done=True)

    print(f"\n{'n':>8} {'dim':>5} {'index':9} {'params':52} {'build s':>8} {'MB':>8} {'q/s':>9} {'x flat':>7} "
          f"{'ms/q':>7} {'R@10':>6}")
    for r in rows:
        print(f"{r['n']:8d} {r['dim']:5d} {r['index']:9} {json.dumps(r['params']):52} {r['build_s']:8.1f} "
              f"{r['index_mb']:8.1f} {r['qps']:9.1f} {r['speedup_vs_flat']:7.1f} {r['latency_ms']:7.3f} "
              f"{r['recall@10']:6.3f}")
    for v in result["verdicts"]:
        b = v["best"]
        desc = f"{b['index']} {json.dumps(b['params'])}: recall@10 {b['recall@10']}, {b['speedup_vs_flat']}x" if b \
            else "none reached the recall target"
        print(f"target at {v['n']} x {v['dim']}: {'MET' if v['target_met'] else 'MISSED'} ({desc})")
    print(f"wrote {args.out} ({result['wall_s']} s)")
    return 0


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
        ok = [r for r in rows if r["n"] == n and r["dim"] == dim and r["index"] != "flat"
              and r["recall@10"] >= TARGET_RECALL and r["speedup_vs_flat"] >= TARGET_SPEEDUP]
        best = max(ok, key=lambda r: r["qps"], default=None)
        close = max((r for r in rows if r["n"] == n and r["dim"] == dim and r["recall@10"] >= TARGET_RECALL
                     and r["index"] != "flat"), key=lambda r: r["qps"], default=None)
        verdicts.append({"n": n, "dim": dim, "target_met": best is not None, "best": best or close})
    result = {
        "benchmark": "retrieval", "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": done,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("milvus_pid", "milvus_uri")},
        "data": "synthetic: latent Gaussian mixture (low intrinsic dim) mapped to dim + isotropic noise, "
                "unit-normalised; queries from the same distribution",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "faiss": faiss.__version__, "numpy": np.__version__, "threads": args.threads,
                    "peak_rss_mb": round(rss_mb(), 1), "load_average_1m": round(os.getloadavg()[0], 2),
                    **({"milvus_server": milvus_version()} if args.milvus or args.milvus_uri else {})},
        "target": {"recall@10": TARGET_RECALL, "speedup_vs_flat": TARGET_SPEEDUP}, "verdicts": verdicts,
        "rows": rows, "wall_s": round(time.time() - started, 1),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main())
