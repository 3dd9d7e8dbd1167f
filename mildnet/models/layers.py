"""Small building blocks shared by the backbones."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Pad ``Tensor[N, C, H, W]`` the way TensorFlow's ``padding="SAME"`` does.

    TF puts the odd extra pixel at the bottom/right (for a stride-2 3x3 on an even input: top/left 0,
    bottom/right 1), where PyTorch's symmetric ``padding=k//2`` would shift every output by one pixel.
    Converted TF weights only reproduce TF numerics with this padding.
    """
    h, w = x.shape[-2:]
    pad_h = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pad_w = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6 (or no activation), with TF-SAME padding for strided convs.

    Stride-1 convs with odd kernels pad symmetrically (identical to TF SAME); strided ones pad in forward.
    Children are named ``conv`` and ``bn`` so converted state dicts have readable keys.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True, bn_eps: float = 1e-3):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        pad = kernel // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=bn_eps)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = tf_same_pad(x, self.kernel, self.stride)
        return self.act(self.bn(self.conv(x)))
