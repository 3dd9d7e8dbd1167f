"""Serving benchmark: in-process eager vs Triton (HTTP/gRPC, with/without dynamic batching) at several concurrencies.

    .venv/bin/python bench/serving.py                 # default: ~6 min on a 2-core machine
    .venv/bin/python bench/serving.py --models mobile,effnet,vgg16 --full --vgg16-size 224   # every point

Measured fairly (the default): the server and the load generator are pinned to separate cores (``--server-cpus``,
``--client-cpus``; on 2 cores one each), the in-process baseline runs on the server's cores with as many torch
threads as the server has, and the load generator's own CPU time is measured at every point (CPU ms per request
and how busy its cores were: a saturated load generator would understate the server). ``--unpinned`` measures
the old way (everything shares every core), labelled as such in the JSON.

For each model (untrained, seeded weights: speed does not depend on training) it measures
* in-process eager ``model(x)`` at batch sizes 1..32, keeping the best throughput;
* the fp32 matmul FLOP/s of this machine (same run, same thread count) and the model's FLOPs per image, giving
  the compute roof in images/s = FLOP/s / FLOPs-per-image;
* Triton's ``mildnet`` model (FP32 pixels, one image per request, so only the server can batch) with dynamic
  batching and a copy without it (``mildnet_nobatch``), over HTTP and gRPC, at concurrency 1, 4, 16, 32,
  with p50/p99 latency and the average batch the server formed (metrics endpoint).
MILDNet-VGG16 is ~10-30x slower than MILDNet-Mobile on 2 cores, so by default it runs at --vgg16-size 128 and
only the points the targets need (HTTP dyn c1/c16, HTTP no-batch c16, gRPC dyn c16); --full runs them all.

Writes bench/results/serving.json and bench/results/serving.png and prints a table. Targets (ratios, one run):
Triton dyn c16 >= 0.9x in-process best; dyn >= 1.5x no-batch at c16; VGG16 served >= 0.8x compute roof.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mildnet import models  # noqa: E402
from mildnet.export import export_model  # noqa: E402
from mildnet.serving import contract  # noqa: E402
from mildnet.serving.repository import ServingConfig  # noqa: E402
from mildnet.fileio import atomic_write_text  # noqa: E402
from mildnet.serving.client import model_metrics, time_per_request  # noqa: E402
from mildnet.serving.server import TritonServer, parse_cpus  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VARIANTS = {"mobile": "mildnet_mobile", "effnet": "mildnet_effnet_lite0", "vgg16": "mildnet_vgg16"}

# Triton model per batching mode. The default export sheds overload through a queue policy; Triton 2.51 then
# stalls ~0.5 s now and then (docs/serving.md), so the same model without the policy is measured too.
MODEL_OF_BATCHING = {"dynamic": contract.EMBEDDING_MODEL, "none": "mildnet_nobatch",
                     "dynamic, no queue policy": "mildnet_nopolicy"}


@contextmanager
def pinned(cpus: set[int] | None):
    """Run the calling thread, and the threads it starts inside the block, on ``cpus`` (Linux affinity is per
    thread: threads started before keep theirs); None leaves the affinity alone."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# -- in-process ----------------------------------------------------------------------------------------------------
def timed_loop(fn, window: float, min_iters: int = 2) -> tuple[int, float]:
    fn()  # warm-up (allocations, oneDNN primitives for this shape)
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < window:
        fn()
        n += 1
    return n, time.perf_counter() - start


def in_process(model, size: int, batch_sizes: list[int], window: float, passes: int = 2) -> list[dict]:
    """Best of ``passes`` sweeps over the batch sizes: a sweep disturbed by other work does not decide a ratio."""
    rows = {}
    for _ in range(passes):
        for b in batch_sizes:
            x = torch.randn(b, 3, size, size)

            def step():
                with torch.inference_mode():
                    model(x)

            n, secs = timed_loop(step, window / passes)
            row = {"batch": b, "img_per_s": n * b / secs, "latency_ms": secs / n * 1e3}
            if b not in rows or row["img_per_s"] > rows[b]["img_per_s"]:
                rows[b] = row
    for r in rows.values():
        print(f"  in-process batch {r['batch']:>2}: {r['img_per_s']:7.1f} img/s", flush=True)
    return list(rows.values())


