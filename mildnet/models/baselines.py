"""The multi-scale deep-ranking baselines MILDNet is compared with, as the official MILDNet code builds them.

Both have a VGG main branch (GAP -> Dense 4096 + ReLU -> Dropout -> Dense 4096 + ReLU -> Dropout -> L2) and two
shallow 96-channel branches on the raw image that are flattened; everything is concatenated, then a linear
Dense 4096 -> L2.

* VisNet (Flipkart 2017; official ``visnet_model``): VGG16, dropout 0.6. Branch 1: 8x8 conv stride 16 ->
  3x3 max-pool stride 4; branch 2: 8x8 conv stride 32 -> 7x7 max-pool stride 2 (TF "SAME" padding
  throughout); each branch L2-normalised on its own.
* RankNet / multi-scale Deep Ranking (Wang et al. 2014; official ``ranknet``): VGG19, dropout 0.5. Branch 1:
  4x4 max-pool subsample -> pad 4 -> 8x8 conv stride 4 -> pad 2 -> 7x7 max-pool stride 4; branch 2: 8x8
  subsample -> pad 4 -> 8x8 conv stride 4 -> pad 1 -> 3x3 max-pool stride 2; the two branches are
  L2-normalised together.

At 224 px each branch flattens to 4x4x96 = 1536, which gives the published sizes: VisNet 62,998,528
parameters (~63.0M), RankNet 68,308,224 (~68.3M). Because the branches are flattened, the last Dense depends
on the input size: a model only accepts its own ``input_size``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gap_concat
from ..spec import PreprocessSpec
from .head import ModelInputError, ZooModel
from .layers import tf_same_pad
from .vgg import VGGTaps


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (output size ceil(input / stride))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(tf_same_pad(x, self.kernel_size[0], self.stride[0]))


class SameMaxPool(nn.MaxPool2d):
    """MaxPool2d with TensorFlow "SAME" padding (padded cells never win: they are -inf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        k, s = self.kernel_size, self.stride
        ph = max((-(-h // s) - 1) * s + k - h, 0)
        pw = max((-(-w // s) - 1) * s + k - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=float("-inf"))
        return super().forward(x)


def visnet_branch(stride: int, pool: int, pool_stride: int) -> nn.Sequential:
    """VisNet shallow branch: ``Tensor[N, 3, S, S] -> Tensor[N, 96 * h * w]``."""
    return nn.Sequential(SameConv(3, 96, 8, stride), SameMaxPool(pool, pool_stride), nn.Flatten())


def ranknet_branch(subsample: int, pad_after: int, pool: int, pool_stride: int) -> nn.Sequential:
    """Deep Ranking shallow branch: subsample -> pad -> 8x8/4 conv -> pad -> max-pool -> flatten."""
    return nn.Sequential(nn.MaxPool2d(subsample, subsample), nn.ZeroPad2d(4), nn.Conv2d(3, 96, 8, 4),
                         nn.ZeroPad2d(pad_after), nn.MaxPool2d(pool, pool_stride), nn.Flatten())


class MultiScaleRanking(ZooModel):
    """VisNet (``style="visnet"``, VGG16) / RankNet (``style="ranknet"``, VGG19): see the module docstring."""

    # VGG's five pools need 32 px; at 32 every shallow branch still ends on a 1x1 map
    min_input_size = 32

    def __init__(self, style: str, *, variant: str, spec: PreprocessSpec, model_kwargs: dict[str, Any],
                 dim: int = 4096):
        super().__init__()
        if style not in ("visnet", "ranknet"):
            raise ValueError(f"style must be 'visnet' or 'ranknet', got {style!r}")
        if spec.input_size < self.min_input_size:
            raise ModelInputError(f"{variant}: input_size {spec.input_size} is below the minimum "
                                  f"{self.min_input_size} this network allows")
        self.style = style
        self.backbone = VGGTaps(16 if style == "visnet" else 19)
        dropout = 0.6 if style == "visnet" else 0.5
        self.main = nn.Sequential(nn.Linear(512, dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        if style == "visnet":
            self.shallow1, self.shallow2 = visnet_branch(16, 3, 4), visnet_branch(32, 7, 2)
        else:
            self.shallow1, self.shallow2 = ranknet_branch(4, 2, 7, 4), ranknet_branch(8, 1, 3, 2)
        with torch.no_grad():  # flattened size of the branches at this input size (works on "meta" too)
            probe = torch.zeros(1, 3, spec.input_size, spec.input_size, device=next(self.shallow1.parameters()).device)
            shallow_dim = self.shallow1(probe).shape[1] + self.shallow2(probe).shape[1]
        self.embedding = nn.Linear(dim + shallow_dim, dim)
        self.embedding_dim = dim
        self._finish(variant, spec, model_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Tensor[N, 3, S, S]`` -> unit ``Tensor[N, 4096]``."""
        x = self.check_input(x)
        if tuple(x.shape[-2:]) != (self.spec.input_size,) * 2:
            raise ModelInputError(f"{self.variant}: expects exactly {self.spec.input_size}x{self.spec.input_size} "
                                  f"input (its shallow branches are flattened), got {x.shape[-2]}x{x.shape[-1]}")
        deep = gap_concat(self.backbone.forward_taps(x, ("last",)))  # (N, 512)
        deep = F.normalize(self.main(deep), dim=1)  # (N, 4096)
        s1, s2 = self.shallow1(x), self.shallow2(x)  # (N, 96*h1*w1), (N, 96*h2*w2)
        if self.style == "visnet":
            shallow = torch.cat([F.normalize(s1, dim=1), F.normalize(s2, dim=1)], 1)
        else:
            shallow = F.normalize(torch.cat([s1, s2], 1), dim=1)
        return F.normalize(self.embedding(torch.cat([shallow, deep], 1)), dim=1)
