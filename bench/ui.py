"""What the search page's web layer adds to a search: POST /api/search vs Triton's ``similar`` called directly.

    .venv/bin/python bench/ui.py                  # ~1-2 min on a 2-core machine
    .venv/bin/python bench/ui.py --requests 200 --size 224

One Triton server (a zero-shot EfficientNet-Lite0 export over a small Grocery catalogue) and one page
(``mildnet.ui``) on 127.0.0.1. At 1 and 8 concurrent users, each user sends the same real photo, alternating
blocks of direct calls (``TritonEmbedder.similar``) and page calls (HTTP POST of the photo's bytes).

The web layer's cost is measured per page request: the latency the client sees minus the time the page waited
for Triton inside it (its ``Server-Timing: triton`` header). So it holds the HTTP hop, reading the upload, the
page's own decode of the photo (its clear-error check) and the JSON, and not Triton's own time, which on a busy
shared machine swings by far more than the web layer costs (the direct and page latencies are recorded too,
as context).

Writes bench/results/ui.json and prints a table. No target: the number is recorded to watch it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mildnet.fileio import atomic_write_text  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GROCERY = Path(os.environ.get("MILDNET_GROCERY", ROOT.parent / "shared" / "data" / "grocery"))


def build_stack(work: Path, size: int, catalogue: int):
    """Export the model, index ``catalogue`` train photos in-process; return (repository, index path, query)."""
    import torch

    from mildnet import models
    from mildnet.export import export_model
    from mildnet.serving.contract import default_index_path
    from mildnet.serving.repository import ServingConfig
    from mildnet.imageio import preprocess
    from mildnet.index import create_index

    repo = work / "model_repository"
    model = models.create("effnet_lite0_gap", pretrained=True, input_size=size).eval()
    # no queue policy: its occasional ~0.5 s stalls (docs/serving.md) would drown the difference measured here
    result = export_model(model, repo, ServingConfig(max_batch_size=8, max_queue_delay_us=2000, max_queue_size=0))
    lines = (GROCERY / "dataset" / "train.txt").read_text().splitlines()
    photos = [GROCERY / "dataset" / l.split(",")[0].strip() for l in lines[::max(1, len(lines) // catalogue)]]
    photos = photos[:catalogue]
    with torch.inference_mode():
        vectors = model(torch.stack([preprocess(p, model.spec) for p in photos])).numpy()
    index = create_index(model.embedding_dim, kind="flat", model_version=result.served.model_version)
    index.add([p.name for p in photos], vectors, [{"path": str(p), "category": p.parts[-3]} for p in photos])
    index_path = default_index_path(repo)
    index.save(index_path)
    query = GROCERY / "dataset" / (GROCERY / "dataset" / "val.txt").read_text().splitlines()[0].split(",")[0]
    return repo, index_path, query


def run_users(users: int, requests: int, call) -> list[tuple[float, float]]:
    """``users`` threads, ``requests`` calls each: (latency ms, what ``call`` returned: Triton's ms inside)."""
    times: list[tuple[float, float]] = []
    lock = threading.Lock()

    def user():
        mine = []
        for _ in range(requests):
            t = time.perf_counter()
            inside = call()
            mine.append(((time.perf_counter() - t) * 1000, inside))
        with lock:
            times.extend(mine)

    threads = [threading.Thread(target=user) for _ in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times


def pct(times: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(times, 50)), 2), "p99_ms": round(float(np.percentile(times, 99)), 2),
            "n": len(times)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=24, help="per user and per path, over all blocks")
    p.add_argument("--blocks", type=int, default=3, help="alternating direct/page blocks")
    p.add_argument("--size", type=int, default=128, help="model input size")
    p.add_argument("--catalogue", type=int, default=200, help="catalogue photos indexed")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS / "ui.json")
    args = p.parse_args(argv)

    from mildnet.serving.client import TritonEmbedder
    from mildnet.serving.server import TritonServer
    from mildnet.ui.app import UIConfig, create_app
    from mildnet.ui.server import PageServer

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mildnet-bench-ui-") as tmp:
        repo, index_path, query = build_stack(Path(tmp), args.size, args.catalogue)
        image = query.read_bytes()
        with TritonServer(repo, model_control_mode="none", log_file=Path(tmp) / "triton.log") as triton, \
                TritonEmbedder(triton.http_url, concurrency=8) as direct, \
                PageServer(create_app(UIConfig(urls=[triton.http_url], index=index_path))) as page:
            url = f"{page.url}api/search?k={args.k}"

            def via_page() -> float:
                req = urllib.request.Request(url, data=image, headers={"Content-Type": "image/jpeg"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    body, timing = json.loads(r.read()), r.headers["server-timing"]
                assert len(body["hits"]) == args.k
                return float(timing.split("dur=", 1)[1])

            def via_triton() -> float:
                assert len(direct.similar(image, k=args.k)) == args.k
                return 0.0

            for call in (via_page, via_triton):  # warm-up: connections, thumbnails of nothing, oneDNN shapes
                run_users(2, 5, call)
            points = []
            for users in (1, 8):
                got = {"triton": [], "page": []}
                per_block = max(1, args.requests // args.blocks)
                for _ in range(args.blocks):
                    got["triton"] += run_users(users, per_block, via_triton)
                    got["page"] += run_users(users, per_block, via_page)
                added = pct([total - inside for total, inside in got["page"]])
                points.append({"users": users, "triton": pct([t for t, _ in got["triton"]]),
                               "page": pct([t for t, _ in got["page"]]),
                               "added_p50_ms": added["p50_ms"], "added_p99_ms": added["p99_ms"]})
    result = {"bench": "ui", "model": "effnet_lite0_gap", "input_size": args.size, "catalogue_items": args.catalogue,
              "export": "max_batch_size 8, max_queue_delay_us 2000, max_queue_size 0 (no queue policy)",
              "k": args.k, "query_bytes": len(image), "points": points,
              "machine": {"cpus": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg()},
              "command": "bench/ui.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"{'users':>5}  {'triton p50':>10}  {'page p50':>8}  {'added p50':>9}  {'triton p99':>10}  {'page p99':>8}  "
          f"{'added p99':>9}   (ms)")
    for pt in points:
        print(f"{pt['users']:>5}  {pt['triton']['p50_ms']:>10}  {pt['page']['p50_ms']:>8}  {pt['added_p50_ms']:>9}  "
              f"{pt['triton']['p99_ms']:>10}  {pt['page']['p99_ms']:>8}  {pt['added_p99_ms']:>9}")
    print(f"wrote {args.out} (load average {result['machine']['load_avg_end'][0]:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
