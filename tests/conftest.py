"""Shared pytest fixtures. Real data comes from ../shared/data (CI has it beside the clone)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROCERY = Path(os.environ.get("MILDNET_GROCERY", ROOT.parent / "shared" / "data" / "grocery")).resolve()


@pytest.fixture(scope="session")
def grocery_root() -> Path:
    """The Grocery Store dataset root (with ``dataset/train.txt``). Missing data is a failure, not a skip."""
    if not (GROCERY / "dataset" / "train.txt").is_file():
        pytest.fail(f"Grocery data not found at {GROCERY}: set MILDNET_GROCERY or place ../shared beside the repo")
    return GROCERY


@pytest.fixture(scope="session")
def grocery_photos(grocery_root) -> list[Path]:
    """A fixed handful of real store photos (first of every 10th fine class in train.txt)."""
    seen, out = set(), []
    for line in (grocery_root / "dataset" / "train.txt").read_text().splitlines():
        rel, fine, _ = [s.strip() for s in line.split(",")]
        if fine not in seen and int(fine) % 10 == 0:
            seen.add(fine)
            out.append(grocery_root / "dataset" / rel)
    return out


# ---- Triton serving fixtures (issue 5: mildnet.export / mildnet.serving.server) --------------------------------
# ONE real server per test session (the machine is shared): an untrained, seeded MILDNet-Mobile at 96 px,
# exported (rendered by `mildnet export`) into a temp model repository, with a small catalogue index of real photos for `similar`.
SERVED_VARIANT = "mildnet_mobile"
SERVED_INPUT_SIZE = 96
SERVED_SEED = 0


def served_config():
    """The ServingConfig the session's repository is exported with (a test re-renders a copy with it)."""
    from mildnet.serving.repository import ServingConfig

    return ServingConfig(max_batch_size=16, max_queue_delay_us=5000)


@pytest.fixture(scope="session")
def served_repository(tmp_path_factory):
    """(repository path, in-process model, its mildnet.serving.contract.ServedModel): the exported model and the
    oracle it must match."""
    import torch

    from mildnet import models
    from mildnet.export import export_model

    repo = tmp_path_factory.mktemp("triton") / "model_repository"
    torch.manual_seed(SERVED_SEED)
    model = models.create(SERVED_VARIANT, pretrained=False, input_size=SERVED_INPUT_SIZE).eval()
    result = export_model(model, repo, served_config())
    served = models.load_checkpoint(result.version_dir / "model.pt").eval()
    return repo, served, result.served


@pytest.fixture(scope="session")
def catalogue_index(served_repository, grocery_photos):
    """An index of the grocery photos (in-process embeddings) at similar/index/catalogue.mindex."""
    import torch

    from mildnet.imageio import preprocess
    from mildnet.index import create_index

    repo, model, info = served_repository
    with torch.inference_mode():
        x = torch.stack([preprocess(p, model.spec) for p in grocery_photos])
        vectors = model(x).numpy()
    index = create_index(model.embedding_dim, kind="flat", model_version=info.model_version)
    ids = [p.stem for p in grocery_photos]
    # train/<Fruit|Packages|Vegetables>/<coarse class>/...: filterable metadata
    meta = [{"group": p.relative_to(GROCERY / "dataset").parts[1],
             "category": p.relative_to(GROCERY / "dataset").parts[2]} for p in grocery_photos]
    index.add(ids, vectors, meta)
    path = repo / "similar" / "index" / "catalogue.mindex"
    index.save(path)
    return path, ids, vectors


@pytest.fixture(scope="session")
def triton_server(served_repository, catalogue_index):
    """A real tritonserver on free 127.0.0.1 ports over the exported repository; stopped at session end."""
    from mildnet.serving.server import TritonServer

    repo, _, _ = served_repository
    with TritonServer(repo, poll_secs=1, log_file=repo.parent / "tritonserver.log") as server:
        yield server


# ---- Milvus server fixture (issue 17): ONE real Milvus 2.3.5 standalone per session, 127.0.0.1 only ----------
@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus server (mildnet.index.milvus_server) in a temp data folder, removed at session end."""
    from mildnet.index.milvus_server import MilvusServer

    server = MilvusServer(tmp_path_factory.mktemp("milvus") / "data", remove_data=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
