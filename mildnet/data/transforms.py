"""Training augmentation (the paper's, and the default recipe's; train only).

Images travel as ``uint8 Tensor[3, S, S]`` (resized by :func:`mildnet.imageio.resize` following the model's
spec, see :mod:`mildnet.data.datasets`); augmentation works on those, and :func:`mildnet.imageio.normalize`
turns a batch into the model's float input, so training, evaluation and serving see the same pixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


__all__ = ["PaperAugment", "RetrievalAugment"]


class PaperAugment:
    """MILDNet's augmentation, one random draw per image: rotation +-30 deg, shear +-0.2 rad, zoom x and y
    independently in [0.8, 1.2], horizontal and vertical flips with p=0.5 (the official Keras
    ImageDataGenerator settings). Edges are filled with the nearest pixel, as Keras' default ``fill_mode``.

    torchvision's ``RandomAffine`` zooms x and y by one shared factor, so the affine matrix is built here.
    Call with ``uint8 Tensor[3, H, W]`` and a ``torch.Generator``; returns ``uint8 Tensor[3, H, W]``.
    """

    def __init__(self, rotation_deg: float = 30.0, shear_rad: float = 0.2, zoom: tuple[float, float] = (0.8, 1.2),
                 hflip: float = 0.5, vflip: float = 0.5):
        self.rotation = math.radians(rotation_deg)
        self.shear, self.zoom, self.hflip, self.vflip = shear_rad, zoom, hflip, vflip

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
        theta = (2 * u[0] - 1) * self.rotation
        shear = (2 * u[1] - 1) * self.shear
        lo, hi = self.zoom
        zx, zy = lo + (hi - lo) * u[2], lo + (hi - lo) * u[3]
        c, s = math.cos(theta), math.sin(theta)
        # output -> input sampling matrix (normalised coords): rotation @ shear @ zoom
        rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        shr = torch.tensor([[1.0, -math.sin(shear)], [0.0, math.cos(shear)]], dtype=torch.float64)
        zoom = torch.diag(torch.tensor([zx, zy], dtype=torch.float64))
        a = rot @ shr @ zoom
        if u[4] < self.hflip:
            a[:, 0] = -a[:, 0]
        if u[5] < self.vflip:
            a[:, 1] = -a[:, 1]
        mat = torch.cat([a, torch.zeros(2, 1, dtype=torch.float64)], dim=1).float().unsqueeze(0)  # (1, 2, 3)
        x = img.unsqueeze(0).float()  # (1, 3, H, W)
        grid = F.affine_grid(mat, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)


class RetrievalAugment:
    """The default recipe's augmentation (metric learning's usual set): a random resized crop (``scale`` of the
    area, aspect ratio in ``ratio``) back to the input size, a horizontal flip with p=0.5, and colour jitter
    (brightness, contrast, saturation each by a factor in [1 - j, 1 + j]). Call with ``uint8 Tensor[3, S, S]``
    and a ``torch.Generator``; returns ``uint8 Tensor[3, S, S]``; the draw depends on the generator only."""

    def __init__(self, scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 jitter: float = 0.3):
        self.scale, self.ratio, self.jitter = scale, ratio, jitter

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF  # lazy: torchvision costs ~1 s to import, only this needs it

        _, h, w = img.shape
        u = torch.rand(8, generator=generator, dtype=torch.float64).tolist()
        area = h * w * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[1]
        cw = min(w, max(1, round(math.sqrt(area * math.exp(log_r)))))
        ch = min(h, max(1, round(math.sqrt(area / math.exp(log_r)))))
        top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
        out = TF.resized_crop(img, top, left, ch, cw, [h, w], antialias=True)
        if u[4] < 0.5:
            out = TF.horizontal_flip(out)
        j = self.jitter
        out = TF.adjust_brightness(out, 1 - j + 2 * j * u[5])
        out = TF.adjust_contrast(out, 1 - j + 2 * j * u[6])
        return TF.adjust_saturation(out, 1 - j + 2 * j * u[7])

