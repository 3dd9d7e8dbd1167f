"""Model zoo benchmark: size, FLOPs, CPU latency/throughput, ratios to MILDNet-VGG16, fraction of the matmul roof.

For every zoo model: parameters (total/trainable), fp32 state-dict size on disk, FLOPs per 224x224 image
(``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-add), CPU latency at batch 1 and
throughput at batch 16 in channels_last (plus NCHW for the VGG16 and MobileNet models, to measure what
channels_last buys), parameter/FLOP ratios to MILDNet-VGG16, and achieved FLOP/s at batch 16 as a fraction
of this machine's fp32 matmul FLOP/s measured in the same run (the "roof").

    .venv/bin/python bench/models.py                # all models, ~5 min on 2 shared cores
    .venv/bin/python bench/models.py --models mildnet_vgg16 mildnet_mobile --reps 5

Writes bench/results/models.json and bench/results/models.md (table for the README).
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mildnet import models  # noqa: E402
from mildnet.fileio import atomic_write_text  # noqa: E402

NCHW_TOO = ("mildnet_vgg16", "mildnet_mobile")  # also timed in NCHW: the channels_last speedup


def matmul_roof(seconds: float = 3.0, n: int = 2048) -> float:
    """Best fp32 FLOP/s of an n x n matmul over ~``seconds`` (the roof models are compared with)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def timed(model: torch.nn.Module, x: torch.Tensor, reps: int, warmup: int = 1) -> float:
    """Best wall time of ``model(x)`` over ``reps`` runs after ``warmup`` (best, not mean: the machine is
    shared, and other jobs only ever make a run slower)."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t)
    return best


def flops_per_image(model: torch.nn.Module, size: int) -> int:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.rand(1, 3, size, size))
    return counter.get_total_flops()


def state_dict_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def bench_model(name: str, args, roof: float) -> dict:
    model = models.create(name).eval()  # random weights: speed does not depend on their values
    size = args.size
    row = {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.trainable_parameters()),
        "embedding_dim": model.embedding_dim,
        "size_mb": state_dict_bytes(model) / 1e6,
        "flops_per_image": flops_per_image(model, size),
    }
    formats = {"channels_last": torch.channels_last}
    if name in NCHW_TOO:
        formats["nchw"] = torch.contiguous_format
    for label, fmt in formats.items():
        model.set_memory_format(fmt)
        x1 = torch.rand(1, 3, size, size)
        xb = torch.rand(args.batch, 3, size, size)
        t1 = timed(model, x1, args.reps_latency)
        tb = timed(model, xb, args.reps, warmup=0)  # batch 1 already warmed the kernels up; best-of-reps
        row[label] = {
            "latency_ms_b1": t1 * 1e3,
            f"throughput_img_s_b{args.batch}": args.batch / tb,
            "achieved_flops": row["flops_per_image"] * args.batch / tb,
            "roof_fraction": row["flops_per_image"] * args.batch / tb / roof,
        }
    if "nchw" in row:
        row["channels_last_speedup_b16"] = (row["channels_last"][f"throughput_img_s_b{args.batch}"]
                                            / row["nchw"][f"throughput_img_s_b{args.batch}"])
    return row


def markdown(results: dict) -> str:
    b = results["settings"]["batch"]
    lines = [f"| model | params (M) | trainable (M) | dim | size (MB) | GFLOPs/img | params / MILDNet-VGG16 | "
             f"latency b1 (ms) | throughput b{b} (img/s) | FLOP/s / matmul roof |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["models"]:
        cl = r["channels_last"]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['trainable'] / 1e6:.2f} | {r['embedding_dim']} | "
                     f"{r['size_mb']:.1f} | {r['flops_per_image'] / 1e9:.2f} | {r['params_ratio_to_vgg16']:.2f} | "
                     f"{cl['latency_ms_b1']:.0f} | {cl[f'throughput_img_s_b{b}']:.1f} | {cl['roof_fraction']:.2f} |")
    s = results["settings"]
    lines += ["", f"CPU: {s['machine']['cpu']} ({s['threads']} threads, shared machine: load average "
              f"{s['machine']['loadavg_start']} at start), torch {s['machine']['torch']}, input {s['size']}x{s['size']}, "
              f"channels_last, best of {s['reps']} reps. Matmul roof: {results['roof_flops'] / 1e9:.1f} GFLOP/s fp32."]
    for r in results["models"]:
        if "channels_last_speedup_b16" in r:
            lines.append(f"- {r['model']}: channels_last is {r['channels_last_speedup_b16']:.2f}x NCHW throughput "
                         f"at batch {b} (NCHW roof fraction {r['nchw']['roof_fraction']:.2f}).")
    for k, v in results["ratios"].items():
        lines.append(f"- params {k}: {v:.2f}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=models.list_models())
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=2, help="timed batch runs per model (best counts)")
    p.add_argument("--reps-latency", type=int, default=3)
    p.add_argument("--roof-seconds", type=float, default=1.5, help="matmul roof measurement before each model")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "models.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    start = time.time()
    load_start = os.getloadavg()
    # The roof is re-measured before every model and the best value kept: on a shared machine other jobs only
    # ever lower a measurement, so the max is the closest to the real roof (and fractions stay conservative).
    roofs = []
    rows = []
    for n in tqdm(args.models, desc="models", unit="model"):
        roofs.append(matmul_roof(args.roof_seconds))
        rows.append(bench_model(n, args, roofs[-1]))
    roofs.append(matmul_roof(args.roof_seconds))
    roof = max(roofs)
    for r in rows:
        for fmt in ("channels_last", "nchw"):
            if fmt in r:
                r[fmt]["roof_fraction"] = r[fmt]["achieved_flops"] / roof
    by_name = {r["model"]: r for r in rows}
    ref = by_name.get("mildnet_vgg16")
    for r in rows:
        r["params_ratio_to_vgg16"] = r["params"] / ref["params"] if ref else float("nan")
        r["flops_ratio_to_vgg16"] = r["flops_per_image"] / ref["flops_per_image"] if ref else float("nan")
    ratios = {}
    for a, b in [("visnet", "mildnet_vgg16"), ("ranknet", "mildnet_vgg16"), ("ranknet", "mildnet_mobile"),
                 ("ranknet", "mildnet_mobile_noskip"), ("mildnet_vgg16", "mildnet_mobile")]:
        if a in by_name and b in by_name:
            ratios[f"{a}/{b}"] = by_name[a]["params"] / by_name[b]["params"]
    results = {
        "benchmark": "models",
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"size": args.size, "batch": args.batch, "reps": args.reps, "reps_latency": args.reps_latency,
                     "threads": args.threads, "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                     "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                                 "torch": torch.__version__, "python": platform.python_version(),
                                 "shared": "yes: 2-core machine shared with other jobs; times are best-of-reps",
                                 "loadavg_start": [round(v, 2) for v in load_start],
                                 "loadavg_end": [round(v, 2) for v in os.getloadavg()]}},
        "roof_flops": roof, "roof_flops_measurements": roofs,
        "expected_param_ratios_from_official_code": {"visnet/mildnet_vgg16": 2.9, "ranknet/mildnet_vgg16": 3.1,
                                                     "ranknet/mildnet_mobile (official, taps unused)": 12.8},
        "ratios": ratios,
        "models": rows,
        "wall_s": time.time() - start,
    }
    try:
        import re
        cpu = open("/proc/cpuinfo").read()
        results["settings"]["machine"]["cpu"] = re.search(r"model name\s*:\s*(.*)", cpu).group(1)
    except (OSError, AttributeError):
        pass
    atomic_write_text(args.out, json.dumps(results, indent=2))
    md = markdown(results)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
