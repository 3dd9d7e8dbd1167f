"""The model zoo: exact sizes, the embedding contract, taps reaching the head, clear errors, checkpoints."""
from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from mildnet import models
from mildnet.checkpoint import CheckpointError, save_checkpoint
from mildnet.models import ModelInputError, UnknownModelError
from mildnet.models.head import MILDNet

torch.set_num_threads(2)
SIZE = 64  # small inputs keep every model fast; 64 px still leaves a 2x2 final map


@functools.lru_cache(maxsize=None)
def zoo(name: str):
    """One small-input model per name for the whole session (tests that use it must not change it)."""
    return models.create(name, input_size=SIZE)


def meta_model(name: str, **kw):
    with torch.device("meta"):  # sizes without allocating weights
        return models.create(name, **kw)


def n_params(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("name, total, trainable", [
    ("mildnet_vgg16", 21_927_744, 20_192_256),  # the official model's exact counts
    ("mildnet_512", 15_731_520, 13_996_032),  # paper: 15.73M
    ("mildnet_mobile", 6_321_984, 6_291_328),  # taps really used: 2016-d concat (PyTorch: BN stats are buffers)
    ("mildnet_mobile_noskip", 5_306_176, 5_275_520),  # what the official code's bug effectively built
    ("visnet", 62_998_528, 62_998_528),  # paper: ~63.0M
    ("ranknet", 68_308_224, 68_308_224),  # paper: ~68.3M
])
def test_parameter_counts(name, total, trainable):
    model = meta_model(name)
    assert n_params(model.parameters()) == total
    assert n_params(model.trainable_parameters()) == trainable


def test_paper_sizes_round_as_published():
    assert round(n_params(meta_model("mildnet_512").parameters()) / 1e6, 2) == 15.73
    assert round(n_params(meta_model("visnet").parameters()) / 1e6, 1) == 63.0
    assert round(n_params(meta_model("ranknet").parameters()) / 1e6, 1) == 68.3


@pytest.mark.parametrize("name, upto, frozen_params", [
    ("mildnet_vgg16", 16, 1_735_488),  # conv1_1..conv3_3 = torchvision features[:16]
    ("mildnet_vgg19", 18, 2_325_568),  # conv1_1..conv3_4: the same blocks
])
def test_vgg_freezes_exactly_blocks_1_to_3(name, upto, frozen_params):
    model = meta_model(name)
    feats = model.backbone.features
    frozen = {id(p) for p in feats[:upto].parameters()}
    assert n_params(feats[:upto].parameters()) == frozen_params
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in frozen)


@pytest.mark.parametrize("name", models.list_models())
def test_embedding_contract(name):
    model = zoo(name)
    assert model.variant == name and model.spec.input_size == SIZE
    json.dumps(model.model_kwargs)  # JSON-able
    x = torch.rand(2, 3, SIZE, SIZE) * torch.tensor([0.2, 3.0]).view(2, 1, 1, 1)  # two very different images
    model.train()
    y = model(x)  # (N, D)
    assert y.shape == (2, model.embedding_dim)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2))
    e = model.embed(x)
    assert model.training, "embed() must restore the previous mode"
    assert not e.requires_grad and e.shape == y.shape
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), e)  # eval forward is deterministic and equals embed()
    assert (e[0] - e[1]).abs().max() > 0
    model.eval()


@pytest.mark.parametrize("name", ["mildnet_vgg16", "mildnet_mobile", "mildnet_effnet_lite0", "visnet"])
def test_model_is_channels_last_and_takes_nchw(name):
    model = zoo(name).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize("name", [n for n in models.list_models() if n.startswith("mildnet_")])
def test_gradient_reaches_every_tap(name, monkeypatch):
    model = models.create(name, input_size=SIZE).train()
    assert isinstance(model, MILDNet) and model.head is not None
    maps = []
    tap_maps = model.tap_maps

    def spy(x):
        out = tap_maps(x)
        for m in out:
            m.retain_grad()
        maps.extend(out)
        return out

    monkeypatch.setattr(model, "tap_maps", spy)
    x = torch.rand(2, 3, SIZE, SIZE, requires_grad=True)  # so that frozen layers' maps carry gradients too
    (model(x) * torch.randn(2, model.embedding_dim)).sum().backward()
    assert len(maps) == len(model.taps)
    for tap, m in zip(model.taps, maps):
        assert m.grad is not None and m.grad.abs().sum() > 0, f"no gradient reaches tap {tap}"
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_taps_really_change_the_embedding():
    """Unlike the official MILDNet-Mobile code, the early taps feed the head: zeroing one changes the output."""
    model = zoo("mildnet_mobile").eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    maps = model.tap_maps(x)
    with torch.no_grad():
        ref = F.normalize(model.head(torch.cat([m.mean((2, 3)) for m in maps], 1)), dim=1)
        torch.testing.assert_close(model(x), ref)
        maps[0] = torch.zeros_like(maps[0])
        changed = F.normalize(model.head(torch.cat([m.mean((2, 3)) for m in maps], 1)), dim=1)
    assert (changed - ref).abs().max() > 1e-4


def test_head_pools_through_gap_concat(monkeypatch):
    import mildnet.models.head as head
    calls = []
    real = head.gap_concat
    monkeypatch.setattr(head, "gap_concat", lambda maps, **kw: calls.append(len(maps)) or real(maps, **kw))
    zoo("mildnet_vgg16").embed(torch.rand(1, 3, SIZE, SIZE))
    assert calls == [5]


