"""Write the README's measured tables from bench/results/*.json: the only place those numbers are typed.

    python bench/report.py            # rewrite the generated blocks of README.md in place
    python bench/report.py --check    # exit 1 if README.md is out of date (tests/test_readme.py does this)

The README marks each generated block with ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``; everything
between the markers belongs to this script. Each block names the JSON it came from and the command that
regenerates that JSON, so a reader can check any number in one step.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
from mildnet.fileio import atomic_write_text  # noqa: E402
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- bench:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


def load(name: str) -> dict:
    path = RESULTS / name
    if not path.exists():
        raise FileNotFoundError(f"{path.relative_to(ROOT)} is missing: run the benchmark that writes it")
    return json.loads(path.read_text())


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule] + [[str(c) for c in row] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def source(files: list[str], command: str) -> str:
    names = ", ".join(f"`bench/results/{f}`" for f in files)
    return f"_From {names}; regenerate with `{command}`._"


def verdict(met: bool | str) -> str:
    if isinstance(met, str):  # the benchmark could not decide, or says why a target cannot be met here
        return "**missed**" + met[len("missed"):] if met.startswith("missed") else met
    return "met" if met else "**missed**"


# --- one renderer per block --------------------------------------------------------------------------------

def render_params() -> str:
    by_name = {m["model"]: m for m in load("models.json")["models"]}
    ratios = load("models.json")["ratios"]
    vgg, mobile = by_name["mildnet_vgg16"], by_name["mildnet_mobile"]
    return "\n".join([
        f"MILDNet-VGG16 has exactly {vgg['params']:,} parameters ({vgg['trainable']:,} trainable), as the official "
        f"code; MILDNet-Mobile {mobile['params']:,}. The multi-scale deep-ranking baseline (`ranknet`) has "
        f"{ratios['ranknet/mildnet_vgg16']:.2f}x the parameters of MILDNet-VGG16 and "
        f"{ratios['ranknet/mildnet_mobile']:.1f}x those of MILDNet-Mobile.",
        "",
        source(["models.json"], "python bench/models.py"),
    ])


def render_zoo() -> str:
    data = load("models.json")
    rows = []
    for m in data["models"]:
        cl = m["channels_last"]
        rows.append([f"`{m['model']}`", f"{m['params'] / 1e6:.2f}", f"{m['trainable'] / 1e6:.2f}", m["embedding_dim"],
                     f"{m['size_mb']:.1f}", f"{m['flops_per_image'] / 1e9:.2f}", f"{m['params_ratio_to_vgg16']:.2f}",
                     f"{cl['latency_ms_b1']:.0f}", f"{cl['throughput_img_s_b16']:.1f}", f"{cl['roof_fraction']:.2f}"])
    settings = data["settings"]
    load_avg = settings["machine"].get("loadavg_start")
    vgg = next(m for m in data["models"] if m["model"] == "mildnet_vgg16")
    return "\n".join([
        table(["model", "params (M)", "trainable (M)", "dim", "MB", "GFLOPs/img", "params vs VGG16",
               "latency b1 (ms)", "img/s b16", "of matmul roof"], rows),
        "",
        f"CPU, {settings['threads']} threads, {settings['size']}x{settings['size']} input, channels_last, best of "
        f"{settings['reps']} runs" + (f"; the machine was shared (load average {load_avg[0]:.1f} at start), so "
                                      f"latencies are upper bounds." if load_avg and load_avg[0] > 2 else "."),
        f"\"of matmul roof\": achieved FLOP/s at batch 16 over this machine's fp32 matmul FLOP/s "
        f"({data['roof_flops'] / 1e9:.0f} GFLOP/s, measured in the same run); MILDNet-VGG16 reaches "
        f"{vgg['channels_last']['roof_fraction']:.2f} of it (target 0.8), and channels_last runs it "
        f"{vgg['channels_last_speedup_b16']:.2f}x faster than NCHW.",
        "",
        source(["models.json"], "python bench/models.py"),
    ])


ACCURACY_STUDY = ("accuracy_224px.json",  # the headline study: the paper's input size, every training triplet
                  "python bench/accuracy.py --input-size 224 --train-triplets 0 --epochs 8 --loss contrastive "
                  "--lr 1e-4 --models mildnet_effnet_lite0,mildnet_mobile,mildnet_mobile_noskip,mildnet_mobile_skip1,"
                  "mildnet_mobile_skip2,mildnet_mobile_skip3 --zero-shot mobilenet_v1_gap,effnet_lite0_gap "
                  "--work runs/bench_accuracy_224 --out bench/results/accuracy_224px.json")
ACCURACY_FILES = {  # earlier, shorter runs at 96 px: file -> command that writes it
    "accuracy.json": "python bench/accuracy.py",
    "accuracy_20epochs.json": "python bench/accuracy.py --epochs 20 --models mildnet_mobile,mildnet_mobile_noskip "
                              "--zero-shot '' --out bench/results/accuracy_20epochs.json",
    "accuracy_20epochs_ablations.json": "python bench/accuracy.py --epochs 20 --models "
                                        "mildnet_mobile_skip3,mildnet_mobile_skip1,mildnet_mobile_skip2 "
                                        "--zero-shot '' --out bench/results/accuracy_20epochs_ablations.json",
    "accuracy_20epochs_tapnorm.json": "python bench/accuracy.py --epochs 20 --models mildnet_mobile --zero-shot '' "
                                      "--tap-norm --work runs/bench_accuracy_tapnorm "
                                      "--out bench/results/accuracy_20epochs_tapnorm.json",
    "accuracy_10epochs_finetune.json": "python bench/accuracy.py --epochs 10 --models mildnet_mobile --zero-shot '' "
                                       "--freeze-units 0 --lr 1e-4 --work runs/bench_accuracy_finetune "
                                       "--out bench/results/accuracy_10epochs_finetune.json",
    "accuracy_3epochs_all_triplets.json": "python bench/accuracy.py --epochs 3 --train-triplets 0 --models "
                                          "mildnet_mobile --zero-shot '' --work runs/bench_accuracy_all "
                                          "--out bench/results/accuracy_3epochs_all_triplets.json",
}


def _retrieval_cells(r: dict) -> list[str]:
    return [pct(r["val_triplet_accuracy_in_class"]), pct(r["val_triplet_accuracy_out_class"]),
            pct(r["photo_to_catalogue_recall@1"]), pct(r["photo_to_catalogue_recall@5"]),
            f"{r['photo_to_catalogue_mAP']:.3f}"]


def render_accuracy() -> str:
    name, command = ACCURACY_STUDY
    study = load(name)
    paper, st = study["paper_target"], study["settings"]
    rows = []
    for r in study["rows"]:
        trained = r["kind"] == "trained"
        rows.append([f"`{r['model']}`", r["kind"], f"{100 * r['val_triplet_accuracy']:.2f} %",
                     f"{100 * r['val_triplet_accuracy_epochs_min']:.1f}-"
                     f"{100 * r['val_triplet_accuracy_epochs_max']:.1f} %" if trained else "-", r.get("best_epoch") or "-", *_retrieval_cells(r),
                     f"{r['train_seconds']:.0f}" if trained else "-"])
    trained = [r for r in study["rows"] if r["kind"] == "trained"]
    best = max(trained, key=lambda r: r["val_triplet_accuracy"])
    headline = [
        table(["model", "kind", "triplet acc.", "epochs 1-" + str(st["epochs"]), "kept epoch", "in-class",
               "out-of-class", "photo->catalogue R@1", "R@5", "mAP", "train s"], rows, "llrrrrrrrrr"),
        "",
        f"Grocery Store, trained on the train split ({st['triplets']['train']['triplets']:,} triplets an epoch, "
        f"{st['epochs']} epochs), measured on {st['triplets']['val']['triplets']:,} val triplets (half of them "
        f"in-class); input {st['input_size']} px, ImageNet backbone frozen (only the head trains, so each image's "
        f"taps are pooled once), {st['loss']} loss, {st['optimizer']} lr {st['lr']:g}, batch {st['batch_size']} "
        f"triplets, no augmentation. The checkpoint kept is the one with the lowest val loss (the paper's rule); "
        f"\"epochs\" gives the range of val accuracy over every epoch's weights. Best: `{best['model']}` at "
        f"{100 * best['val_triplet_accuracy']:.2f} % against the paper's {100 * paper:.2f} % on street2shop tops "
        f"(target {verdict(best['val_triplet_accuracy'] >= paper)}). Models of ours, not the paper's: "
        + ", ".join(f"`{r['model']}`" for r in trained if not r["paper_model"]) + ".",
        "",
        source([name], command),
    ]
    rows = []
    for name in ACCURACY_FILES:
        data = load(name)
        for r in data["rows"]:
            epochs = "-" if r["kind"] == "zero-shot" else data["settings"]["epochs"]
            kind = r["kind"] + (", taps L2-normalised" if data["settings"].get("tap_norm") else "") + (
                f", backbone fine-tuned (lr {data['settings']['lr']:g})"
                if r["kind"] != "zero-shot" and data["settings"].get("freeze_units") == 0 else "")
            per_epoch = data["settings"]["train_triplets"] or data["settings"]["triplets"]["train"]["triplets"]
            rows.append([f"`{r['model']}`", kind, epochs, "-" if r["kind"] == "zero-shot" else f"{per_epoch:,}",
                         pct(r["val_triplet_accuracy"]), *_retrieval_cells(r)])
    settings = load("accuracy.json")["settings"]
    return "\n".join(headline + [
        "",
        f"Earlier, shorter runs at {settings['input_size']} px ({settings['optimizer']}, hinge loss, backbone frozen "
        "unless the row says otherwise):",
        "",
        table(["model", "kind", "epochs", "triplets/epoch", "triplet acc.", "in-class", "out-of-class",
               "photo->catalogue R@1", "R@5", "mAP"], rows, "llrrrrrrrr"),
        "",
        "\n".join(source([name], cmd) for name, cmd in ACCURACY_FILES.items()),
    ])


def render_serving() -> str:
    data = load("serving.json")
    rows = []
    for key, m in data["models"].items():
        best = m["in_process_best"]
        rows.append([f"`{m['variant']}` ({m['input_size']} px)", "in-process PyTorch", "-", best["batch"],
                     f"{best['img_per_s']:.1f}", f"{best['latency_ms']:.0f}", "-"])
        for r in m["triton"]:  # 16 clients; one client shows the queue policy's stalls (docs/serving.md)
            if r["concurrency"] == 16 or (r["concurrency"] == 1 and r["protocol"] == "http"
                                          and r["batching"] != "none"):
                rows.append(["", f"Triton {r['protocol']}, batching {r['batching']}", r["concurrency"],
                             f"{r['avg_batch']:.1f}", f"{r['img_per_s']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}"])
    targets = []
    for key, checks in data["targets"].items():
        for name, (value, met) in checks.items():
            targets.append(f"- `{key}` {name}: {value:.2f}, {verdict(met)}")
    return "\n".join([
        table(["model", "path", "clients", "batch", "img/s", "p50 (ms)", "p99 (ms)"], rows, "llrrrrr"),
        "",
        "Targets (ratios measured in the same run):",
        *targets,
        "",
        source(["serving.json"], "python bench/serving.py"),
    ])


def render_kernel() -> str:
    data = load("kernel.json")
    fused = {(r["n"], r["layout"], r["dtype"], r["mode"]): r for r in data["rows"] if r["variant"] == "fused"}
    compiled = {(r["n"], r["layout"], r["dtype"], r["mode"]): r for r in data["rows"] if r["variant"] == "compiled"}
    rows = []
    for (n, layout, dtype, mode), r in fused.items():
        if mode != "forward":
            continue
        back = fused[(n, layout, dtype, "forward+backward")]
        comp = compiled.get((n, layout, dtype, mode))
        rows.append([n, layout, dtype, f"{r['ms']:.3f}", f"{r['sum_read_gbps']:.2f}", f"{r['speedup_vs_eager']:.2f}x",
                     f"{r['speedup_vs_eager'] / comp['speedup_vs_eager']:.2f}x" if comp else "-",
                     f"{back['speedup_vs_eager']:.2f}x"])
    targets = [f"- {name}: worst {t['worst']:.2f} ({t['worst_config']}), {verdict(t['met'])}"
               for name, t in data["targets"].items()]
    return "\n".join([
        table(["N", "layout", "dtype", "forward (ms)", "of read roof", "vs eager", "vs torch.compile",
               "fwd+bwd vs eager"], rows, "rllrrrrr"),
        "",
        f"MILDNet-VGG16's five taps, L2-normalised, on the CPU with {data['settings']['threads']} thread; the read "
        "roof is `x.sum()` over the same bytes, measured in the same run.",
        *targets,
        "",
        source(["kernel.json"], "python bench/kernel.py"),
    ])


RETRIEVAL_FILES = {
    "retrieval.json": "python bench/retrieval.py",
    "retrieval_ivfpq_1m.json": "python bench/retrieval.py --sizes 1000000 --indexes ivfpq --nprobe-pq 8,16 "
                               "--k-factor 20,40 --out bench/results/retrieval_ivfpq_1m.json",
    "retrieval_100k_1024.json": "python bench/retrieval.py --sizes 100000 --dims 1024 "
                                "--out bench/results/retrieval_100k_1024.json",
    "retrieval_1m_1024.json": "python bench/retrieval.py --sizes 1000000 --dims 1024 --indexes ivfflat,ivfpq "
                              "--nprobe 4,8 --nprobe-pq 8,16 --k-factor 20,40 "
                              "--out bench/results/retrieval_1m_1024.json",
    "retrieval_ivfpq_1m_m64.json": "python bench/retrieval.py --sizes 1000000 --indexes ivfpq --pq-dims-per-code 8 "
                                   "--nprobe-pq 4,6 --k-factor 10,15 --out bench/results/retrieval_ivfpq_1m_m64.json",
    "retrieval_ivfpq_1m_1024_m128.json": "python bench/retrieval.py --sizes 1000000 --dims 1024 --indexes ivfpq "
                                         "--pq-dims-per-code 8 --nprobe-pq 4,6 --k-factor 10,15 "
                                         "--out bench/results/retrieval_ivfpq_1m_1024_m128.json",
}


def render_index() -> str:
    target = load("retrieval.json")["target"]
    groups: dict[tuple[int, int], dict[str, dict]] = {}  # (n, dim) -> index kind -> the row shown
    for name in RETRIEVAL_FILES:
        for r in load(name)["rows"]:
            shown = groups.setdefault((r["n"], r["dim"]), {})
            best = shown.get(r["index"])
            # per kind: the fastest setting that reaches the recall target, else the most accurate one
            key = lambda x: (x["recall@10"] >= target["recall@10"], x["qps"] if x["recall@10"] >= target["recall@10"]
                             else x["recall@10"])  # noqa: E731
            if best is None or key(r) > key(best):
                shown[r["index"]] = r
    rows = []
    for (n, dim), shown in sorted(groups.items()):
        for r in shown.values():
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
            rows.append([f"{n:,} x {dim}", r["index"], params, f"{r['recall@10']:.3f}", f"{r['qps']:,.0f}",
                         f"{r['latency_ms']:.2f}", f"{r['speedup_vs_flat']:.1f}x", f"{r['build_s']:.0f}",
                         f"{r['index_mb']:,.0f}"])
    verdicts = []
    for name in RETRIEVAL_FILES:
        for v in load(name)["verdicts"]:
            b = v["best"]
            verdicts.append(f"- {v['n']:,} x {v['dim']} ({name}): best {b['index']} "
                            f"({', '.join(f'{k}={x}' for k, x in b['params'].items())}) at recall@10 "
                            f"{b['recall@10']:.3f}, {b['speedup_vs_flat']:.1f}x flat: {verdict(v['target_met'])}")
    return "\n".join([
        table(["vectors", "index", "parameters", "recall@10", "queries/s", "latency (ms)", "vs flat", "build (s)",
               "MB"], rows, "llrrrrrrr"),
        "",
        f"Per index kind, the fastest setting with recall@10 >= {target['recall@10']} (else the most accurate one; "
        f"every setting tried is in the JSON); \"vs flat\" compares with exact search in the same run. Target: recall@10 >= {target['recall@10']} at >= "
        f"{target['speedup_vs_flat']:.0f}x the exact (flat) search's throughput at 1M vectors. Synthetic clustered "
        "unit vectors, 1,000 queries, 2 threads; 1024 is MILDNet-Mobile's embedding size.",
        *verdicts,
        "",
        "\n".join(source([name], cmd) for name, cmd in RETRIEVAL_FILES.items()),
    ])


def render_soak() -> str:
    data = load("soak.json")
    s, cfg = data["summary"], data["settings"]
    return "\n".join([
        table(["duration", "rate", "requests", "served", "failures", "p50 (ms)", "p99 (ms)", "memory growth"],
              [[f"{cfg['duration'] / 60:.0f} min", f"{cfg['rate']:g}/s", s["requests"], s["served"], s["failures"],
                f"{s['p50_ms']:.0f}", f"{s['p99_ms']:.0f}", f"{100 * s['rss_growth_after_warmup']:+.1f} %"]]),
        "",
        f"Targets: {s['targets']['failures']} failures ({verdict(s['met']['failures'])}), memory growth after "
        f"warm-up below {pct(s['targets']['rss_growth_after_warmup'])} ({verdict(s['met']['rss_growth'])}).",
        "",
        source(["soak.json"], "python bench/soak.py"),
    ])


def render_demo() -> str:
    if not (RESULTS / "demo.json").exists():
        return "_No demo run recorded yet: `make demo-record` writes `bench/results/demo.json`._"
    s = load("demo.json")
    lo = s["locust"]
    times = [[f"`{model}`", t["requests"], f"{t['request_ms']:.1f}", f"{t['queue_ms']:.1f}",
              f"{t['compute_input_ms'] + t['compute_output_ms']:.1f}", f"{t['compute_infer_ms']:.1f}",
              f"{t['avg_batch']:.1f}"]
             for model, t in s["time_per_request"].items() if t.get("requests")]
    m = s["model"]
    model = f"`{m.get('variant', m['model_version'].rsplit('-', 1)[0])}`, {m['input_size']} px, {m['epochs']} ep."
    return "\n".join([
        table(["model", "catalogue", "queries", "top-1", "top-5", "load test", "requests/s", "failures", "p50 (ms)",
               "p95 (ms)", "p99 (ms)", "demo time"],
              [[model, s["catalogue_items"], s["queries"], pct(s["top1"]), pct(s["top5"]),
                f"{lo['seconds']} s, {lo['users']} users", f"{lo['rps']:.1f}", lo["failures"],
                f"{lo['p50_ms']:.0f}", f"{lo['p95_ms']:.0f}", f"{lo['p99_ms']:.0f}", f"{s['seconds'] / 60:.1f} min"]],
              "l" + "r" * 11),
        "",
        "Where a request's time went inside Triton during the load test (ms per request, from Triton's metrics; "
        "see [docs/serving.md](docs/serving.md#where-the-time-goes-per-request)):",
        "",
        table(["model", "requests", "in Triton", "queue", "input + output", "compute", "batch"], times),
        "",
        source(["demo.json"], "make demo-record"),
    ])


def render_ui() -> str:
    s = load("ui.json")
    rows = [[pt["users"], f"{pt['triton']['p50_ms']:.1f}", f"{pt['page']['p50_ms']:.1f}", f"{pt['added_p50_ms']:.1f}",
             f"{pt['triton']['p99_ms']:.1f}", f"{pt['page']['p99_ms']:.1f}", f"{pt['added_p99_ms']:.1f}"]
            for pt in s["points"]]
    return "\n".join([
        table(["users", "Triton direct p50 (ms)", "page p50 (ms)", "web layer p50 (ms)", "Triton direct p99 (ms)",
               "page p99 (ms)", "web layer p99 (ms)"], rows),
        "",
        f"`{s['model']}` at {s['input_size']} px, {s['catalogue_items']} catalogue items, k = {s['k']}, a "
        f"{s['query_bytes'] / 1024:.0f} KiB photo; load average {s['machine']['load_avg_end'][0]:.1f} on "
        f"{s['machine']['cpus']} CPUs, {s['points'][0]['page']['n']} and {s['points'][-1]['page']['n']} page requests.",
        "",
        source(["ui.json"], "python bench/ui.py"),
    ])


RENDERERS = {
    "params": render_params, "zoo": render_zoo, "accuracy": render_accuracy, "serving": render_serving,
    "kernel": render_kernel, "index": render_index, "soak": render_soak, "demo": render_demo, "ui": render_ui,
}


def render(text: str) -> str:
    """``text`` with every generated block rendered anew from the JSON files."""
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"README block '{name}' has no renderer in bench/report.py ({', '.join(RENDERERS)})")
        return f"{match.group(1)}{RENDERERS[name]()}\n{match.group(4)}"
    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    old = args.readme.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print(f"{args.readme} is out of date with bench/results: run python bench/report.py", file=sys.stderr)
            return 1
        print(f"{args.readme}: every generated block matches bench/results")
        return 0
    if new != old:
        atomic_write_text(args.readme, new)
    print(f"{args.readme}: {len(BLOCK.findall(new))} generated blocks {'updated' if new != old else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
