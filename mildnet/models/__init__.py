"""The model zoo: ``create(name, pretrained=False, **kw)``, ``list_models()``, ``load_checkpoint(path)``.

Every model follows :class:`mildnet.models.head.ZooModel`: ``.variant``, ``.model_kwargs``, ``.spec``,
``.embedding_dim``, ``forward(Tensor[N, 3, S, S]) -> unit Tensor[N, D]``, ``embed()``,
``trainable_parameters()``. Any ``create`` takes ``input_size=`` (overrides ``spec.input_size``).

Preprocessing choices (each model's ``spec`` is the only place they live):

* VGG models use torchvision's ImageNet mean/std, NOT the official Keras code's plain x/255. The only VGG
  weights we can load are torchvision's (``VGG16_Weights.IMAGENET1K_V1``), which were trained on
  mean/std-normalised RGB; feeding them x/255 would shift every first-layer activation. (The official code's
  x/255 was itself a mismatch with the caffe-style BGR mean-subtracted Keras weights it used.)
* MobileNet-v1 models use x/127.5 - 1 (TF-slim "inception" scaling), as the converted graph was trained.
* EfficientNet-Lite0 models use x/127.5 - 1 as well (mean 127, std 128 in the TF-Lite release, the same to
  within 0.4%), checked by the ImageNet predictions in tests/test_weights.py.
* All resize by squashing to input_size x input_size, as the official code does (catalogue photos are
  often not square and cropping would cut products off).
"""
from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .. import weights
from ..checkpoint import CheckpointError, read_checkpoint
from ..errors import MildnetError, UsageError
from ..spec import IMAGENET, INCEPTION, PreprocessSpec
from .baselines import MultiScaleRanking
from .effnet import EfficientNetLite0
from .head import MILDNet, ModelInputError, ZooModel
from .mobilenet import MobileNetV1
from .vgg import VGGTaps

__all__ = ["create", "list_models", "load_checkpoint", "model_info", "register_model", "UnknownModelError",
           "ModelInputError", "ZooModel", "MILDNet", "PretrainedWeightsError"]


class UnknownModelError(MildnetError, ValueError):
    """No model of that name is registered; the message suggests close names."""