def test_tap_norm_gives_each_pooled_tap_unit_length(monkeypatch):
    import mildnet.models.head as head
    pooled = []
    real = head.gap_concat
    monkeypatch.setattr(head, "gap_concat", lambda maps, **kw: pooled.append(real(maps, **kw)) or pooled[-1])
    model = models.create("mildnet_mobile", input_size=SIZE, tap_norm=True).eval()
    assert model.model_kwargs == {"input_size": SIZE, "tap_norm": True}  # so a checkpoint rebuilds it
    with torch.no_grad():
        model(torch.rand(2, 3, SIZE, SIZE))
    widths = [model.backbone.tap_channels[t] for t in model.taps]
    norms = torch.stack([part.norm(dim=1) for part in pooled[0].split(widths, dim=1)])  # (taps, N)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    plain = models.create("mildnet_mobile", input_size=SIZE).eval()
    assert plain.model_kwargs == {"input_size": SIZE}  # off by default: the paper's head


def test_frozen_batchnorm_stays_in_eval_mode():
    model = models.create("mildnet_mobile", input_size=SIZE).train()
    assert not model.backbone.stem.bn.training  # frozen: running stats must not drift
    assert model.backbone.blocks[5].pw.bn.training


def test_dropout_only_in_train_mode():
    model = models.create("mildnet_mobile", input_size=SIZE)
    x = torch.rand(2, 3, SIZE, SIZE)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    b = model(x)
    assert not torch.allclose(a, b)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(UnknownModelError, match="did you mean mildnet_vgg16"):
        models.create("mildnet_vg16")
    assert issubclass(UnknownModelError, ValueError)


def test_bad_create_arguments():
    with pytest.raises(ValueError, match="input_size 16 is below the minimum 32"):
        models.create("mildnet_mobile", input_size=16)
    with pytest.raises(ValueError, match="bad arguments"):
        models.create("mildnet_mobile", nonsense=1)


@pytest.mark.parametrize("shape, message", [
    ((2, 1, SIZE, SIZE), "with 1 channels"),
    ((2, 4, SIZE, SIZE), "with 4 channels"),
    ((3, SIZE, SIZE), r"Tensor\[N, 3, H, W\]"),
    ((2, 3, 16, 16), "smaller than the 32x32 this network allows"),
])
@pytest.mark.parametrize("name", ["mildnet_vgg16", "mildnet_mobile", "mildnet_effnet_lite0", "visnet"])
def test_bad_input_gets_a_clear_error(name, shape, message):
    model = zoo(name)
    with pytest.raises(ModelInputError, match=message):
        model(torch.rand(*shape))


def test_integer_images_are_refused():
    with pytest.raises(ModelInputError, match="float tensor"):
        zoo("mildnet_mobile")(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))


def test_multiscale_baseline_needs_its_own_input_size():
    with pytest.raises(ModelInputError, match="expects exactly 64x64"):
        zoo("visnet")(torch.rand(1, 3, 96, 96))


def test_checkpoint_roundtrip(tmp_path):
    model = models.create("mildnet_mobile_skip2", input_size=SIZE, dropout=0.3)
    assert model.model_kwargs == {"input_size": SIZE, "dropout": 0.3}
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, variant=model.variant, model_kwargs=model.model_kwargs, extra={"epoch": 3})
    loaded = models.load_checkpoint(path)
    assert not loaded.training and loaded.variant == "mildnet_mobile_skip2" and loaded.spec == model.spec
    x = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(loaded(x), model.embed(x))


def test_checkpoint_of_another_variant_is_refused(tmp_path):
    model = models.create("mildnet_mobile_noskip", input_size=SIZE)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, variant=model.variant, model_kwargs=model.model_kwargs)
    with pytest.raises(CheckpointError, match="variant 'mildnet_mobile_noskip', expected 'mildnet_mobile'"):
        models.load_checkpoint(path, expect_variant="mildnet_mobile")
    # a checkpoint that claims the wrong variant: its tensors do not fit
    lying = tmp_path / "lying.pt"
    save_checkpoint(lying, model, variant="mildnet_mobile", model_kwargs=model.model_kwargs)
    with pytest.raises(CheckpointError, match="do not fit variant 'mildnet_mobile'.*wrong shape"):
        models.load_checkpoint(lying)
    unknown = tmp_path / "unknown.pt"
    save_checkpoint(unknown, model, variant="mildnet_resnet", model_kwargs={})
    with pytest.raises(CheckpointError, match="unknown model variant 'mildnet_resnet'"):
        models.load_checkpoint(unknown)


def test_vgg_weights_from_a_local_file(tmp_path):
    from torchvision.models import vgg16
    reference = vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(reference.state_dict(), path)  # a full torchvision state dict, classifier included
    model = models.create("mildnet_vgg16", weights_path=path, input_size=SIZE)
    torch.testing.assert_close(model.backbone.features[28].weight, reference.features[28].weight)
    assert "weights_path" not in model.model_kwargs  # a checkpoint carries the weights, not the path
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(models.PretrainedWeightsError, match="not VGG16 conv weights"):
        models.create("mildnet_vgg16", weights_path=bad)
    with pytest.raises(models.PretrainedWeightsError, match="does not exist"):
        models.create("mildnet_vgg16", weights_path=tmp_path / "missing.pth")


def test_models_cli_lists_the_zoo(capsys):
    from mildnet.cli import main
    assert main(["models", "--json", "mildnet_vgg16", "mildnet_mobile"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["params"], r["trainable"]) for r in rows] == [
        ("mildnet_vgg16", 21_927_744, 20_192_256), ("mildnet_mobile", 6_321_984, 6_291_328)]
    assert rows[0]["spec"]["mean"] == [0.485, 0.456, 0.406]
