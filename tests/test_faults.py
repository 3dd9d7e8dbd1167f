"""Faults, with nothing lost: the server killed (-9) under load and restarted, the indexer killed at random
points and rerun, the disk filling up while an index or checkpoint is saved, and readers racing writers
(threads on one Index, and the ``similar`` model reloading an index file that keeps changing)."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mildnet.imageio import preprocess
from mildnet.index import create_index, load_index
from mildnet.serving.client import ServerUnavailable, TritonEmbedder

ROOT = Path(__file__).resolve().parents[1]


def in_process(model, images) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.stack([preprocess(b, model.spec) for b in images])).numpy()


def descendants(pid: int) -> list[int]:
    """Live children (recursively) of ``pid``: Triton's Python backend stubs."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids + [g for k in kids for g in descendants(k)]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- kill -9 the server during a load run ---------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.slow
def test_server_killed_during_load_then_restarted(served_repository, catalogue_index, grocery_photos, tmp_path):
    """kill -9 tritonserver while HTTP and gRPC clients send requests: every failure is a clear
    ServerUnavailable (no hang, no wrong answer); TritonServer.stop() then leaves none of its stubs; after a
    restart on the same ports the SAME client objects get the same embeddings and hits as before."""
    from mildnet.serving.server import TritonServer, free_port

    repo, model, _ = served_repository
    photos = [p.read_bytes() for p in grocery_photos[:4]]
    want = in_process(model, photos)
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          model_control_mode="none", log_file=tmp_path / "tritonserver.log")
    server.start()
    clients = [TritonEmbedder(server.http_url, "http", timeout=15),
               TritonEmbedder(server.grpc_url, "grpc", timeout=15)]
    try:
        hits_before = [c.similar(photos[0], k=3) for c in clients]
        outcomes: list[tuple[str, str]] = []  # (kind, detail)
        stop = threading.Event()

        def load(client, offset):
            i = offset
            while not stop.is_set():
                j = i % len(photos)
                try:
                    got = client.embed_one(photos[j])
                    outcomes.append(("ok", "") if np.allclose(got, want[j], atol=2e-5) else ("wrong", str(j)))
                except ServerUnavailable as e:
                    outcomes.append(("unavailable", str(e)))
                    time.sleep(0.05)
                except Exception as e:  # noqa: BLE001 - anything else is what this test looks for
                    outcomes.append((type(e).__name__, str(e)[:300]))
                i += 1

        threads = [threading.Thread(target=load, args=(c, n)) for n, c in enumerate(clients * 2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(k == "ok" for k, _ in outcomes) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        pid, stubs = server.process.pid, descendants(server.process.pid)
        assert stubs, "expected Python backend stub processes under tritonserver"
        os.kill(pid, signal.SIGKILL)  # a crash: the server only, as the kernel's OOM killer would
        server.process.wait()
        killed_at = len(outcomes)
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a client hung after the server died"
        assert sum(k == "ok" for k, _ in outcomes[:killed_at]) >= 20
        assert not any(k == "wrong" for k, _ in outcomes), "a wrong embedding came back"
        assert any(k == "unavailable" for k, _ in outcomes[killed_at:]), "no request noticed the dead server"

        # Triton's stubs may outlive a killed server for minutes (seen: > 60 s); TritonServer.stop(), what a
        # supervisor calls after a crash, must clear the dead server's whole process group.
        assert server.stop() == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while any(alive(s) for s in stubs) and time.monotonic() < deadline:
            time.sleep(0.2)
        orphans = {s: Path(f"/proc/{s}/cmdline").read_bytes().replace(b"\0", b" ").decode()[-160:]
                   for s in stubs if alive(s)}
        for s in orphans:
            os.kill(s, signal.SIGKILL)

        server.start()  # same ports: the clients keep their URLs
        for c, before in zip(clients, hits_before):
            np.testing.assert_allclose(c.embed(photos), want, atol=2e-5, rtol=1e-4)
            after = c.similar(photos[0], k=3)
            assert [h.id for h in after] == [h.id for h in before]
            np.testing.assert_allclose([h.score for h in after], [h.score for h in before], atol=1e-5)
        # Last, so the checks above run either way: EVERY failure during the crash must read as the server
        # being unreachable, never as a refused input (client/index.py would skip such an image as "bad").
        assert not orphans, f"Python stubs outlived TritonServer.stop() of the killed server: {orphans}"
        unclear = [o for o in outcomes if o[0] != "ok" and o[0] != "unavailable"]
        assert not unclear, f"{len(unclear)} failures not reported as ServerUnavailable, e.g. {unclear[:3]}"
        assert all("cannot reach Triton at" in d for k, d in outcomes if k == "unavailable")
    finally:
        for c in clients:
            c.close()
        server.stop()


def test_stop_kills_the_process_group_of_a_dead_server(tmp_path):
    """The same without Triton: a server process is kill -9'd, its children (the stubs) live on as orphans;
    TritonServer.stop() still kills them."""
    from mildnet.serving.server import TritonServer

    server = TritonServer(tmp_path)
    server.process = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(descendants(server.process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    kids = descendants(server.process.pid)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    assert len(kids) == 2 and all(alive(k) for k in kids)  # orphans, like Triton's stubs after a crash
    assert server.stop() == -signal.SIGKILL and server.process is None
    deadline = time.monotonic() + 5
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(k) for k in kids), "stop() left the dead server's children running"


@pytest.mark.parametrize("exc,unreachable", [
    (ConnectionRefusedError(111, "Connection refused"), True),
    (Exception("[Errno 111] failed to connect"), True),
    (Exception("connection closed."), True),  # geventhttpclient: the server died with an HTTP request in flight
    (type("HTTPConnectionClosed", (Exception,), {})("connection closed."), True),
    (Exception("Socket closed"), True),  # gRPC, server gone mid-call
    (Exception("Connection reset by peer"), True),
    (Exception("Broken pipe"), True),
    (Exception("Stream removed"), True),
    (type("RemoteDisconnected", (Exception,), {})("Remote end closed connection without response"), True),
    (Exception("image: corrupt or truncated JPEG (...)"), False),
    (Exception("exceeds maximum queue size"), False),  # overload is the server answering, not down
])
def test_errors_meaning_server_down_are_server_unavailable(exc, unreachable):
    from mildnet.serving.client import RemoteInferenceError, _classify

    got = _classify(exc, "127.0.0.1:1", "mildnet_ensemble")
    assert isinstance(got, ServerUnavailable if unreachable else RemoteInferenceError), repr(got)


# -- kill the indexer at random points --------------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.slow
def test_indexer_killed_at_random_points_then_rerun(triton_server, served_repository, grocery_root, tmp_path):
    """client/index.py is kill -9'd at up to 4 random moments (seeded) while it embeds, journals, checkpoints
    and saves; a plain rerun then finishes with every catalogue item exactly once, each with its right vector."""
    _, model, _ = served_repository
    listing = (grocery_root / "dataset" / "train.txt").read_text().splitlines()
    sources = [grocery_root / "dataset" / line.split(",")[0].strip() for line in listing[::8][:150]]
    folder = tmp_path / "catalogue"
    (folder / "img").mkdir(parents=True)
    rows = ["path,item_id,category"]
    for i, src in enumerate(sources):
        (folder / "img" / f"{i:03d}.jpg").write_bytes(src.read_bytes())
        rows.append(f"img/{i:03d}.jpg,item{i},cat{i % 3}")
    (folder / "cat.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "cat.mindex"
    cmd = [sys.executable, "client/index.py", str(folder / "cat.csv"), "--out", str(out), "--url",
           triton_server.http_url, "--chunk", "1", "--checkpoint-every", "5", "--no-progress"]
    journal, partial = out.with_name(out.name + ".journal"), out.with_name(out.name + ".partial")

    def progress_mark():
        return tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None for p in (journal, partial, out))

    rng = np.random.default_rng(8)
    kills = attempts = 0
    while kills < 4 and attempts < 8:
        attempts += 1
        mark = progress_mark()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while progress_mark() == mark and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # imports take seconds: wait until this run writes, then pick a random moment
        time.sleep(float(rng.uniform(0.0, 0.3)))  # the whole run takes ~2 s on a quiet machine
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
        if proc.returncode == 0:
            break
    assert kills >= 2, f"the indexer finished before it could be killed twice ({kills} kills): a bigger catalogue"

    resuming = journal.exists() or partial.exists() or not out.exists()
    final = subprocess.run(cmd + ([] if resuming else ["--add"]), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert not journal.exists() and not partial.exists()
    index = load_index(out)
    ids = index.ids()
    expected = [f"img/{i:03d}.jpg" for i in range(len(sources))]
    assert sorted(ids) == expected and len(ids) == len(set(ids)) == len(index)  # every item exactly once
    want = in_process(model, [src.read_bytes() for src in sources])
    got = np.stack([index.get(i)[0] for i in expected])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)  # each id holds its own image's vector
    assert index.get("img/005.jpg")[1]["item_id"] == "item5"


# -- disk full while saving -------------------------------------------------------------------------------------------
def small_and_big_index():
    rng = np.random.default_rng(0)

    def make(n):
        v = rng.standard_normal((n, 64)).astype(np.float32)
        index = create_index(64, kind="flat", model_version="m")
        index.add([f"id{i}" for i in range(n)], v / np.linalg.norm(v, axis=1, keepdims=True),
                  [{"n": i} for i in range(n)])
        return index

    return make(10), make(2000)  # ~3 KB and ~600 KB on disk


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 256 KB tmpfs (needs root / CAP_SYS_ADMIN); skipped where it cannot be mounted, in which case
    test_disk_full_by_rlimit still runs the same checks with a real kernel write error."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:100]})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_while_saving_index_keeps_previous(tiny_disk):
    small, big = small_and_big_index()
    path = tiny_disk / "catalogue.mindex"
    small.save(path)
    before = path.read_bytes()
    with pytest.raises(OSError) as e:
        big.save(path)
    assert e.value.errno == errno.ENOSPC and str(path) in str(e.value)  # says why, names the file
    assert path.read_bytes() == before and load_index(path).ids() == small.ids()  # intact and loadable
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["catalogue.mindex"]  # no temp file left


def test_disk_full_while_saving_checkpoint_keeps_previous(tiny_disk):
    from mildnet.checkpoint import atomic_torch_save

    path = tiny_disk / "best.pt"
    atomic_torch_save({"step": 1, "w": torch.ones(100)}, path)
    with pytest.raises(Exception) as e:
        atomic_torch_save({"step": 2, "w": torch.ones(200_000)}, path)  # 800 KB
    got = torch.load(path, weights_only=True)
    assert got["step"] == 1 and torch.equal(got["w"], torch.ones(100))  # previous checkpoint intact
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["best.pt"]  # no temp file left
    # ...and the error says why. torch.save turns ENOSPC into "[enforce fail at inline_container.cc] unexpected
    # pos": atomic_torch_save re-raises the OSError underneath, naming the file.
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC, f"unclear error: {e.value!r}"
    assert str(path) in str(e.value), e.value


RLIMIT_SCRIPT = textwrap.dedent("""
    import errno, resource, signal, sys
    import numpy as np
    from mildnet.index import create_index, load_index
    def make(n):
        v = np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)
        index = create_index(64, kind="flat", model_version="m")
        index.add([f"id{i}" for i in range(n)], v / np.linalg.norm(v, axis=1, keepdims=True))
        return index
    small, big = make(10), make(2000)
    path = sys.argv[1]
    small.save(path)
    before = open(path, "rb").read()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
        big.save(path)
    except OSError as e:
        assert e.errno == errno.EFBIG, e
    else:
        raise SystemExit("saving past RLIMIT_FSIZE did not fail")
    assert open(path, "rb").read() == before and load_index(path).ids() == small.ids()
    print("previous index intact")
""")


def test_disk_full_by_rlimit(tmp_path):
    """The same as the tmpfs test without root: the kernel refuses writes past RLIMIT_FSIZE (EFBIG)."""
    r = subprocess.run([sys.executable, "-c", RLIMIT_SCRIPT, str(tmp_path / "c.mindex")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "previous index intact" in r.stdout, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mindex"]


# -- readers racing writers -------------------------------------------------------------------------------------------
RACE_SCRIPT = textwrap.dedent("""
    import json, sys, threading
    import numpy as np
    from mildnet.index import create_index

    D = 32
    def vec(i):
        v = np.random.default_rng(i).standard_normal(D).astype(np.float32)
        return v / np.linalg.norm(v)

    index = create_index(D, kind=sys.argv[1], model_version="m")
    stable = [f"s{i}" for i in range(40)]
    index.add(stable, np.stack([vec(i) for i in range(40)]), [{"id": s, "group": "stable"} for s in stable])
    errors, stop = [], threading.Event()

    def writer():  # adds and deletes batches of items, endlessly
        n = 1000
        try:
            while not stop.is_set():
                ids = [f"t{n + j}" for j in range(4)]
                index.add(ids, np.stack([vec(n + j) for j in range(4)]), [{"id": i, "group": "temp"} for i in ids])
                index.remove(ids)
                n += 4
        except Exception as e:
            errors.append(f"writer: {type(e).__name__}: {e}")

    def reader(t):
        for r in range(1500):
            i = (r * 7 + t) % 40
            try:
                hits = index.search(vec(i)[None], k=5, filter={"group": "stable"} if r % 2 else None)[0]
                assert hits and hits[0].id == f"s{i}", f"top hit {hits[0].id if hits else None} for s{i}"
                for h in hits:  # no torn read: id, metadata and score belong together
                    assert h.metadata["id"] == h.id, (h.id, h.metadata)
                    j = int(h.id[1:])
                    assert abs(h.score - float(vec(i) @ vec(j))) < 1e-4, (h.id, h.score)
            except Exception as e:
                errors.append(f"reader {t}: {type(e).__name__}: {e}")
                return

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(3)]
    w = threading.Thread(target=writer)
    w.start()
    for t in threads: t.start()
    for t in threads: t.join()
    stop.set(); w.join()
    print(json.dumps(errors[:5]))
""")


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_concurrent_queries_while_adding_and_deleting(kind):
    """Three reader threads search one Index while a writer adds and removes items: no exception, no
    crash, every hit consistent. Runs in a subprocess so a native crash fails this test, not the session."""
    r = subprocess.run([sys.executable, "-c", RACE_SCRIPT, kind], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"crashed (exit {r.returncode}): {r.stderr[-1500:]}"
    assert r.stdout.strip() == "[]", f"errors under concurrent add/remove/search: {r.stdout}"


@pytest.mark.server
def test_similar_reloads_a_changing_index_without_torn_reads(triton_server, catalogue_index, grocery_photos):
    """While a writer keeps replacing the served index file (two generations, atomic saves), concurrent
    `similar` queries over HTTP and gRPC all succeed, and every answer comes from ONE generation."""
    path, ids, vectors = catalogue_index
    original = path.read_bytes()
    photos = [p.read_bytes() for p in grocery_photos]
    served = load_index(path)
    meta = [served.get(i)[1] for i in ids]

    def generation(tag: str):
        index = create_index(vectors.shape[1], kind="flat", model_version=served.model_version)
        index.add([f"{tag}-{i}" for i in ids], vectors, [{**m, "gen": tag} for m in meta])
        return index

    gens = {"A": generation("A"), "B": generation("B")}
    stop, problems, answered = threading.Event(), [], []

    def writer():
        n = 0
        while not stop.is_set():
            gens["AB"[n % 2]].save(path)
            n += 1
            time.sleep(0.15)

    def reader(client):
        r = 0
        while not stop.is_set():
            i = r % len(ids)
            try:
                hits = client.similar(photos[i], k=3)
                tags = {h.metadata["gen"] for h in hits}
                if len(tags) != 1 or hits[0].id != f"{next(iter(tags))}-{ids[i]}":
                    problems.append(f"torn or wrong answer for {ids[i]}: {[(h.id, h.metadata) for h in hits]}")
                answered.append(tags.pop())
            except Exception as e:  # noqa: BLE001
                problems.append(f"{type(e).__name__}: {e}")
            r += 1

    clients = [TritonEmbedder(triton_server.http_url, "http"), TritonEmbedder(triton_server.grpc_url, "grpc")]
    try:
        gens["A"].save(path)
        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        time.sleep(12)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        tmp = path.with_name(".restore.tmp")
        tmp.write_bytes(original)
        os.replace(tmp, path)
        for c in clients:
            c.close()
    assert not problems, problems[:5]
    assert len(answered) >= 4 and set(answered) == {"A", "B"}, answered  # both generations were served
    with TritonEmbedder(triton_server.http_url) as c:  # the restored file is picked up again
        assert c.similar(photos[0], k=1)[0].id == ids[0]
