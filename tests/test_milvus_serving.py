"""Scale-out on the real Milvus server (session fixture ``milvus_server``): two Triton replicas (`mildnet serve`
twice) whose `similar` models query one collection, and client/index.py --backend milvus killed with -9.

Opt-out and required-dependency rules as in tests/test_index_milvus.py (MILDNET_SKIP_MILVUS=1 skips visibly).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("MILDNET_SKIP_MILVUS") == "1":
    pytest.skip("MILDNET_SKIP_MILVUS=1: Milvus server tests opted out", allow_module_level=True)

import pymilvus  # noqa: E402,F401  (ImportError fails the run: the dependency is required)

from mildnet.index import create_index, load_index  # noqa: E402
from mildnet.serving.server import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INDEX_PY = ROOT / "client" / "index.py"
# How soon a change made through one replica's collection client must be visible through the other replica
# (Session consistency: the other client reads once the server has consumed the write; measured ~1 s here).
VISIBLE_WITHIN_S = 10.0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Replica:
    """`python -m mildnet serve` on free 127.0.0.1 ports, its `similar` reading MILDNET_INDEX."""

    def __init__(self, repo: Path, index_path: Path, log: Path):
        self.ports = [free_port() for _ in range(3)]
        env = dict(os.environ, MILDNET_INDEX=str(index_path))
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mildnet", "serve", "--repository", str(repo), "--http-port", str(self.ports[0]),
             "--grpc-port", str(self.ports[1]), "--metrics-port", str(self.ports[2]), "--poll-secs", "0",
             "--log-file", str(log.with_suffix(".triton.log"))],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        self.url = f"127.0.0.1:{self.ports[0]}"

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mildnet serve exited: {self.proc.returncode}"
            if _http_ok(f"http://{self.url}/v2/models/similar/ready"):
                return
            time.sleep(0.5)
        raise AssertionError("replica not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `mildnet serve` stops Triton and its stubs in order
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def embed(model, photos) -> np.ndarray:
    import torch

    from mildnet.imageio import preprocess

    with torch.inference_mode():
        return model(torch.stack([preprocess(p, model.spec) for p in photos])).numpy()


def _top_ids(remote, photo: Path, k: int = 3) -> list[str]:
    return [h.id for h in remote.similar(photo.read_bytes(), k=k)]


@pytest.mark.server
@pytest.mark.slow
def test_two_replicas_share_one_collection(tmp_path, milvus_server, served_repository, grocery_photos):
    from mildnet.serving.client import TritonEmbedder

    repo, model, info = served_repository
    photos, held_back = grocery_photos[:-1], grocery_photos[-1]
    vectors = embed(model, grocery_photos)
    index = create_index(model.embedding_dim, backend="milvus", uri=milvus_server.uri, collection="replicas",
                         model_version=info.model_version)
    descriptor = tmp_path / "catalogue.mindex"
    replicas = []
    try:
        index.add([p.stem for p in photos], vectors[:-1], [{"name": p.name} for p in photos])
        index.save(descriptor)  # the one descriptor every replica loads (docs/scaling.md)
        replicas = [Replica(repo, descriptor, tmp_path / f"replica{i}.log") for i in range(2)]
        for r in replicas:
            r.wait_ready()
        a, b = (TritonEmbedder(r.url) for r in replicas)
        for remote in (a, b):
            assert _top_ids(remote, photos[2])[0] == photos[2].stem
        assert _top_ids(a, photos[3]) == _top_ids(b, photos[3])

        # an add through one writer's client (not the replicas, not the descriptor): seen through both replicas
        t0 = time.monotonic()
        index.add(["new-item"], vectors[-1:], [{"name": held_back.name}])
        while _top_ids(b, held_back, k=1) != ["new-item"]:
            assert time.monotonic() - t0 < VISIBLE_WITHIN_S, "replica b never saw the added item"
            time.sleep(0.1)
        add_seen_s = time.monotonic() - t0
        assert _top_ids(a, held_back, k=1) == ["new-item"]

        t0 = time.monotonic()
        index.remove(["new-item"])
        while "new-item" in _top_ids(b, held_back, k=3):
            assert time.monotonic() - t0 < VISIBLE_WITHIN_S, "replica b still returns the deleted item"
            time.sleep(0.1)
        delete_seen_s = time.monotonic() - t0
        assert "new-item" not in _top_ids(a, held_back, k=3)
        print(f"add seen by replica b after {add_seen_s:.2f} s, delete after {delete_seen_s:.2f} s")
    finally:
        for r in replicas:
            r.stop()
        index.drop()
        index.close()


@pytest.mark.server
@pytest.mark.slow
def test_indexer_killed_9_into_the_server_then_rerun_holds_each_item_once(tmp_path, milvus_server, triton_server,
                                                                         grocery_root):
    from test_client import grocery_rows, write_catalogue

    rows = grocery_rows(grocery_root, per_class=4, classes=10)  # 40 photos
    cat = write_catalogue(tmp_path, rows)
    out = tmp_path / "cat.mindex"
    journal = out.with_name(out.name + ".journal")
    args = [sys.executable, str(INDEX_PY), str(cat), "--out", str(out), "--url", triton_server.http_url,
            "--backend", "milvus", "--milvus-uri", milvus_server.uri, "--collection", "killed",
            "--chunk", "1", "--concurrency", "1", "--checkpoint-every", "1000", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        records = journal.read_bytes().count(b"\n") - 1 if journal.exists() else 0
        if records >= 8:  # some items already in the collection, more to come
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the indexer finished before it could be killed"
    assert not out.exists()
    r = subprocess.run(args[:-1] + ["--json", "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    index = load_index(out)
    try:
        expected = sorted(f"images/{p.name}" for p, _, _ in rows)
        ids = index.ids()
        assert sorted(ids) == expected and len(ids) == len(set(ids)) == len(index) == len(rows)
        assert "resumed an interrupted run" in r.stderr
    finally:
        index.drop()
        index.close()
