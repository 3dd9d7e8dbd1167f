"""client/index.py and client/query.py: unit tests without a server, then the real thing against Triton
(the session server of conftest.py; one test starts a second replica)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mildnet import query
from mildnet.cli import main as mildnet_main
from mildnet.commands import query as query_command
from mildnet.data.catalogue import index_entries
from mildnet.index import MAX_K, create_index, load_index
from mildnet.index import builder as indexer

ROOT = Path(__file__).resolve().parents[1]
INDEX_PY, QUERY_PY = ROOT / "client" / "index.py", ROOT / "client" / "query.py"



def run(script: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def grocery_rows(grocery_root: Path, per_class: int, classes: int) -> list[tuple[Path, str, str]]:
    """(photo, fine class, coarse class) for the first ``per_class`` photos of ``classes`` fine classes."""
    out, counts = [], {}
    for line in (grocery_root / "dataset" / "train.txt").read_text().splitlines():
        rel = line.split(",")[0].strip()
        parts = Path(rel).parts  # train/<group>/<coarse>/[<fine>/]file.jpg
        fine, coarse = parts[-2], parts[2]
        if counts.get(fine, 0) < per_class and (fine in counts or len(counts) < classes):
            counts[fine] = counts.get(fine, 0) + 1
            out.append((grocery_root / "dataset" / rel, fine, coarse))
    return out


def write_catalogue(folder: Path, rows, name: str = "catalogue.csv", bad: int = 0) -> Path:
    """Copy the photos under ``folder/images`` and write a CSV catalogue (plus ``bad`` corrupt images)."""
    import csv

    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for photo, fine, coarse in rows:
        dest = folder / "images" / photo.name
        shutil.copyfile(photo, dest)
        lines.append({"path": f"images/{photo.name}", "item_id": fine, "category": coarse,
                      "note": f"<b>{fine}</b> & co"})
    for i in range(bad):
        (folder / "images" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
        lines.append({"path": f"images/broken{i}.jpg", "item_id": "broken", "category": "Broken", "note": ""})
    path = folder / name
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "item_id", "category", "note"])
        w.writeheader()
        w.writerows(lines)
    return path


# ---- no server ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pairs,expected", [
    (["category=Apple"], {"category": "Apple"}),
    (["category=a=b", "rank:=2"], {"category": "a=b", "rank": 2}),
    (["ok:=true"], {"ok": True}),
    ([], None),
])
def test_parse_filter(pairs, expected):
    assert query.parse_filter(pairs) == expected


@pytest.mark.parametrize("pairs,message", [(["category"], "KEY=VALUE"), (["=x"], "empty key"),
                                           (["n:=oops"], "not a JSON value")])
def test_parse_filter_errors(pairs, message):
    with pytest.raises(ValueError, match=message):
        query.parse_filter(pairs)


def test_query_k_bounds(tmp_path):
    """--k: 1..MAX_K (argparse, exit 2); a k above the catalogue size is fine (min(k, n) results)."""
    assert query_command.parse_args(["q.jpg", "--k", str(MAX_K)]).k == MAX_K
    for bad in ("0", str(MAX_K + 1)):
        with pytest.raises(SystemExit) as e:
            query_command.parse_args(["q.jpg", "--k", bad])
        assert e.value.code == 2


@pytest.mark.parametrize("argv,code,message", [
    (["query", "missing.jpg"], 1, "mildnet query: error: missing.jpg: no such image file"),
    (["query", "q.jpg", "--k", "0"], 2, "--k must be >= 1"),
    (["index", "--out", "x.mindex"], 2, "mildnet index: error: a CATALOGUE is needed"),
    (["index", "cat.csv", "--out", "x.mindex", "--backend", "milvus"], 2, "--backend milvus needs --milvus-uri"),
])
def test_mildnet_query_and_index_commands_check_input(argv, code, message, capsys, monkeypatch, tmp_path):
    """`mildnet query` / `mildnet index` (the console scripts of an installed wheel) refuse bad input with a
    message naming it, before any server is contacted."""
    monkeypatch.chdir(tmp_path)
    try:
        got = mildnet_main(argv)
    except SystemExit as e:  # argparse's own usage errors
        got = e.code
    assert got == code
    assert message in capsys.readouterr().err


def test_table_and_contact_sheets_escape_text(tmp_path, grocery_photos):
    from mildnet.index import Hit

    evil = '<script>alert("x")</script>'
    hits = [Hit("a&b", 0.9, {"path": str(grocery_photos[0]), "category": evil}),
            Hit("missing", 0.5, {"path": str(tmp_path / "gone.jpg"), "category": "x"})]
    rows = query.hit_rows(hits)
    table = query.format_table(rows)
    assert table.splitlines()[0].split() == ["rank", "id", "score", "image", "metadata"]
    assert "0.9000" in table and "a&b" in table
    page = tmp_path / "sheet.html"
    query.write_html(page, grocery_photos[1], grocery_photos[1].read_bytes(), rows, title=f"q {evil}")
    text = page.read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text and "a&amp;b" in text
    assert text.count("data:image/jpeg;base64,") == 2 and "no image" in text  # query + 1 result + 1 missing
    png = tmp_path / "sheet.png"
    query.write_png(png, grocery_photos[1].read_bytes(), rows)
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 2 * query.THUMB


def test_journal_drops_torn_record(tmp_path):
    j = indexer.Journal(tmp_path / "x.mindex.journal")
    j.start("m-1", 4)
    v = np.eye(4, dtype=np.float32)
    j.append(["a", "b"], [{}, {}], v[:2])
    j.append(["c"], [{"k": 1}], v[2:3])
    good_size = j.path.stat().st_size
    with open(j.path, "a") as f:
        f.write('{"ids": ["d"], "metadata": [{}], "vectors": "AAAA')  # kill -9 mid-write
    got = list(j.replay("m-1", 4))
    assert [ids for ids, _, _ in got] == [["a", "b"], ["c"]]
    np.testing.assert_array_equal(got[1][2], v[2:3])
    assert j.path.stat().st_size == good_size
    with pytest.raises(ValueError, match="model version 'm-1'"):
        list(j.replay("m-2", 4))


def test_index_entries_ids_and_metadata(tmp_path, grocery_root):
    """index.py reads catalogues only through mildnet.data.catalogue.index_entries."""
    assert index_entries is index_entries
    cat = write_catalogue(tmp_path, grocery_rows(grocery_root, 2, 2))
    entries = index_entries(str(cat))
    assert [e[0] for e in entries] == [f"images/{p.name}" for p, _, _ in grocery_rows(grocery_root, 2, 2)]
    meta = entries[0][2]
    assert meta["category"] == "Apple" and meta["item_id"] == "Golden-Delicious"
    assert not Path(meta["path"]).is_absolute() and (cat.parent / meta["path"]).is_file()  # relative to the root
    assert meta["note"] == "<b>Golden-Delicious</b> & co"


def test_index_entries_from_a_folder_tree(tmp_path, grocery_photos):
    for i, p in enumerate(grocery_photos[:4]):
        (tmp_path / ("Apple" if i < 2 else "Milk")).mkdir(exist_ok=True)
        shutil.copyfile(p, tmp_path / ("Apple" if i < 2 else "Milk") / p.name)
    entries = index_entries(str(tmp_path))
    assert sorted(e[0] for e in entries) == sorted(
        f"{'Apple' if i < 2 else 'Milk'}/{p.name}" for i, p in enumerate(grocery_photos[:4]))
    assert all(e[0].split("/")[0] in (e[2]["category"], e[2]["item_id"]) for e in entries)


class FakeEmbedder:
    """Stands in for TritonEmbedder in unit tests of the resume logic: a deterministic vector per image, a
    log of what was sent, and a crash after ``crash_after`` images (like a kill -9 of the indexer)."""

    urls = ["fake:0"]

    def __init__(self, crash_after: int | None = None, version: str = "fake-1"):
        self.sent: list[bytes] = []
        self.crash_after, self.version = crash_after, version

    def model_info(self, url=None):
        from types import SimpleNamespace

        return SimpleNamespace(model_version=self.version, embedding_dim=8)

    def embed_each(self, images):
        out = []
        for img in images:
            if self.crash_after is not None and len(self.sent) >= self.crash_after:
                raise KeyboardInterrupt("simulated crash")
            self.sent.append(img)
            v = np.random.default_rng(int.from_bytes(img[-8:], "little")).standard_normal(8).astype(np.float32)
            out.append(v / np.linalg.norm(v))
        return out


def fake_entries(tmp_path: Path, n: int) -> list:
    (tmp_path / "img").mkdir(exist_ok=True)
    entries = []
    for i in range(n):
        p = tmp_path / "img" / f"{i}.jpg"
        p.write_bytes(f"image number {i:08d}".encode())
        entries.append((f"id-{i}", p, {"category": "even" if i % 2 == 0 else "odd", "path": str(p)}))
    return entries


@pytest.mark.parametrize("crash_after", [0, 7, 13, 20, 29])
def test_resume_after_crash_embeds_each_item_once(tmp_path, crash_after):
    entries, out = fake_entries(tmp_path, 30), tmp_path / "cat.mindex"
    first = FakeEmbedder(crash_after=crash_after)
    with pytest.raises(KeyboardInterrupt):
        indexer.build_index(entries, out, first, chunk=3, checkpoint_every=6, progress=False)
    assert not out.exists()
    second = FakeEmbedder()
    stats = indexer.build_index(entries, out, second, chunk=3, checkpoint_every=6, progress=False)
    index = load_index(out)
    assert sorted(index.ids()) == sorted(e[0] for e in entries)
    journaled = crash_after // 3 * 3  # whole chunks reached the journal; the torn chunk is re-sent
    assert stats["recovered"] == journaled and stats["embedded"] == 30 - journaled
    assert sorted(first.sent[:journaled] + second.sent) == sorted(e[1].read_bytes() for e in entries)
    assert not list(tmp_path.glob("cat.mindex.*"))


def test_crash_between_checkpoint_and_journal_reset(tmp_path, monkeypatch):
    """Journal records already folded into .partial must not be added twice."""
    entries, out = fake_entries(tmp_path, 12), tmp_path / "cat.mindex"
    calls = {"n": 0}
    real_start = indexer.Journal.start

    def start_then_crash(self, *a):
        calls["n"] += 1
        if calls["n"] == 2:  # the first checkpoint: .partial is saved, the journal not yet emptied
            raise KeyboardInterrupt("crash after the checkpoint")
        real_start(self, *a)

    monkeypatch.setattr(indexer.Journal, "start", start_then_crash)
    with pytest.raises(KeyboardInterrupt):
        indexer.build_index(entries, out, FakeEmbedder(), chunk=2, checkpoint_every=4, progress=False)
    monkeypatch.setattr(indexer.Journal, "start", real_start)
    assert len(load_index(out.with_name(out.name + ".partial"))) == 4
    second = FakeEmbedder()
    stats = indexer.build_index(entries, out, second, chunk=2, checkpoint_every=4, progress=False)
    assert len(load_index(out)) == 12 and stats["recovered"] == 4 and len(second.sent) == 8


def test_resume_refuses_another_model_version(tmp_path):
    entries, out = fake_entries(tmp_path, 10), tmp_path / "cat.mindex"
    with pytest.raises(KeyboardInterrupt):
        indexer.build_index(entries, out, FakeEmbedder(crash_after=5), chunk=2, progress=False)
    with pytest.raises(ValueError, match="fake-1.*fake-2"):
        indexer.build_index(entries, out, FakeEmbedder(version="fake-2"), chunk=2, progress=False)


# ---- a real server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def catalogue_rows(grocery_root):
    return grocery_rows(grocery_root, per_class=3, classes=8)  # 24 photos, 8 products, 3 categories+


@pytest.fixture(scope="module")
def built_index(tmp_path_factory, triton_server, catalogue_rows):
    """client/index.py over a 24-photo catalogue with one corrupt image, through the real server."""
    folder = tmp_path_factory.mktemp("catalogue")
    cat = write_catalogue(folder, catalogue_rows, bad=1)
    out = folder / "catalogue.mindex"
    r = run(INDEX_PY, cat, "--out", out, "--url", triton_server.http_url, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    return cat, out, json.loads(r.stdout), r.stderr


@pytest.fixture(scope="module")
def remote(triton_server):
    from mildnet.serving.client import TritonEmbedder

    with TritonEmbedder(triton_server.http_url, concurrency=4) as r:
        yield r


@pytest.mark.server
def test_index_build_skips_bad_image_and_records_model(built_index, remote, catalogue_rows):
    cat, out, stats, stderr = built_index
    assert stats["items"] == len(catalogue_rows) and stats["skipped"] == ["images/broken0.jpg"]
    assert "skipping images/broken0.jpg" in stderr
    index = load_index(out)
    assert index.model_version == remote.model_info().model_version and len(index) == len(catalogue_rows)
    assert not out.with_name(out.name + ".journal").exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.server
def test_every_catalogue_image_finds_itself_first(built_index, remote, catalogue_rows):
    _, out, _, _ = built_index
    index = load_index(out)
    vectors = remote.embed([p.read_bytes() for p, _, _ in catalogue_rows])
    hits = index.search(vectors, k=5)
    assert [h[0].id for h in hits] == [f"images/{p.name}" for p, _, _ in catalogue_rows]
    assert all(len(h) == 5 for h in hits)


@pytest.mark.server
@pytest.mark.parametrize("k", [1, 7])
def test_query_script_local_index_filter_and_k(built_index, triton_server, catalogue_rows, k):
    _, out, _, _ = built_index
    photo, fine, coarse = catalogue_rows[4]
    r = run(QUERY_PY, photo, "--index", out, "--url", triton_server.http_url, "--k", k,
            "--filter", f"category={coarse}", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)["hits"]
    n_match = sum(1 for _, _, c in catalogue_rows if c == coarse)
    assert len(hits) == min(k, n_match)
    assert hits[0]["id"] == f"images/{photo.name}" and hits[0]["rank"] == 1
    assert all(h["metadata"]["category"] == coarse for h in hits)


@pytest.mark.server
def test_query_script_server_side_similar_table_and_sheets(tmp_path, triton_server, catalogue_index,
                                                           grocery_photos):
    _, ids, _ = catalogue_index  # the index the session server's `similar` serves
    html_out, png_out = tmp_path / "q.html", tmp_path / "q.png"
    r = run(QUERY_PY, grocery_photos[2], "--url", triton_server.http_url, "--k", 4, "--html", html_out,
            "--png", png_out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["rank", "id", "score"] and len(lines) == 2 + 4
    assert lines[2].split()[:2] == ["1", grocery_photos[2].stem]
    assert html_out.stat().st_size > 1000 and png_out.stat().st_size > 1000
    r = run(QUERY_PY, grocery_photos[2], "--url", triton_server.grpc_url, "--protocol", "grpc", "--k", 2, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["hits"][0]["id"] == grocery_photos[2].stem


@pytest.mark.server
def test_query_script_clear_errors(tmp_path, triton_server, grocery_photos, built_index):
    from mildnet.serving.server import free_port

    r = run(QUERY_PY, grocery_photos[0], "--url", f"127.0.0.1:{free_port()}")
    assert r.returncode == 3 and "cannot reach Triton" in r.stderr and "Traceback" not in r.stderr
    text = tmp_path / "notes.jpg"
    text.write_text("<html>not an image</html>")
    r = run(QUERY_PY, text, "--url", triton_server.http_url)
    assert r.returncode == 1 and "not a recognised image" in r.stderr and "Traceback" not in r.stderr
    r = run(QUERY_PY, tmp_path / "nope.jpg", "--url", triton_server.http_url)
    assert r.returncode == 1 and "no such image file" in r.stderr
    r = run(QUERY_PY, grocery_photos[0], "--url", triton_server.http_url, "--index", built_index[1],
            "--filter", "colour=red")
    assert r.returncode == 1 and "unknown filter key" in r.stderr and "Traceback" not in r.stderr
    damaged = tmp_path / "damaged.mindex"
    damaged.write_bytes(built_index[1].read_bytes()[:-10])
    r = run(QUERY_PY, grocery_photos[0], "--url", triton_server.http_url, "--index", damaged)
    assert r.returncode == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.server
def test_add_and_delete_by_id(tmp_path, triton_server, built_index, grocery_root, catalogue_rows, remote):
    _, built, _, _ = built_index
    out = tmp_path / "cat.mindex"
    shutil.copyfile(built, out)
    extra = [r for r in grocery_rows(grocery_root, 1, 12) if r[0] not in {p for p, _, _ in catalogue_rows}][:3]
    more = write_catalogue(tmp_path, extra, name="more.csv")
    r = run(INDEX_PY, more, "--out", out, "--url", triton_server.http_url, "--no-progress")
    assert r.returncode == 1 and "--add" in r.stderr  # never silently overwrites or merges
    r = run(INDEX_PY, more, "--out", out, "--add", "--url", triton_server.http_url, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["embedded"] == 3  # only the new ones went to the server
    index = load_index(out)
    assert len(index) == len(catalogue_rows) + 3
    new_ids = [f"images/{p.name}" for p, _, _ in extra]
    hits = index.search(remote.embed([p.read_bytes() for p, _, _ in extra]), k=1)
    assert [h[0].id for h in hits] == new_ids
    r = run(INDEX_PY, "--out", out, "--delete", new_ids[0], new_ids[1])
    assert r.returncode == 0, r.stderr
    index = load_index(out)
    assert len(index) == len(catalogue_rows) + 1 and new_ids[0] not in index and new_ids[2] in index
    r = run(INDEX_PY, "--out", out, "--delete", "no-such-id")
    assert r.returncode == 1 and "not in the index" in r.stderr


@pytest.mark.server
def test_refuses_other_model_version(tmp_path, triton_server, built_index, remote):
    cat = built_index[0]
    out = tmp_path / "old.mindex"
    old = create_index(remote.model_info().embedding_dim, model_version="mildnet_mobile-000000000000")
    old.add(["x"], np.eye(1, old.dim, dtype=np.float32))
    old.save(out)
    r = run(INDEX_PY, cat, "--out", out, "--add", "--url", triton_server.http_url, "--no-progress")
    assert r.returncode == 1 and "mildnet_mobile-000000000000" in r.stderr and "Traceback" not in r.stderr
    r = run(QUERY_PY, cat.parent / "images" / sorted(os.listdir(cat.parent / "images"))[0], "--index", out,
            "--url", triton_server.http_url)
    assert r.returncode == 1 and "not comparable" in r.stderr
    assert len(load_index(out)) == 1  # untouched


def settled_count(metrics_url: str, model: str, timeout: float = 20.0) -> float:
    """Triton refreshes counters every ~2 s: read until two reads agree."""
    from mildnet.serving.client import model_metrics

    last, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = model_metrics(metrics_url, model)["inference_count"]
        if now == last:
            return now
        last = now
        time.sleep(2.5)
    raise AssertionError(f"metrics of {model} did not settle")


@pytest.mark.server
@pytest.mark.slow
def test_kill_9_mid_run_then_resume_holds_each_item_once(tmp_path, triton_server, grocery_root):
    rows = grocery_rows(grocery_root, per_class=5, classes=16)  # 80 photos
    cat = write_catalogue(tmp_path, rows)
    out = tmp_path / "cat.mindex"
    journal = out.with_name(out.name + ".journal")
    before = settled_count(triton_server.metrics_url, "mildnet_ensemble")
    args = [sys.executable, str(INDEX_PY), str(cat), "--out", str(out), "--url", triton_server.http_url,
            "--chunk", "1", "--concurrency", "1", "--checkpoint-every", "10", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        # kill between checkpoints: .partial written, the emptied journal holds 3..7 batches again
        records = journal.read_bytes().count(b"\n") - 1 if journal.exists() else 0
        if out.with_name(out.name + ".partial").exists() and 3 <= records <= 7:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the indexer finished before it could be killed"
    assert not out.exists()

    r = run(INDEX_PY, cat, "--out", out, "--url", triton_server.http_url, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    index = load_index(out)
    expected = [f"images/{p.name}" for p, _, _ in rows]
    assert sorted(index.ids()) == sorted(expected) and len(index) == len(rows)  # each exactly once
    assert stats["recovered"] >= 13 and stats["recovered"] + stats["embedded"] == len(rows)
    assert "resumed an interrupted run" in r.stderr
    after = settled_count(triton_server.metrics_url, "mildnet_ensemble")
    # nothing journaled was sent again: at most the one request in flight at the kill is repeated
    assert len(rows) <= after - before <= len(rows) + 1
    hits = index.search(np.stack([index.get(i)[0] for i in expected]), k=1)
    assert [h[0].id for h in hits] == expected


@pytest.mark.server
@pytest.mark.skipif(os.environ.get("MILDNET_SKIP_MILVUS") == "1", reason="MILDNET_SKIP_MILVUS=1: Milvus opted out")
def test_milvus_backend_through_the_client(tmp_path, triton_server, built_index, catalogue_rows):
    cat, faiss_out, _, _ = built_index
    out = tmp_path / "milvus.mindex"
    r = run(INDEX_PY, cat, "--out", out, "--backend", "milvus", "--milvus-uri", tmp_path / "milvus.db",
            "--collection", "grocery", "--url", triton_server.http_url, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    photo = catalogue_rows[10][0]
    got = {}
    for name, path in (("milvus", out), ("faiss", faiss_out)):
        r = run(QUERY_PY, photo, "--index", path, "--url", triton_server.http_url, "--k", 5, "--json")
        assert r.returncode == 0, r.stderr
        got[name] = [(h["id"], round(h["score"], 4)) for h in json.loads(r.stdout)["hits"]]
    assert got["milvus"] == got["faiss"] and got["milvus"][0][0] == f"images/{photo.name}"


@pytest.mark.server
@pytest.mark.slow
def test_two_replicas_share_the_indexing_load(tmp_path, triton_server, served_repository, catalogue_rows):
    from mildnet.serving.server import TritonServer

    repo, _, _ = served_repository
    cat = write_catalogue(tmp_path, catalogue_rows)
    out = tmp_path / "cat.mindex"
    with TritonServer(repo, log_file=tmp_path / "replica2.log") as second:
        servers = (triton_server, second)
        before = [settled_count(s.metrics_url, "mildnet_ensemble") for s in servers]
        r = run(INDEX_PY, cat, "--out", out, "--url", servers[0].http_url, "--url", servers[1].http_url,
                "--json", "--no-progress")
        assert r.returncode == 0, r.stderr
        served = [settled_count(s.metrics_url, "mildnet_ensemble") - b for s, b in zip(servers, before)]
        r = run(QUERY_PY, catalogue_rows[0][0], "--index", out, "--url", servers[1].http_url,
                "--url", servers[0].http_url, "--json")
        assert r.returncode == 0, r.stderr
    assert sum(served) == len(catalogue_rows) and min(served) >= len(catalogue_rows) // 3, served
    assert json.loads(r.stdout)["hits"][0]["id"] == f"images/{catalogue_rows[0][0].name}"
