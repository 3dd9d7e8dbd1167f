"""A short real locust run against the session's Triton server: >= 20 s, 4 users (2 HTTP, 2 gRPC), every
request must succeed (checked in locust's CSV, not only its exit code)."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.server
@pytest.mark.slow
def test_locust_headless_run_has_no_failures(tmp_path, triton_server, grocery_photos):
    images = tmp_path / "images"
    images.mkdir()
    for p in grocery_photos:
        (images / p.name).write_bytes(p.read_bytes())
    prefix = tmp_path / "locust"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "client" / "locustfile.py"), "--headless",
           "-u", "4", "-r", "4", "-t", "20s", "--stop-timeout", "10", "--host", f"http://{triton_server.http_url}",
           "--grpc-host", triton_server.grpc_url, "--images", str(images), "--k", "3",
           "--csv", str(prefix), "--html", str(tmp_path / "report.html"), "--only-summary"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    with open(f"{prefix}_stats.csv") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    failures = Path(f"{prefix}_failures.csv").read_text()
    total = rows[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, failures
    assert r.returncode == 0, r.stderr[-3000:]
    for kind in ("HTTP", "gRPC"):
        for model in ("mildnet_ensemble", "similar"):
            assert int(rows[(kind, model)]["Request Count"]) >= 5, (kind, model, rows.keys())
    assert int(total["Request Count"]) >= 40
    assert (tmp_path / "report.html").stat().st_size > 10_000
