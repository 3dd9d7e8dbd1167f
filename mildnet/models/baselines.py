"""The multi-scale deep-ranking baselines MILDNet is compared with.

VisNet (Flipkart 2017) and RankNet / multi-scale Deep Ranking (Wang et al. 2014) as the official MILDNet code
builds them: a VGG main branch (GAP -> Dense 4096 + ReLU -> Dropout 0.6 -> Dense 4096 + ReLU -> Dropout 0.6
-> L2) plus two shallow branches on subsampled copies of the raw image:

* branch 1: 4x4 max-pool subsample -> zero-pad 4 -> 96-ch 8x8 conv stride 4 (overall stride 16) -> zero-pad 2
  -> 7x7 max-pool stride 4 -> flatten;
* branch 2: 8x8 max-pool subsample -> zero-pad 4 -> 96-ch 8x8 conv stride 4 (overall stride 32) -> zero-pad 1
  -> 3x3 max-pool stride 2 -> flatten;

the two flattened branches are concatenated and L2-normalised together, concatenated with the main branch,
then a linear Dense 4096 -> L2. At 224 px each branch flattens to 4x4x96 = 1536, which gives the published
sizes: VisNet (VGG16) 62,998,528 parameters (~63.0M), RankNet (VGG19) 68,308,224 (~68.3M). Because the
branches are flattened, the last Dense depends on the input size: a model only accepts its own ``input_size``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gap_concat
from ..spec import PreprocessSpec
from .head import ModelInputError, ZooModel
from .vgg import VGGTaps


class ShallowBranch(nn.Sequential):
    """Subsample -> pad -> 96-ch 8x8/4 conv -> pad -> max-pool -> flatten: ``Tensor[N, 3, S, S] -> [N, F]``."""

    def __init__(self, subsample: int, pad_after: int, pool: int, pool_stride: int, channels: int = 96):
        super().__init__(nn.MaxPool2d(subsample, subsample), nn.ZeroPad2d(4),
                         nn.Conv2d(3, channels, 8, 4), nn.ZeroPad2d(pad_after),
                         nn.MaxPool2d(pool, pool_stride), nn.Flatten())


class MultiScaleRanking(ZooModel):
    """VisNet (``depth=16``) / RankNet (``depth=19``): VGG branch + two shallow branches -> Dense 4096 -> L2."""

    def __init__(self, depth: int, *, variant: str, spec: PreprocessSpec, model_kwargs: dict[str, Any],
                 frozen_units: int = 0, dim: int = 4096, dropout: float = 0.6):
        super().__init__()
        self.backbone = VGGTaps(depth)
        # VGG's five pools need 32 px; at 32 the shallow branches end on 1x1 maps (8->16->3->7->1, 4->12->2->4->1)
        self.min_input_size = 32
        if spec.input_size < self.min_input_size:
            raise ModelInputError(f"{variant}: input_size {spec.input_size} is below the minimum "
                                  f"{self.min_input_size} its shallow branches allow")
        self.main = nn.Sequential(nn.Linear(512, dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.shallow1 = ShallowBranch(4, 2, 7, 4)
        self.shallow2 = ShallowBranch(8, 1, 3, 2)
        with torch.no_grad():  # flattened size of the branches at this input size
            probe = torch.zeros(1, 3, spec.input_size, spec.input_size)
            shallow_dim = self.shallow1(probe).shape[1] + self.shallow2(probe).shape[1]
        self.embedding = nn.Linear(dim + shallow_dim, dim)
        self.embedding_dim = dim
        self.freeze(self.backbone.units()[:frozen_units])
        self._finish(variant, spec, model_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check_input(x)
        if tuple(x.shape[-2:]) != (self.spec.input_size,) * 2:
            raise ModelInputError(f"{self.variant}: expects exactly {self.spec.input_size}x{self.spec.input_size} "
                                  f"input (its shallow branches are flattened), got {x.shape[-2]}x{x.shape[-1]}")
        deep = gap_concat(self.backbone.forward_taps(x, ("last",)))  # (N, 512)
        deep = F.normalize(self.main(deep), dim=1)  # (N, 4096)
        shallow = torch.cat([self.shallow1(x), self.shallow2(x)], 1)  # (N, 2 * 96 * h * w)
        shallow = F.normalize(shallow, dim=1)
        return F.normalize(self.embedding(torch.cat([shallow, deep], 1)), dim=1)
