"""mildnet.index (FAISS backend) on random unit vectors: no server needed. Milvus: tests/test_index_milvus.py."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from mildnet.index import (DuplicateIdError, IndexFileError, ModelVersionError, UnknownFilterKeyError,
                           create_index, load_index)
from mildnet.index.base import MAX_K, exact_topk
from mildnet.index.store import _PREFIX

DIM = 32
CATEGORIES = ("Apple", "Milk", "Pear", "Juice")


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(n: int = 200, kind: str = "flat", seed: int = 0, **params):
    vecs = unit(n, seed=seed)
    ids = [f"item-{i}" for i in range(n)]
    meta = [{"category": CATEGORIES[i % len(CATEGORIES)], "path": f"img/{i}.jpg", "rank": i % 3} for i in range(n)]
    index = create_index(DIM, kind=kind, model_version="test:1", **params)
    index.add(ids, vecs, meta)
    return index, ids, vecs, meta


@pytest.mark.parametrize("kind", ["flat", "hnsw", "auto"])
def test_self_retrieval_rank1_and_k(kind):
    index, ids, vecs, _ = make(300, kind)
    hits = index.search(vecs, k=7)
    assert [len(h) for h in hits] == [7] * len(ids)
    assert [h[0].id for h in hits] == ids
    assert all(h[0].score == pytest.approx(1.0, abs=1e-5) for h in hits)
    assert all(a.score >= b.score for row in hits for a, b in zip(row, row[1:]))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_flat_matches_numpy_exact(kind):
    index, ids, vecs, _ = make(500, kind, hnsw_m=32, ef_search=256)
    queries = unit(20, seed=9)
    want_s, want_rows = exact_topk(vecs, queries, 10)
    got = index.search(queries, k=10)
    recall = np.mean([len({h.id for h in g} & {ids[r] for r in w}) / 10 for g, w in zip(got, want_rows)])
    assert recall >= (1.0 if kind == "flat" else 0.95)
    if kind == "flat":
        np.testing.assert_allclose([[h.score for h in g] for g in got], want_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
@pytest.mark.parametrize("category", CATEGORIES)
def test_filter_is_honoured_and_k_exact(kind, category):
    index, ids, vecs, meta = make(400, kind)
    hits = index.search(vecs[:5], k=12, filter={"category": category})
    matching = [i for i, m in zip(ids, meta) if m["category"] == category]
    for row, q in zip(hits, vecs[:5]):
        assert len(row) == 12
        assert all(h.metadata["category"] == category for h in row)
        # exactly the best 12 among the matches
        sub = np.array([ids.index(i) for i in matching])
        s, r = exact_topk(vecs[sub], q[None], 12)
        if kind == "flat":
            assert [h.id for h in row] == [matching[j] for j in r[0]]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_rare_filter_returns_all_matches(kind):
    index, ids, vecs, meta = make(300, kind)
    index.add(["rare-1", "rare-2"], unit(2, seed=5), [{"category": "Rare"}, {"category": "Rare"}])
    hits = index.search(vecs[:3], k=10, filter={"category": "Rare"})
    assert [sorted(h.id for h in row) for row in hits] == [["rare-1", "rare-2"]] * 3


def test_filter_two_keys_and_type_exact():
    index, ids, vecs, meta = make(120)
    row = index.search(vecs[0], k=50, filter={"category": "Apple", "rank": 0})[0]
    assert row and all(h.metadata["category"] == "Apple" and h.metadata["rank"] == 0 for h in row)
    assert len(row) == sum(1 for m in meta if m["category"] == "Apple" and m["rank"] == 0)
    assert index.search(vecs[0], k=5, filter={"rank": "0"}) == [[]]  # "0" is not 0
    assert index.search(vecs[0], k=5, filter={"category": "Nope"}) == [[]]


def test_unknown_filter_key_is_a_clear_error():
    index, *_ = make(20)
    with pytest.raises(UnknownFilterKeyError, match="colour.*category"):
        index.search(unit(1), k=3, filter={"colour": "red"})


def test_k_larger_than_index_and_bad_k():
    index, ids, vecs, _ = make(5)
    assert len(index.search(vecs[0], k=50)[0]) == 5
    assert index.search(vecs[0], k=MAX_K) == index.search(vecs[0], k=5)  # min(k, n), up to the cap
    with pytest.raises(ValueError, match=f"k must be at most {MAX_K}"):
        index.search(vecs[0], k=MAX_K + 1)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            index.search(vecs[0], k=bad)
    with pytest.raises(ValueError, match=r"shape \[N, 32\]"):
        index.search(np.zeros((1, 8), np.float32), k=1)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_remove_and_add_by_id_without_rebuild(kind):
    index, ids, vecs, _ = make(200, kind)
    faiss_obj = index._index
    assert index.remove(["item-3", "item-7"]) == 2
    assert len(index) == 198 and "item-3" not in index
    hits = index.search(vecs[[3, 7]], k=5)
    assert all(h.id not in ("item-3", "item-7") for row in hits for h in row)
    assert all(len(row) == 5 for row in hits)
    # filtered search must not resurrect removed items either
    cat = index.search(vecs[3], k=200, filter={"category": CATEGORIES[3 % 4]})[0]
    assert "item-3" not in {h.id for h in cat} and len(cat) == 48  # 50 Juice minus items 3 and 7
    index.add(["new"], vecs[3:4], [{"category": "Apple"}])
    assert index.search(vecs[3], k=1)[0][0].id == "new"
    assert index._index is faiss_obj  # no rebuild happened
    with pytest.raises(ValueError, match="not in the index"):
        index.remove(["missing"])


def test_duplicate_ids_refused():
    index, ids, vecs, _ = make(10)
    with pytest.raises(DuplicateIdError, match="item-1"):
        index.add(["item-1"], vecs[:1])
    with pytest.raises(DuplicateIdError, match="more than once"):
        index.add(["x", "x"], vecs[:2])
    assert len(index) == 10


def test_model_version_mixing_refused():
    index, ids, vecs, _ = make(10)
    with pytest.raises(ModelVersionError, match="other:2"):
        index.add(["z"], vecs[:1], model_version="other:2")
    index.add(["z"], vecs[:1], model_version="test:1")
    assert len(index) == 11


def test_bad_inputs():
    with pytest.raises(ValueError, match="model_version"):
        create_index(8, model_version="")
    with pytest.raises(ValueError, match="metric"):
        create_index(8, model_version="m", metric="l2")
    with pytest.raises(ValueError, match="unknown faiss index parameter"):
        create_index(8, model_version="m", efsearch=3)
    with pytest.raises(ValueError, match="backend"):
        create_index(8, model_version="m", backend="annoy")
    index = create_index(4, model_version="m")
    with pytest.raises(ValueError, match="NaN"):
        index.add(["a"], np.array([[np.nan, 0, 0, 0]], np.float32))
    with pytest.raises(ValueError, match="2 ids but 1 vectors"):
        index.add(["a", "b"], np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="JSON"):
        index.add(["a"], np.ones((1, 4), np.float32), [{"x": object()}])


def test_auto_switches_to_hnsw_above_threshold():
    index = create_index(DIM, model_version="m", auto_threshold=100)
    index.add([f"a{i}" for i in range(60)], unit(60))
    assert index.built_kind == "flat"
    index.add([f"b{i}" for i in range(60)], unit(60, seed=1))
    assert index.built_kind == "hnsw" and len(index) == 120
    assert index.search(unit(60, seed=1)[5], k=1)[0][0].id == "b5"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "auto"])
def test_save_load_roundtrip(tmp_path, kind):
    index, ids, vecs, meta = make(150, kind, auto_threshold=100)
    index.remove(["item-0"])  # tombstones in HNSW must survive the round trip
    path = tmp_path / "cat.mindex"
    index.save(path)
    loaded = load_index(path)
    assert loaded.model_version == "test:1" and loaded.dim == DIM and len(loaded) == 149
    assert loaded.ids() == ids[1:]
    assert loaded.built_kind == index.built_kind
    a, b = index.search(vecs[:20], k=5), loaded.search(vecs[:20], k=5)
    assert [[h.id for h in r] for r in a] == [[h.id for h in r] for r in b]
    assert loaded.search(vecs[1], k=1, filter={"category": "Milk"})[0][0].metadata == meta[1]
    loaded.add(["more"], vecs[:1])  # a loaded index keeps working
    assert loaded.search(vecs[0], k=1)[0][0].id == "more"
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def corrupt(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif how == "truncate_header":
        path.write_bytes(data[:30])
    elif how == "bitflip_vectors":
        data[-50] ^= 0x01
        path.write_bytes(data)
    elif how == "bitflip_header":
        data[_PREFIX.size + 10] ^= 0x20
        path.write_bytes(data)
    elif how == "magic":
        path.write_bytes(b"PK\x03\x04" + data[4:])
    elif how == "version":
        data[8:12] = struct.pack("<I", 99)
        path.write_bytes(data)
    elif how == "trailing":
        path.write_bytes(data + b"\0")
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how,message", [
    ("truncate", "truncated"), ("truncate_header", "truncated"), ("bitflip_vectors", "checksum"),
    ("bitflip_header", "checksum"), ("magic", "not a mildnet index"), ("version", "format version 99"),
    ("trailing", "trailing"), ("empty", "truncated"),
])
def test_damaged_file_is_refused(tmp_path, how, message):
    index, *_ = make(50)
    path = tmp_path / "cat.mindex"
    index.save(path)
    corrupt(path, how)
    with pytest.raises(IndexFileError, match=message):
        load_index(path)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(IndexFileError, match="no such index file"):
        load_index(tmp_path / "nope.mindex")


def test_save_is_atomic_when_write_fails(tmp_path, monkeypatch):
    index, *_ = make(30)
    path = tmp_path / "cat.mindex"
    index.save(path)
    before = path.read_bytes()
    index.add(["extra"], unit(1, seed=3))

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    assert path.read_bytes() == before  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["cat.mindex"]


def test_empty_index_roundtrip(tmp_path):
    index = create_index(DIM, model_version="m")
    assert index.search(unit(2), k=3) == [[], []]
    index.save(tmp_path / "e.mindex")
    assert len(load_index(tmp_path / "e.mindex")) == 0


# ---- IVF-PQ + exact re-ranking (the auto choice for the largest catalogues) --------------------------------
def test_ivfpq_self_retrieval_filters_remove_roundtrip(tmp_path):
    # random data (no clusters): finer codes, more lists and a longer shortlist than the defaults need on real data
    index, ids, vecs, meta = make(3000, "ivfpq", pq_dims_per_byte=4, nprobe=24, rerank_factor=10)
    assert index.built_kind == "ivfpq"
    hits = index.search(vecs[:300], k=5)
    assert [h[0].id for h in hits] == ids[:300] and all(len(h) == 5 for h in hits)
    assert all(h[0].score == pytest.approx(1.0, abs=1e-5) for h in hits)  # re-ranked with exact vectors
    queries = unit(50, seed=7)
    _, want = exact_topk(vecs, queries, 10)
    got = index.search(queries, k=10)
    recall = np.mean([len({h.id for h in g} & {ids[r] for r in w}) / 10 for g, w in zip(got, want)])
    assert recall >= 0.9
    row = index.search(vecs[1], k=20, filter={"category": "Milk", "rank": 1})[0]
    assert len(row) == 20 and all(h.metadata["category"] == "Milk" and h.metadata["rank"] == 1 for h in row)
    index.remove(["item-1"])
    assert index.search(vecs[1], k=1)[0][0].id != "item-1"
    index.save(tmp_path / "pq.mindex")
    loaded = load_index(tmp_path / "pq.mindex")
    assert loaded.built_kind == "ivfpq" and len(loaded) == 2999
    a, b = index.search(queries, k=10), loaded.search(queries, k=10)
    assert [[h.id for h in r] for r in a] == [[h.id for h in r] for r in b]


def test_auto_moves_flat_to_hnsw_to_ivfpq():
    index = create_index(DIM, model_version="m", auto_threshold=100, ivfpq_threshold=1500)
    vecs = unit(1600, seed=3)
    kinds = []
    for start in range(0, 1600, 400):
        index.add([f"x{i}" for i in range(start, start + 400)], vecs[start:start + 400])
        kinds.append(index.built_kind)
    assert kinds == ["hnsw", "hnsw", "hnsw", "ivfpq"]
    assert index.search(vecs[1234], k=1)[0][0].id == "x1234"


def exact_ivfpq(n: int = 3000, **params):
    """An IVF-PQ index whose search visits every list and re-ranks every item: its answers must be exact."""
    return make(n, "ivfpq", nprobe=4096, rerank_factor=n, **params)


@pytest.mark.parametrize("k", [1, 10, 37])
def test_ivfpq_rerank_is_exact_when_the_shortlist_is_everything(k):
    index, ids, vecs, _ = exact_ivfpq()
    queries = unit(40, seed=11)
    want_s, want_rows = exact_topk(vecs, queries, k)
    got = index.search(queries, k=k)
    assert [[h.id for h in row] for row in got] == [[ids[r] for r in row] for row in want_rows]
    np.testing.assert_allclose([[h.score for h in row] for row in got], want_s, rtol=1e-5, atol=1e-5)


def test_ivfpq_rerank_after_removals_and_adds_maps_rows_to_ids(tmp_path):
    """Removals shift the exact store's rows; the re-rank must still score each shortlisted id by its own vector."""
    index, ids, vecs, _ = exact_ivfpq()
    gone = ids[::3]
    index.remove(gone)
    extra = unit(200, seed=12)
    index.add([f"extra-{i}" for i in range(200)], extra)
    live_ids = [i for i in ids if i not in set(gone)] + [f"extra-{i}" for i in range(200)]
    live = np.concatenate([vecs[[ids.index(i) for i in live_ids[:-200]]], extra])
    queries = unit(30, seed=13)
    want_s, want_rows = exact_topk(live, queries, 10)
    for idx in (index, _roundtrip(index, tmp_path)):
        got = idx.search(queries, k=10)
        assert [[h.id for h in row] for row in got] == [[live_ids[r] for r in row] for row in want_rows]
        np.testing.assert_allclose([[h.score for h in row] for row in got], want_s, rtol=1e-5, atol=1e-5)


