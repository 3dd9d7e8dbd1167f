"""Checkpoints: atomic writes, weights_only loads, clear refusals."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from mildnet.checkpoint import (CheckpointError, atomic_torch_save, read_checkpoint, save_checkpoint,
                                state_dict_sha256)
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


def test_weights_sha256_recorded_and_checked(tmp_path):
    """Changed weights under an intact header are refused by name; format-1 files (before the hash) still load."""
    save_checkpoint(tmp_path / "a.pt", Tiny(), variant="tiny")
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    assert ckpt["format_version"] == 2 and ckpt["weights_sha256"] == state_dict_sha256(ckpt["state_dict"])
    tampered = {**ckpt, "state_dict": {**ckpt["state_dict"], "bias": ckpt["state_dict"]["bias"] + 1e-6}}
    atomic_torch_save(tampered, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="b.pt: weights do not match their sha256"):
        read_checkpoint(tmp_path / "b.pt")
    atomic_torch_save({k: v for k, v in ckpt.items() if k != "weights_sha256"}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="c.pt: checkpoint lacks its state_dict or weights_sha256"):
        read_checkpoint(tmp_path / "c.pt")
    legacy = {**{k: v for k, v in ckpt.items() if k != "weights_sha256"}, "format_version": 1}
    atomic_torch_save(legacy, tmp_path / "d.pt")
    assert read_checkpoint(tmp_path / "d.pt")["variant"] == "tiny"


def test_sha256_sees_names_dtypes_and_shapes():
    w = torch.arange(6, dtype=torch.float32)
    base = state_dict_sha256({"w": w})
    assert base == state_dict_sha256({"w": w.clone()})
    assert len({base, state_dict_sha256({"v": w}), state_dict_sha256({"w": w.reshape(2, 3)}),
                state_dict_sha256({"w": w.view(torch.int32)}), state_dict_sha256({"w": w.to(torch.bfloat16)})}) == 5


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
