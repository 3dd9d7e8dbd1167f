"""MobileNet-v1 1.0 (Howard et al. 2017), written to reproduce the TF-slim graph numerically.

TF-slim details that matter for converted weights: ReLU6, BatchNorm eps 1e-3, "SAME" padding (the odd pixel
of a stride-2 3x3 goes bottom/right), input scaled to [-1, 1]. Weights: :mod:`mildnet.weights.mobilenet_v1`.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNAct

# (stride, output channels) of depthwise-separable blocks 1..13 (Keras names conv_dw_1 .. conv_dw_13).
BLOCKS: tuple[tuple[int, int], ...] = (
    (1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
    (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024),
)


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise ConvBN-ReLU6 (``dw``) then 1x1 pointwise ConvBN-ReLU6 (``pw``)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = ConvBNAct(cin, cin, 3, stride, groups=cin)
        self.pw = ConvBNAct(cin, cout, 1)


class MobileNetV1(nn.Module):
    """MobileNet-v1 feature extractor that can hand out intermediate maps ("taps").

    Tap names follow Keras: ``conv_dw_k`` is the activated depthwise output of block k (its channel count is
    the block's input width: conv_dw_1 32, conv_dw_2 64, conv_dw_4 128, conv_dw_6 256, conv_dw_12 512), and
    ``last`` is the final 1024-channel map (stride 32). ``classifier`` (1x1 conv, 1001 ImageNet logits with
    index 0 = background) exists only with ``num_classes``; MILDNet models never build it.
    """

    min_input_size = 32  # five stride-2 stages: 32 px -> a 1x1 final map

    def __init__(self, num_classes: int | None = None):
        super().__init__()
        self.stem = ConvBNAct(3, 32, 3, 2)
        blocks, cin = [], 32
        self.tap_channels: dict[str, int] = {}
        for k, (stride, cout) in enumerate(BLOCKS, start=1):
            blocks.append(DepthwiseSeparable(cin, cout, stride))
            self.tap_channels[f"conv_dw_{k}"] = cin
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.tap_channels["last"] = cin
        self.out_channels = cin
        self.classifier = nn.Conv2d(cin, num_classes, 1) if num_classes else None

    def units(self) -> list[nn.Module]:
        """Modules from input to output; freezing ``n`` freezes the first ``n`` of them."""
        return [self.stem, *self.blocks]

    def forward_taps(self, x: torch.Tensor, taps: tuple[str, ...]) -> list[torch.Tensor]:
        """``Tensor[N, 3, H, W]`` -> the requested maps ``[Tensor[N, C_k, H_k, W_k]]``, in ``taps`` order."""
        want, got = set(taps), {}
        x = self.stem(x)  # (N, 32, H/2, W/2)
        for k, block in enumerate(self.blocks, start=1):
            x = block.dw(x)
            if f"conv_dw_{k}" in want:
                got[f"conv_dw_{k}"] = x
            x = block.pw(x)
        got["last"] = x  # (N, 1024, H/32, W/32)
        return [got[t] for t in taps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``Tensor[N, 1001]`` (needs ``num_classes``); used to check converted weights."""
        if self.classifier is None:
            raise RuntimeError("this MobileNetV1 has no classifier (build it with num_classes=1001)")
        x = self.forward_taps(x, ("last",))[0].mean((2, 3), keepdim=True)  # (N, 1024, 1, 1)
        return self.classifier(x).flatten(1)
