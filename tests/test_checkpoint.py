"""Checkpoints: atomic writes, weights_only loads, clear refusals."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from mildnet.checkpoint import CheckpointError, atomic_torch_save, read_checkpoint, save_checkpoint
from mildnet.spec import KERAS_01


class Tiny(torch.nn.Linear):
    spec = KERAS_01.replace(input_size=32)
    embedding_dim = 3

    def __init__(self):
        super().__init__(4, 3)


def test_round_trip(tmp_path):
    model = Tiny()
    save_checkpoint(tmp_path / "a.pt", model, variant="tiny", model_kwargs={"input_size": 32}, extra={"epoch": 4})
    ckpt = read_checkpoint(tmp_path / "a.pt", expect_variant="tiny")
    assert ckpt["epoch"] == 4 and ckpt["embedding_dim"] == 3 and ckpt["spec"]["input_size"] == 32
    torch.testing.assert_close(ckpt["state_dict"]["weight"], model.weight.detach())
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp files left behind


def test_wrong_variant_named(tmp_path):
    save_checkpoint(tmp_path / "a.pt", Tiny(), variant="tiny")
    with pytest.raises(CheckpointError, match="variant 'tiny', expected 'mildnet_vgg16'"):
        read_checkpoint(tmp_path / "a.pt", expect_variant="mildnet_vgg16")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("content, message", [
    (None, "no such checkpoint"),
    (b"not a torch file at all", "not a loadable checkpoint"),
    (pickle.dumps(Evil()), "not a loadable checkpoint"),
])
def test_unusable_files_refused(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_code_execution_refused_inside_torch_file(tmp_path):
    torch.save({"format": "mildnet-checkpoint", "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        read_checkpoint(tmp_path / "evil.pt")


@pytest.mark.parametrize("payload, message", [
    ({"state_dict": {}}, "not a mildnet checkpoint"),
    ({"format": "mildnet-checkpoint", "format_version": 99}, "newer than this mildnet"),
])
def test_headers_checked(tmp_path, payload, message):
    atomic_torch_save(payload, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(tmp_path / "x.pt")


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "a.pt"
    atomic_torch_save({"v": 1}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"v": lambda: 0}, path)  # unpicklable: the save fails midway
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
