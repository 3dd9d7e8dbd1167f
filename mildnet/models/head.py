"""The MILDNet head and the common face of every zoo model.

MILDNet (Vishvakarma 2019) = one CNN whose intermediate maps ("taps") are global-average-pooled and
concatenated with the last map (``mildnet.ops.gap_concat``), then a small dense head and L2 normalisation.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MildnetError, UsageError
from ..ops import gap_concat
from ..spec import PreprocessSpec


class ModelInputError(MildnetError, ValueError):
    """A tensor given to a model has the wrong shape or size; the message says what was expected."""


class DenseHead(nn.Sequential):
    """``Tensor[N, in_dim]`` -> ``Tensor[N, dim]``: Dense+ReLU -> Dropout -> Dense(+ReLU) (not normalised).

    The paper's head: 2048/0.6 (MILDNet-VGG), 512/no dropout (MILDNet-512), 1024/0.5 (MILDNet-Mobile).
    ``final_relu=False`` drops the last ReLU: the embedding may then use every direction, not only the
    positive orthant, which keeps products apart that the training products never separated (the default
    recipe, see README). Both have the same parameters.
    """

    def __init__(self, in_dim: int, dim: int, dropout: float, final_relu: bool = True):
        layers = [nn.Linear(in_dim, dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dim, dim)]
        super().__init__(*layers, *([nn.ReLU(inplace=True)] if final_relu else []))


def last_map_embedding(pooled: torch.Tensor, last_dim: int) -> torch.Tensor:
    """The zero-shot embedding inside pooled taps: ``Tensor[N, pooled_dim]`` -> its last ``last_dim`` columns (the
    pooled last map, which every MILDNet's taps end with), L2: ``Tensor[N, last_dim]``."""
    return F.normalize(pooled[:, -last_dim:], dim=1)


class ResidualHead(nn.Module):
    """``Tensor[N, in_dim]`` -> ``Tensor[N, last_dim]``: the zero-shot embedding (the pooled last map, the last
    ``last_dim`` columns of the input, L2-normalised) plus a learned correction Dense+ReLU -> Dropout -> Dense
    whose last layer starts at zero.

    Training starts at the ImageNet backbone's embedding and moves only as far as the data asks, so products unlike
    any it trained on keep what the backbone tells apart (bench/accuracy.py's study; docs/results.md). The taps of
    the other layers still reach the correction, as in MILDNet.
    """

    def __init__(self, in_dim: int, last_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.last_dim = last_dim
        self.correction = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                        nn.Linear(hidden, last_dim))
        nn.init.zeros_(self.correction[-1].weight)  # epoch 0 is exactly the zero-shot backbone
        nn.init.zeros_(self.correction[-1].bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        base = last_map_embedding(pooled, self.last_dim)  # (N, last_dim)
        return base + self.correction(pooled)


def output_layer(head: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` whose output ``head``'s output is, up to a constant: the correction's last layer of a
    :class:`ResidualHead`, the last layer of a :class:`DenseHead` without its final ReLU. Anything else (a head
    that ends in a ReLU) has no such layer: ``UsageError``."""
    last = head.correction[-1] if isinstance(head, ResidualHead) else head[-1] if isinstance(head, DenseHead) else None
    if not isinstance(last, nn.Linear):
        raise UsageError(f"{type(head).__name__} does not end in a linear layer (a final ReLU?): it cannot be centred")
    return last


@torch.no_grad()
def centre_head(head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """Shift ``head``'s :func:`output_layer` bias so that its output (before L2) averages zero over the rows
    ``pooled`` (``Tensor[N, in_dim]``, eval mode); returns the mean removed, ``Tensor[D]``.

    Why: ImageNet features are ReLU outputs, so every embedding leans the same way and any two products look
    alike (cosine about 0.4); removing the mean of the training images spreads unrelated products apart and
    costs nothing at inference (it is folded into a bias)."""
    was = head.training
    head.eval()
    try:
        mean = head(pooled).mean(0)  # (D,)
    finally:
        head.train(was)
    output_layer(head).bias.sub_(mean)
    return mean


class ZooModel(nn.Module):
    """What every registry model offers (see the models contract).

    Attributes: ``variant`` (registry name), ``model_kwargs`` (JSON-able kwargs that rebuild it through
    ``mildnet.models.create``), ``spec`` (:class:`PreprocessSpec`), ``embedding_dim``, ``min_input_size``.
    ``forward(Tensor[N, 3, S, S]) -> Tensor[N, D]`` unit vectors. Computation runs in channels_last
    (about twice the conv throughput of NCHW on CPU); outputs are ordinary [N, D] tensors.
    """

    variant: str = ""
    memory_format: torch.memory_format = torch.channels_last
    model_kwargs: dict[str, Any]
    spec: PreprocessSpec
    embedding_dim: int
    min_input_size: int = 32

    def _finish(self, variant: str, spec: PreprocessSpec, model_kwargs: dict[str, Any]) -> None:
        """Call at the end of a subclass ``__init__``: set the contract attributes, go channels_last."""
        self.variant, self.spec, self.model_kwargs = variant, spec, dict(model_kwargs)
        if spec.input_size < self.min_input_size:
            raise ModelInputError(f"{variant}: input_size {spec.input_size} is below the minimum "
                                  f"{self.min_input_size} this network allows")
        self.set_memory_format(torch.channels_last)

    def set_memory_format(self, memory_format: torch.memory_format) -> "ZooModel":
        """Convert weights and (in forward) inputs to ``memory_format``. channels_last is the default: on CPU
        (oneDNN) and on tensor-core GPUs it is the layout convolutions run fastest in; NCHW is for comparison."""
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    # -- frozen layers -------------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        return getattr(self, "_frozen", [])

    def freeze(self, modules: list[nn.Module]) -> None:
        """``requires_grad=False`` on these modules' parameters; their BatchNorms also stay in eval mode."""
        self._frozen = list(modules)
        for m in self._frozen:
            for p in m.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ZooModel":
        super().train(mode)
        for m in self.frozen_modules():  # frozen BN must not drift with training batch statistics
            for bn in m.modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                    bn.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters training should optimise (frozen layers excluded)."""
        return (p for p in self.parameters() if p.requires_grad)

    # -- input checks and inference ------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Refuse anything but a float ``Tensor[N, 3, H, W]`` with H, W >= ``min_input_size``."""
        if not isinstance(x, torch.Tensor):
            raise ModelInputError(f"{self.variant}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ModelInputError(f"{self.variant}: expected an image batch Tensor[N, 3, H, W] (RGB), got shape "
                                  f"{tuple(x.shape)}" + (f" with {x.shape[1]} channels" if x.dim() == 4 else ""))
        if not x.is_floating_point():
            raise ModelInputError(f"{self.variant}: expected a float tensor preprocessed with model.spec, "
                                  f"got {x.dtype}")
        h, w = x.shape[-2:]
        if h < self.min_input_size or w < self.min_input_size:
            raise ModelInputError(f"{self.variant}: image {h}x{w} is smaller than the {self.min_input_size}x"
                                  f"{self.min_input_size} this network allows (spec input size "
                                  f"{self.spec.input_size})")
        return x.contiguous(memory_format=self.memory_format)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode, no-grad forward: ``Tensor[N, 3, S, S]`` -> unit ``Tensor[N, D]``."""
        was_training = self.training
        self.eval()
        try:
            return self(x)
        finally:
            self.train(was_training)


class MILDNet(ZooModel):
    """Backbone taps -> GAP + concat -> optional dense head -> L2.

    ``backbone`` offers ``forward_taps(x, names) -> list[Tensor]``, ``tap_channels``, ``units()`` and
    ``min_input_size``. ``taps`` must end with ``"last"`` (the final map always reaches the head). With
    ``head_dim=None`` the pooled concat is the embedding (the zero-shot GAP baselines). The first
    ``frozen_units`` of ``backbone.units()`` are frozen. ``tap_norm`` L2-normalises each pooled tap before the
    concat (ours; the paper concatenates them as they are). ``residual`` replaces the dense head by a
    :class:`ResidualHead` (ours: the embedding is the last map's, ``tap_channels["last"]``-d, plus a correction).
    """

    def __init__(self, backbone: nn.Module, taps: tuple[str, ...], head_dim: int | None, dropout: float, *,
                 variant: str, spec: PreprocessSpec, model_kwargs: dict[str, Any], frozen_units: int,
                 tap_norm: bool = False, final_relu: bool = True, residual: bool = False):
        super().__init__()
        unknown = [t for t in taps if t not in backbone.tap_channels]
        if unknown or not taps or taps[-1] != "last":
            raise UsageError(f"{variant}: taps {taps} must be names from {list(backbone.tap_channels)} ending "
                             "with 'last'")
        self.backbone, self.taps, self.tap_norm = backbone, tuple(taps), tap_norm
        self.min_input_size = backbone.min_input_size
        self.pooled_dim = sum(backbone.tap_channels[t] for t in taps)
        if head_dim and residual:
            self.head = ResidualHead(self.pooled_dim, backbone.tap_channels["last"], head_dim, dropout)
        else:
            self.head = DenseHead(self.pooled_dim, head_dim, dropout, final_relu) if head_dim else None
        self.embedding_dim = self.head.last_dim if residual and head_dim else head_dim or self.pooled_dim
        units = backbone.units()
        self.freeze(units[:frozen_units])  # requires_grad=False from the input up
        self._finish(variant, spec, model_kwargs)

    def tap_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tapped maps ``[Tensor[N, C_k, H_k, W_k]]`` for an input batch (for inspection/tests)."""
        return self.backbone.forward_taps(self.check_input(x), self.taps)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``Tensor[N, 3, S, S]`` -> the pooled, concatenated taps ``Tensor[N, pooled_dim]`` (the head's input)."""
        # tap_norm: each pooled tap gets unit length, so a shallow tap's large activations cannot drown the others
        return gap_concat(self.tap_maps(x), l2_normalize=self.tap_norm)  # (N, sum C_k)

    def zero_shot_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        """``Tensor[N, pooled_dim]`` -> the ImageNet backbone's own embedding, L2(GAP(last map)), with no head:
        unit ``Tensor[N, tap_channels["last"]]``."""
        return last_map_embedding(pooled, self.backbone.tap_channels["last"])

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """``Tensor[N, pooled_dim]`` (from :meth:`pool`) -> unit ``Tensor[N, embedding_dim]``: head and L2."""
        z = self.head(pooled) if self.head is not None else pooled  # (N, D)
        return F.normalize(z, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Tensor[N, 3, S, S]`` (preprocessed with ``self.spec``) -> unit ``Tensor[N, embedding_dim]``."""
        return self.embed_pooled(self.pool(x))
