"""Config spelled once: `mildnet train`'s flags come from TrainConfig's fields; the zoo registers one decorated
function per model name, with its default config in the registry entry."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import pytest

from mildnet import models
from mildnet.commands import train as train_command
from mildnet.config import add_config_arguments, config_from_args, flag
from mildnet.train import TrainConfig


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    train_command.configure_parser(p)
    return p


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model_kwargs"])
def test_every_train_config_field_is_a_flag(name):
    dests = {a.dest for a in train_parser()._actions}
    assert name in dests


def test_the_command_line_becomes_the_config(tmp_path):
    args = train_parser().parse_args(["--train", "t.csv", "--out", str(tmp_path), "--lr", "0.01", "--no-augment",
                                      "--freeze-backbone", "--epochs", "3", "--tap-norm", "--device", "cpu"])
    cfg = train_command.triplet_config(args)
    assert cfg == TrainConfig(train=str(Path("t.csv").resolve()), out=str(tmp_path), lr=0.01, augment=False,
                              freeze_backbone=True, epochs=3, device="cpu", model_kwargs={"tap_norm": True})


def test_flags_left_out_take_the_triplet_recipe_defaults(tmp_path):
    """--model/--loss/--epochs/--weight-decay default to None on the command line (the two recipes differ)
    and to TrainConfig's values for --train."""
    cfg = train_command.triplet_config(train_parser().parse_args(["--train", "t.csv", "--out", str(tmp_path)]))
    defaults = TrainConfig(train="x")
    assert (cfg.model, cfg.loss, cfg.epochs, cfg.weight_decay, cfg.augment, cfg.progress) == \
        (defaults.model, defaults.loss, defaults.epochs, defaults.weight_decay, True, True)


@dataclasses.dataclass
class Toy:
    size: int = dataclasses.field(default=3, metadata=flag("how big"))
    name: str | None = dataclasses.field(default=None, metadata=flag(choices=("a", "b")))
    fast: bool = dataclasses.field(default=True, metadata=flag("go slow"))
    quiet: bool = dataclasses.field(default=False, metadata=flag())
    hidden: int = 7  # no flag metadata: not on the command line


@pytest.mark.parametrize("argv,expected", [
    ([], Toy()),
    (["--size", "5", "--name", "b", "--no-fast", "--quiet"], Toy(size=5, name="b", fast=False, quiet=True)),
])
def test_config_arguments_from_a_dataclass(argv, expected):
    p = argparse.ArgumentParser()
    add_config_arguments(p, Toy)
    assert config_from_args(Toy, p.parse_args(argv)) == expected
    assert "--hidden" not in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "c"])


@pytest.mark.parametrize("name", models.list_models())
def test_each_model_is_a_function_of_its_name(name):
    """`grep -rn def NAME mildnet/` finds where each model is defined (as timm's zoo)."""
    fn = getattr(models, name)
    assert fn.__name__ == name and f"def {name}(" in inspect.getsource(fn)
    entry = models.model_info(name)
    assert entry.name == name and entry.spec.input_size > 0 and entry.lr > 0


def test_registry_entries_carry_the_default_config():
    assert models.model_info("mildnet_512").lr == 1e-4 and models.model_info("mildnet_vgg16").lr == 1e-3
    assert models.model_info("mildnet_vgg16_skip2").paper and not models.model_info("mildnet_effnet_lite0").paper
    assert TrainConfig(train="x", model="mildnet_512").resolved_lr() == 1e-4
    assert TrainConfig(train="x", model="mildnet_512", lr=0.5).resolved_lr() == 0.5


def test_a_model_function_builds_what_create_builds():
    import torch

    with torch.device("meta"):
        a = models.mildnet_mobile_skip2(input_size=64)
        b = models.create("mildnet_mobile_skip2", input_size=64)
    assert a.variant == b.variant == "mildnet_mobile_skip2" and a.spec == b.spec
    assert a.spec == models.model_info("mildnet_mobile_skip2").spec.replace(input_size=64)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
