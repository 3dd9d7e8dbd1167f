"""VGG16/VGG19 conv stacks (torchvision's layout, so torchvision state dicts load unchanged) with taps at
each max-pool: ``block1_pool`` .. ``block5_pool`` (``block5_pool`` is also ``last``)."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers


class VGGTaps(nn.Module):
    """``features`` is torchvision's ``vgg16().features`` / ``vgg19().features`` (keys ``features.N.*``)."""

    min_input_size = 32  # five 2x2 max-pools

    def __init__(self, depth: int = 16):
        super().__init__()
        if depth not in (16, 19):
            raise ValueError(f"VGG depth must be 16 or 19, got {depth}")
        self.depth = depth
        # torchvision's own layer list (not vgg16(): that would also build its 120M-parameter classifier)
        self.features = make_layers(cfgs["D" if depth == 16 else "E"], batch_norm=False)
        for m in self.features.modules():  # torchvision's VGG init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.pool_index = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        self.tap_channels: dict[str, int] = {}
        for b, i in enumerate(self.pool_index, start=1):
            conv = [m for m in self.features[:i] if isinstance(m, nn.Conv2d)][-1]
            self.tap_channels[f"block{b}_pool"] = conv.out_channels
        self.tap_channels["last"] = self.tap_channels["block5_pool"]
        self.out_channels = 512

    def units(self) -> list[nn.Module]:
        """The conv layers in order: freezing 7 (VGG16) = conv1_1..conv3_3 = torchvision ``features[:16]``."""
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    def forward_taps(self, x: torch.Tensor, taps: tuple[str, ...]) -> list[torch.Tensor]:
        """``Tensor[N, 3, H, W]`` -> requested pool outputs (block k: ``[N, C_k, H/2^k, W/2^k]``)."""
        got, names = {}, {i: f"block{b}_pool" for b, i in enumerate(self.pool_index, start=1)}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in names:
                got[names[i]] = x
        got["last"] = x
        return [got[t] for t in taps]