def _roundtrip(index, tmp_path):
    path = tmp_path / "rt.mindex"
    index.save(path)
    loaded = load_index(path)
    assert loaded.built_kind == index.built_kind and loaded.ids() == index.ids()
    return loaded


@pytest.mark.parametrize("dim,seed", [(32, 0), (64, 1)])
def test_ivfpq_recall_vs_exact_grows_with_the_query_time_settings(dim, seed):
    """Random unit vectors (no clusters: the hard case for IVF) with the shipped build settings: recall@10 against
    exact search rises with the lists probed and the shortlist re-ranked, and is near 1 when both cover the
    catalogue. The catalogue-shaped figures at 1M come from bench/retrieval.py."""
    n = 5000
    vecs = unit(n, dim, seed)
    index = create_index(dim, kind="ivfpq", model_version="m")
    index.add([str(i) for i in range(n)], vecs)
    queries = unit(200, dim, seed + 100)
    _, want = exact_topk(vecs, queries, 10)
    recalls = []
    for nprobe, factor in [(4, 10), (16, 10), (n, 50)]:
        index.set_search_params(nprobe=nprobe, rerank_factor=factor)
        got = index.search(queries, k=10)
        recalls.append(np.mean([len({int(h.id) for h in g} & set(w.tolist())) / 10 for g, w in zip(got, want)]))
    assert recalls[0] < recalls[1] < recalls[2] and recalls[2] >= 0.95, recalls
    with pytest.raises(ValueError, match="cannot change after a build"):
        index.set_search_params(pq_dims_per_byte=4)