class PretrainedWeightsError(MildnetError, RuntimeError):
    """Pretrained weights could not be had (offline VGG without ``weights_path``, a bad weights file, ...)."""


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder and its default config."""

    name: str
    fn: Callable[..., ZooModel]  # fn(entry, pretrained=False, **kw): the decorated function
    description: str
    spec: PreprocessSpec  # default preprocessing (``input_size=`` overrides the size)
    lr: float = 1e-3  # the paper's SGD learning rate for the triplet recipe (mildnet.train)
    paper: bool = False  # one of the paper's own models (MILDNet variants and baselines)

    def build(self, pretrained: bool = False, **kw: Any) -> ZooModel:
        return self.fn(self, pretrained=pretrained, **kw)


_REGISTRY: dict[str, ModelEntry] = {}

VGG_TAPS = ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "last")
MOBILE_TAPS = ("conv_dw_1", "conv_dw_2", "conv_dw_4", "conv_dw_6", "conv_dw_12", "last")
EFFNET_TAPS = ("stage1", "stage2", "stage3", "stage5", "stage7", "last")

VGG_SPEC = IMAGENET.replace(resize_mode="squash")
MOBILE_SPEC = INCEPTION.replace(resize_mode="squash")
EFFNET_SPEC = INCEPTION.replace(resize_mode="squash")


def register_model(description: str, *, spec: PreprocessSpec, lr: float = 1e-3, paper: bool = False):
    """Register the decorated ``fn(entry, pretrained=False, **kw)`` under its own name (as timm does), with its
    default config. The name stays callable: ``mildnet_mobile(pretrained=True)`` is ``create("mildnet_mobile",
    pretrained=True)``."""
    def deco(fn: Callable[..., ZooModel]) -> Callable[..., ZooModel]:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        entry = ModelEntry(fn.__name__, fn, description, spec, lr, paper)
        _REGISTRY[entry.name] = entry

        @functools.wraps(fn)
        def create_this(pretrained: bool = False, **kw: Any) -> ZooModel:
            return entry.build(pretrained, **kw)
        return create_this
    return deco


def list_models() -> list[str]:
    """All registered model names, in a stable order."""
    return list(_REGISTRY)


def model_info(name: str) -> ModelEntry:
    return _REGISTRY[_check_name(name)]


def _check_name(name: str) -> str:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} (known: {', '.join(_REGISTRY)})")
    return name


def create(name: str, pretrained: bool = False, **kw: Any) -> ZooModel:
    """Build a zoo model by name. ``pretrained=True`` loads ImageNet backbone weights (MobileNet/EfficientNet:
    offline, converted into the cache on first use; VGG: torchvision download or ``weights_path=``)."""
    entry = _REGISTRY[_check_name(name)]
    try:
        return entry.build(pretrained=pretrained, **kw)
    except TypeError as e:  # unknown/mistyped keyword: say so plainly
        if "unexpected keyword" in str(e) or "positional argument" in str(e):
            raise UsageError(f"{name}: bad arguments ({e})") from None
        raise


def _spec(base: PreprocessSpec, input_size: int | None) -> PreprocessSpec:
    if input_size is None:
        return base
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise ModelInputError(f"input_size must be a positive int, got {input_size!r}")
    return base.replace(input_size=input_size)


def _kwargs(input_size: int | None, **more: Any) -> dict[str, Any]:
    """The JSON-able kwargs that rebuild a model (pretrained weights are not part of them: a checkpoint has them)."""
    kw = {k: v for k, v in more.items() if v is not None}
    if input_size is not None:
        kw["input_size"] = input_size
    return kw


# -- VGG ------------------------------------------------------------------------------------------------------
def _load_vgg_weights(backbone: VGGTaps, weights_path: str | os.PathLike | None) -> None:
    """Load ImageNet weights into ``backbone.features`` from a file, or from torchvision's download."""
    if weights_path is not None:
        try:
            sd = torch.load(weights_path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise PretrainedWeightsError(f"VGG weights file {weights_path} does not exist") from None
        except Exception as e:
            raise PretrainedWeightsError(f"{weights_path}: not a loadable PyTorch state dict "
                                         f"({type(e).__name__}: {str(e)[:160]})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        # torchvision's full VGG state dict: keep features.*, drop the classifier
        feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        source = str(weights_path)
    else:
        from torchvision.models import VGG16_Weights, VGG19_Weights
        weights = VGG16_Weights.IMAGENET1K_V1 if backbone.depth == 16 else VGG19_Weights.IMAGENET1K_V1
        try:
            sd = weights.get_state_dict(progress=True)
        except Exception as e:
            raise PretrainedWeightsError(
                f"could not download torchvision's VGG{backbone.depth} ImageNet weights ({type(e).__name__}: "
                f"{str(e)[:120]}). Offline, pass weights_path=PATH (a torchvision vgg{backbone.depth} state dict, "
                "e.g. saved from torchvision on a machine with internet)") from None
        feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        source = weights.url
    try:
        backbone.features.load_state_dict(feats, strict=True)
    except RuntimeError as e:
        raise PretrainedWeightsError(f"{source}: not VGG{backbone.depth} conv weights ({str(e)[:300]})") from None


def _vgg(entry: ModelEntry, depth: int, taps: tuple[str, ...], head_dim: int, default_dropout: float, frozen: int,
         pretrained: bool = False, input_size: int | None = None, weights_path: str | os.PathLike | None = None,
         dropout: float | None = None) -> ZooModel:
    """A MILDNet on VGG``depth``; ``frozen`` convs stay frozen (VGG16: conv1_1..conv3_3, 7 convs, torchvision
    features[:16]; VGG19 the same blocks, 8 convs)."""
    dropout = default_dropout if dropout is None else dropout
    backbone = VGGTaps(depth)
    if pretrained or weights_path is not None:
        _load_vgg_weights(backbone, weights_path)
    return MILDNet(backbone, taps, head_dim, dropout, variant=entry.name, spec=_spec(entry.spec, input_size),
                   model_kwargs=_kwargs(input_size, dropout=None if dropout == default_dropout else dropout),
                   frozen_units=frozen)


@register_model("MILDNet-VGG16: 5 pool taps, 1472-d concat, Dense 2048-Dropout 0.6-Dense 2048",
                spec=VGG_SPEC, paper=True)
def mildnet_vgg16(entry, pretrained=False, **kw):
    return _vgg(entry, 16, VGG_TAPS, 2048, 0.6, 7, pretrained, **kw)


@register_model("MILDNet-VGG16 ablation: without the block1 tap", spec=VGG_SPEC, paper=True)
def mildnet_vgg16_skip1(entry, pretrained=False, **kw):
    return _vgg(entry, 16, VGG_TAPS[1:], 2048, 0.6, 7, pretrained, **kw)


@register_model("MILDNet-VGG16 ablation: without the block1-2 taps", spec=VGG_SPEC, paper=True)
def mildnet_vgg16_skip2(entry, pretrained=False, **kw):
    return _vgg(entry, 16, VGG_TAPS[2:], 2048, 0.6, 7, pretrained, **kw)


@register_model("MILDNet-VGG16 ablation: without the block1-3 taps", spec=VGG_SPEC, paper=True)
def mildnet_vgg16_skip3(entry, pretrained=False, **kw):
    return _vgg(entry, 16, VGG_TAPS[3:], 2048, 0.6, 7, pretrained, **kw)


@register_model("MILDNet-VGG16 ablation: last layer only", spec=VGG_SPEC, paper=True)
def mildnet_vgg16_noskip(entry, pretrained=False, **kw):
    return _vgg(entry, 16, ("last",), 2048, 0.6, 7, pretrained, **kw)


@register_model("MILDNet-VGG19: the same recipe on VGG19", spec=VGG_SPEC, paper=True)
def mildnet_vgg19(entry, pretrained=False, **kw):
    return _vgg(entry, 19, VGG_TAPS, 2048, 0.6, 8, pretrained, **kw)


@register_model("MILDNet-512: VGG16 taps, Dense 512-Dense 512 (compact features)", spec=VGG_SPEC, lr=1e-4,
                paper=True)
def mildnet_512(entry, pretrained=False, **kw):
    return _vgg(entry, 16, VGG_TAPS, 512, 0.0, 7, pretrained, **kw)


# -- MobileNet-v1 and EfficientNet-Lite0 -----------------------------------------------------------------------
def _pretrained_backbone(backbone: nn.Module, name: str) -> None:
    sd = weights.load_state_dict(name)
    sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    try:
        backbone.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # the converter and the net disagree: name both
        raise PretrainedWeightsError(f"{name} weights do not fit {type(backbone).__name__}: {str(e)[:300]}") from None


def _light(entry: ModelEntry, backbone_cls: type, weights_name: str, taps: tuple[str, ...],
           head_dim: int | None = 1024, frozen: int = 4, pretrained: bool = False, input_size: int | None = None,
           dropout: float = 0.5, tap_norm: bool = False, final_relu: bool = True, residual: bool = False) -> ZooModel:
    """MobileNet-v1 / EfficientNet-Lite0 models. frozen=4: the stem and the units at stride <= 4, the analogue
    of VGG's conv1-conv3. head_dim=None: a zero-shot backbone (last map pooled, no head), entirely frozen.
    residual: a :class:`ResidualHead` instead of the dense head (the default training recipe's)."""
    backbone = backbone_cls()
    if pretrained:
        _pretrained_backbone(backbone, weights_name)
    n = len(backbone.units()) if head_dim is None else frozen
    return MILDNet(backbone, taps, head_dim, dropout, variant=entry.name, spec=_spec(entry.spec, input_size),
                   model_kwargs=_kwargs(input_size, dropout=None if dropout == 0.5 else dropout,
                                        tap_norm=tap_norm or None, final_relu=None if final_relu else False,
                                        residual=residual or None),
                   frozen_units=n, tap_norm=tap_norm, final_relu=final_relu, residual=residual)


@register_model("MILDNet-Mobile: MobileNet-v1, taps conv_dw_1/2/4/6/12 + last, Dense 1024-Dropout 0.5-Dense 1024",
                spec=MOBILE_SPEC, paper=True)
def mildnet_mobile(entry, pretrained=False, **kw):
    return _light(entry, MobileNetV1, "mobilenet_v1", MOBILE_TAPS, pretrained=pretrained, **kw)


@register_model("MILDNet-Mobile ablation: without the conv_dw_1 tap", spec=MOBILE_SPEC, paper=True)
def mildnet_mobile_skip1(entry, pretrained=False, **kw):
    return _light(entry, MobileNetV1, "mobilenet_v1", MOBILE_TAPS[1:], pretrained=pretrained, **kw)


@register_model("MILDNet-Mobile ablation: without the conv_dw_1/2 taps", spec=MOBILE_SPEC, paper=True)
def mildnet_mobile_skip2(entry, pretrained=False, **kw):
    return _light(entry, MobileNetV1, "mobilenet_v1", MOBILE_TAPS[2:], pretrained=pretrained, **kw)


@register_model("MILDNet-Mobile ablation: without the conv_dw_1/2/4 taps", spec=MOBILE_SPEC, paper=True)
def mildnet_mobile_skip3(entry, pretrained=False, **kw):
    return _light(entry, MobileNetV1, "mobilenet_v1", MOBILE_TAPS[3:], pretrained=pretrained, **kw)


@register_model("MILDNet-Mobile ablation: last layer only (what the official code effectively trained)",
                spec=MOBILE_SPEC, paper=True)
def mildnet_mobile_noskip(entry, pretrained=False, **kw):
    return _light(entry, MobileNetV1, "mobilenet_v1", ("last",), pretrained=pretrained, **kw)


@register_model("zero-shot: ImageNet MobileNet-v1, last map GAP + L2 (1024-d), no head", spec=MOBILE_SPEC)
def mobilenet_v1_gap(entry, pretrained=False, **kw):
    return _light(entry, MobileNetV1, "mobilenet_v1", ("last",), head_dim=None, pretrained=pretrained, **kw)


@register_model("ours: EfficientNet-Lite0, taps at stages 1/2/3/5/7 + head map, Dense 1024-Dropout 0.5-Dense 1024",
                spec=EFFNET_SPEC)
def mildnet_effnet_lite0(entry, pretrained=False, **kw):
    return _light(entry, EfficientNetLite0, "effnet_lite0", EFFNET_TAPS, pretrained=pretrained, **kw)


@register_model("zero-shot: ImageNet EfficientNet-Lite0, head map GAP + L2 (1280-d), no head", spec=EFFNET_SPEC)
def effnet_lite0_gap(entry, pretrained=False, **kw):
    return _light(entry, EfficientNetLite0, "effnet_lite0", ("last",), head_dim=None, pretrained=pretrained, **kw)


# -- baselines ------------------------------------------------------------------------------------------------
def _multiscale(entry: ModelEntry, style: str, pretrained: bool = False, input_size: int | None = None,
                weights_path: str | os.PathLike | None = None) -> ZooModel:
    model = MultiScaleRanking(style, variant=entry.name, spec=_spec(entry.spec, input_size),
                              model_kwargs=_kwargs(input_size))
    if pretrained or weights_path is not None:
        _load_vgg_weights(model.backbone, weights_path)
    return model


@register_model("baseline VisNet (Flipkart): VGG16 + two shallow branches, 4096-d", spec=VGG_SPEC, paper=True)
def visnet(entry, pretrained=False, **kw):
    return _multiscale(entry, "visnet", pretrained, **kw)


@register_model("baseline RankNet / multi-scale Deep Ranking: VGG19 + two shallow branches, 4096-d",
                spec=VGG_SPEC, paper=True)
def ranknet(entry, pretrained=False, **kw):
    return _multiscale(entry, "ranknet", pretrained, **kw)


# -- checkpoints ----------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, *, expect_variant: str | None = None) -> ZooModel:
    """Rebuild a model from a :func:`mildnet.checkpoint.save_checkpoint` file, in eval mode, spec restored.

    Raises :class:`CheckpointError` for a file that is not a checkpoint, names an unknown variant, is of
    another variant than ``expect_variant``, or whose tensors do not fit the variant it names.
    """
    ckpt = read_checkpoint(path, expect_variant=expect_variant)
    variant = ckpt.get("variant")
    if variant not in _REGISTRY:
        raise CheckpointError(f"{path}: checkpoint names unknown model variant {variant!r}")
    try:
        model = create(variant, pretrained=False, **dict(ckpt.get("model_kwargs") or {}))
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot rebuild {variant!r} from its model_kwargs: {e}") from None
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: checkpoint has no state_dict")
    mine = model.state_dict()
    missing = sorted(set(mine) - set(sd))
    unexpected = sorted(set(sd) - set(mine))
    wrong = sorted(k for k in set(sd) & set(mine) if tuple(sd[k].shape) != tuple(mine[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(wrong)} of the wrong shape (e.g. {wrong[:3]})" if wrong else ""]
        raise CheckpointError(f"{path}: its tensors do not fit variant {variant!r} ("
                              + "; ".join(p for p in parts if p) + "): is it a checkpoint of another model?")
    model.load_state_dict(sd, strict=True)
    if "spec" in ckpt:
        try:
            model.spec = PreprocessSpec.from_dict(ckpt["spec"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad preprocessing spec in checkpoint ({e})") from None
    return model.eval()
