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