def test_ivfpq_file_with_a_foreign_faiss_structure_says_rebuild(tmp_path):
    import faiss

    from mildnet.index.store import read_index_file, write_index_file

    index, *_ = make(3000, "ivfpq")
    path = tmp_path / "pq.mindex"
    index.save(path)
    payload = read_index_file(path)
    payload.blob = faiss.serialize_index(faiss.IndexFlatIP(DIM)).tobytes()  # e.g. another version's layout
    write_index_file(path, payload)
    with pytest.raises(IndexFileError, match="rebuild the index"):
        load_index(path)


@pytest.mark.parametrize("nprobe,factor", [(4, 10), (8, 3)])
def test_ivfpq_search_equals_faiss_index_refine_flat(nprobe, factor):
    """The shipped re-rank returns what FAISS's own IndexRefineFlat returns over the same trained IVF-PQ."""
    import faiss

    index, ids, vecs, _ = make(3000, "ivfpq", nprobe=nprobe, rerank_factor=factor)
    refine = faiss.IndexRefineFlat(index._ann, faiss.swig_ptr(vecs))  # labels 0..n-1 = rows of vecs here
    params = faiss.IndexRefineSearchParameters(k_factor=factor, base_index_params=faiss.SearchParametersIVF(
        nprobe=nprobe))
    queries = unit(100, seed=21)
    want_s, want_l = refine.search(queries, 10, params=params)
    got = index.search(queries, k=10)
    assert [[h.id for h in row] for row in got] == [[ids[i] for i in row] for row in want_l]
    np.testing.assert_allclose([[h.score for h in row] for row in got], want_s, rtol=1e-5, atol=1e-5)