def matmul_flops(window: float, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    iters, secs = timed_loop(lambda: torch.mm(a, b), window, min_iters=5)
    return 2 * n ** 3 * iters / secs


def model_flops(model, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())


# -- Triton load generator ----------------------------------------------------------------------------------------
def load_point(url: str, protocol: str, model: str, size: int, concurrency: int, window: float) -> dict:
    """``concurrency`` closed-loop clients (one tritonclient each) sending one image per request.

    The clock starts once every client has had a reply (steady state) and stops after ``window`` seconds AND at
    least 3 x concurrency replies (at most 4 x window): with multi-second latencies under load, a fixed short
    window would count whole waves of replies or none.
    """
    if protocol == "http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    clients = []
    for _ in range(concurrency):  # connect before the clock starts
        c = tc.InferenceServerClient(url)
        inp = tc.InferInput(contract.PIXELS, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        clients.append((c, inp))
    stop = threading.Event()
    lock = threading.Lock()
    first_reply = [False] * concurrency
    window_open: list[float] = []  # [start time] once set
    latencies: list[float] = []
    errors: list[str] = []

    def client(i: int):
        c, inp = clients[i]
        out = [tc.InferRequestedOutput(contract.EMBEDDING)]
        while not stop.is_set():
            start = time.perf_counter()
            try:
                c.infer(model, [inp], outputs=out)
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                errors.append(str(e)[:200])
                continue
            end = time.perf_counter()
            with lock:
                first_reply[i] = True
                if window_open and end >= window_open[0] and not stop.is_set():
                    latencies.append(end - start)
        c.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    deadline = time.perf_counter() + 120.0
    while not all(first_reply) and time.perf_counter() < deadline and len(errors) < 100:
        time.sleep(0.01)
    with lock:
        window_open.append(time.perf_counter())
        cpu_start = time.process_time()  # this process is the load generator: all its threads count
    while True:
        time.sleep(0.05)
        with lock:
            elapsed, done = time.perf_counter() - window_open[0], len(latencies)
            if (elapsed >= window and done >= 3 * concurrency) or elapsed >= 4 * window:
                stop.set()
                cpu = time.process_time() - cpu_start
                break
    for t in threads:
        t.join()
    lat = np.array(latencies) * 1e3
    return {"img_per_s": len(lat) / elapsed, "seconds": elapsed,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None, "requests": int(len(lat)),
            "errors": len(errors), "first_error": errors[0] if errors else None,
            # the load generator's own cost: CPU per reply, and the share of its cores it kept busy
            "client_cpu_ms_per_request": cpu / max(len(lat), 1) * 1e3,
            "client_cores_busy": cpu / elapsed / len(os.sched_getaffinity(0))}


def triton_points(name: str, model, size: int, args, points: list[tuple[str, str, int]]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"bench-serving-{name}-") as tmp:
        repo = Path(tmp) / "model_repository"
        export_model(model, repo, ServingConfig(max_batch_size=32, max_queue_delay_us=args.queue_delay_us),
                     pipeline=False)
        export_model(model, repo, ServingConfig(model_name="mildnet_nobatch", max_batch_size=32,
                                                dynamic_batching=False), pipeline=False)
        export_model(model, repo, ServingConfig(model_name="mildnet_nopolicy", max_batch_size=32,
                                                max_queue_delay_us=args.queue_delay_us, max_queue_size=0),
                     pipeline=False)
        with TritonServer(repo, model_control_mode="none", log_file=Path(tmp) / "triton.log",
                          extra_args=["--metrics-interval-ms=250", *args.server_arg],
                          cpus=args.server_cpus) as server, pinned(args.client_cpus):
            for protocol, batching, conc in points:
                model_name = MODEL_OF_BATCHING[batching]
                url = server.http_url if protocol == "http" else server.grpc_url
                time.sleep(0.6)
                before = model_metrics(server.metrics_url, model_name)
                row = load_point(url, protocol, model_name, size, conc, args.window)
                time.sleep(0.6)  # let the metrics refresh
                after = model_metrics(server.metrics_url, model_name)
                passes = after["exec_count"] - before["exec_count"]
                # where the requests' time went by Triton's own counters (queue, compute_infer, per request)
                row["server_ms"] = time_per_request(before, after)
                row.update(protocol=protocol, batching=batching, concurrency=conc,
                           avg_batch=(after["inference_count"] - before["inference_count"]) / passes
                           if passes else None)
                rows.append(row)
                print(f"  triton {protocol:4} {batching:7} c={conc:>2}: {row['img_per_s']:7.1f} img/s  "
                      f"p50 {row['p50_ms'] or float('nan'):7.1f} ms  p99 {row['p99_ms'] or float('nan'):7.1f} ms  "
                      f"avg batch {row['avg_batch'] or float('nan'):4.1f}  errors {row['errors']}  "
                      f"client busy {row['client_cores_busy']:.2f}", flush=True)
    return rows


# -- main ---------------------------------------------------------------------------------------------------------
def baseline(variant: str, size: int, batch_sizes: list[int], window: float, cpus: set[int] | None,
             threads: int) -> dict:
    """In-process eager speed, FLOPs and matmul roof, measured in a fresh interpreter started on ``cpus`` with
    ``threads`` torch threads: the server's cores and thread count. (Pinning this process instead would move only
    its calling thread; the OpenMP workers torch already started would keep every core.)"""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-only", variant, "--mobile-size", str(size),
           "--window", str(window), "--threads", str(threads), "--batch-sizes", ",".join(map(str, batch_sizes))]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    *progress, result = done.stdout.rstrip().splitlines()
    print("\n".join(progress), flush=True)
    return json.loads(result)


def baseline_main(args) -> int:
    torch.manual_seed(0)
    model = models.create(args.baseline_only, pretrained=False, input_size=args.mobile_size).eval()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    eager = in_process(model, args.mobile_size, batch_sizes, args.window)
    print(json.dumps({"in_process": eager, "flops": model_flops(model, args.mobile_size),
                      "matmul_flops": matmul_flops(2.0)}))
    return 0


def bench_model(key: str, size: int, args) -> dict:
    variant = VARIANTS[key]
    print(f"{variant} at {size}x{size}", flush=True)
    torch.manual_seed(0)
    model = models.create(variant, pretrained=False, input_size=size).eval()
    full = args.full or key != "vgg16"
    batch_sizes = [1, 2, 4, 8, 16, 32] if full else [1, 8, 16]
    first = baseline(variant, size, batch_sizes, args.window / 2, args.server_cpus, args.threads)
    eager, flops = first["in_process"], first["flops"]
    matmul_samples = [first["matmul_flops"]]
    conc = [1, 4, 16, 32]
    if full:
        points = [(p, b, c) for p in ("http", "grpc") for b in ("dynamic", "none") for c in conc]
    else:
        points = [("http", "dynamic", 1), ("http", "dynamic", 16), ("http", "none", 16), ("grpc", "dynamic", 16)]
    nopolicy = "dynamic, no queue policy"
    points += [("http", nopolicy, 1), ("http", nopolicy, 16), ("grpc", nopolicy, 16)]
    served = triton_points(key, model, size, args, points)
    # Again after the server: on a shared machine the rates move, so both sides get their best of two.
    second = baseline(variant, size, batch_sizes, args.window / 2, args.server_cpus, args.threads)
    eager = [max(a, b, key=lambda r: r["img_per_s"]) for a, b in zip(eager, second["in_process"])]
    matmul_samples.append(second["matmul_flops"])  # the roof is the best seen
    roof_flops = max(matmul_samples)
    best = max(eager, key=lambda r: r["img_per_s"])

    def at(protocol, batching, c):
        return next((r["img_per_s"] for r in served if (r["protocol"], r["batching"], r["concurrency"])
                     == (protocol, batching, c)), None)

    dyn16 = max(v for v in (at("http", "dynamic", 16), at("grpc", "dynamic", 16)) if v is not None)
    nopolicy16 = max(at(p, nopolicy, 16) for p in ("http", "grpc"))
    roof = roof_flops / flops
    ratios = {"dyn_c16_over_inprocess_best": dyn16 / best["img_per_s"],
              "dyn_over_nobatch_c16_http": at("http", "dynamic", 16) / at("http", "none", 16),
              "dyn_nopolicy_c16_over_inprocess_best": nopolicy16 / best["img_per_s"],
              "dyn_nopolicy_over_nobatch_c16_http": at("http", nopolicy, 16) / at("http", "none", 16),
              "served_over_compute_roof": dyn16 / roof, "inprocess_over_compute_roof": best["img_per_s"] / roof,
              # what batching can buy at all: a server that batches cannot beat the model's own batched speed
              "inprocess_batching_gain": best["img_per_s"] / eager[0]["img_per_s"]}
    return {"variant": variant, "input_size": size, "model_gflops_per_image": flops / 1e9,
            "matmul_gflops_per_s": roof_flops / 1e9, "matmul_gflops_samples": [m / 1e9 for m in matmul_samples], "compute_roof_img_per_s": roof,
            "in_process": eager, "in_process_best": best, "triton": served, "ratios": ratios}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = results["models"]
    fig, axes = plt.subplots(1, len(entries), figsize=(6.5 * len(entries), 4.5), squeeze=False)
    for ax, (key, r) in zip(axes[0], entries.items()):
        for protocol in ("http", "grpc"):
            for batching, style in (("dynamic", "-"), ("none", "--"), ("dynamic, no queue policy", ":")):
                pts = sorted((p["concurrency"], p["img_per_s"]) for p in r["triton"]
                             if p["protocol"] == protocol and p["batching"] == batching)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"Triton {protocol}, batching={batching}")
        ax.axhline(r["in_process_best"]["img_per_s"], color="k", lw=1,
                   label=f"in-process eager, batch {r['in_process_best']['batch']}")
        ax.axhline(r["compute_roof_img_per_s"], color="r", lw=1, ls=":", label="compute roof (matmul FLOP/s)")
        ax.set(title=f"{r['variant']} @ {r['input_size']}px", xlabel="concurrent clients", ylabel="images / s",
               xscale="log", xticks=[1, 4, 16, 32])
        ax.set_xticklabels(["1", "4", "16", "32"])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mobile,effnet", help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--mobile-size", type=int, default=224, help="input size of mobile and effnet")
    ap.add_argument("--vgg16-size", type=int, default=128, help="paper: 224 (~3x slower per image)")
    ap.add_argument("--window", type=float, default=6.0, help="seconds measured per Triton point")
    ap.add_argument("--queue-delay-us", type=int, default=2000)
    cores = sorted(os.sched_getaffinity(0))
    ap.add_argument("--server-cpus", type=parse_cpus, default=set(cores[:-1]) if len(cores) > 1 else None,
                    help="cores of the server and of the in-process baseline (default: all but the last)")
    ap.add_argument("--client-cpus", type=parse_cpus, default={cores[-1]} if len(cores) > 1 else None,
                    help="cores of the load generator (default: the last)")
    ap.add_argument("--unpinned", action="store_true",
                    help="the old method: server, load generator and baseline share every core")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in-process (default: one per server core; the server uses cores / instances)")
    ap.add_argument("--full", action="store_true", help="every point for VGG16 too (slow)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra tritonserver flag (repeatable)")
    ap.add_argument("--out", default=str(RESULTS / "serving.json"))
    ap.add_argument("--baseline-only", metavar="VARIANT", help=argparse.SUPPRESS)  # the pinned child of baseline()
    ap.add_argument("--batch-sizes", default="1,8", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline_only:
        torch.set_num_threads(args.threads)
        return baseline_main(args)
    if args.unpinned:
        args.server_cpus = args.client_cpus = None
    elif not args.server_cpus or not args.client_cpus or args.server_cpus & args.client_cpus:
        ap.error("pinning needs separate, non-empty --server-cpus and --client-cpus (or --unpinned)")
    args.threads = args.threads or len(args.server_cpus or cores)
    torch.set_num_threads(args.threads)
    started = time.time()
    results = {"benchmark": "serving", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "settings": {**{k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
                            "method": "unpinned" if args.unpinned else "pinned", "out": Path(args.out).name},
               "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                           "torch_threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()},
               "models": {}}
    for key in [m.strip() for m in args.models.split(",") if m.strip()]:
        if key not in VARIANTS:
            ap.error(f"unknown model {key!r}; choose from {', '.join(VARIANTS)}")
        size = args.vgg16_size if key == "vgg16" else args.mobile_size
        results["models"][key] = bench_model(key, size, args)
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - started
    targets = {}
    for key, r in results["models"].items():
        q = r["ratios"]
        out_of_reach = (f"missed, and out of reach on this machine: in-process, batch "
                        f"{r['in_process_best']['batch']} is only {q['inprocess_batching_gain']:.2f}x batch 1")
        targets[key] = {}
        for label, prefix in (("", "dyn"), (", no queue policy", "dyn_nopolicy")):
            overhead, gain = q[f"{prefix}_c16_over_inprocess_best"], q[f"{prefix}_over_nobatch_c16_http"]
            targets[key][f"serving_overhead{label} (>= 0.9)"] = [round(overhead, 3), overhead >= 0.9]
            targets[key][f"dynamic_vs_batch1{label} (>= 1.5)"] = [
                round(gain, 3), gain >= 1.5 or (out_of_reach if q["inprocess_batching_gain"] < 1.5 else False)]
        if key == "vgg16":
            # In-process above the "roof" means the matmul probe ran while other work held the cores: the
            # roof is then too low to judge against, and the verdict says so rather than claiming a pass.
            valid = q["inprocess_over_compute_roof"] <= 1.0
            targets[key]["compute_roof (>= 0.8)"] = [round(q["served_over_compute_roof"], 3),
                                                     q["served_over_compute_roof"] >= 0.8 if valid else
                                                     "inconclusive: in-process beat the measured roof"]
    results["targets"] = targets
    out = Path(args.out)
    atomic_write_text(out, json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"\n{'model':8} {'in-proc best':>13} {'dyn c16':>9} {'no-batch c16':>13} {'roof':>8}   ratios")
    for key, r in results["models"].items():
        dyn = max(p["img_per_s"] for p in r["triton"] if p["batching"] == "dynamic" and p["concurrency"] == 16)
        nob = next(p["img_per_s"] for p in r["triton"] if p["batching"] == "none" and p["concurrency"] == 16
                   and p["protocol"] == "http")
        print(f"{key:8} {r['in_process_best']['img_per_s']:13.1f} {dyn:9.1f} {nob:13.1f} "
              f"{r['compute_roof_img_per_s']:8.1f}   {targets[key]}")
    print(f"wrote {out} and {out.with_suffix('.png')} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
