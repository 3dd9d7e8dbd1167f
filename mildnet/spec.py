"""The preprocessing spec: the ONE place that says how pixels become a model input.

Every model carries a :class:`PreprocessSpec`; training, export (which writes it beside the weights), the
Triton ``preprocess`` model and the client all read it from there. Never hard-code a 224 or a mean vector.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

RESIZE_MODES = ("squash", "crop")


@dataclass(frozen=True)
class PreprocessSpec:
    """How an RGB image becomes a ``Tensor[3, input_size, input_size]``.

    pixel = (value / 255 - mean[c]) / std[c]

    * ``resize_mode="squash"``: resize straight to ``input_size`` x ``input_size`` (the official Keras code).
    * ``resize_mode="crop"``: resize the shorter side to ``resize_size``, then centre-crop ``input_size``.
    """

    input_size: int = 224
    resize_mode: str = "squash"
    resize_size: int | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    colour: str = "RGB"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.input_size < 1:
            raise UsageError(f"input_size must be >= 1, got {self.input_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise UsageError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.colour not in ("RGB", "BGR"):
            raise UsageError(f"colour must be 'RGB' or 'BGR', got {self.colour!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise UsageError(f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def pixel_range(self) -> tuple[float, float]:
        """The lowest and highest value a normalised pixel (any channel) can take."""
        ends = [((0.0 - m) / sd, (1.0 - m) / sd) for m, sd in zip(self.mean, self.std)]
        return min(lo for lo, _ in ends), max(hi for _, hi in ends)

    def replace(self, **changes: Any) -> "PreprocessSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UsageError(f"unknown preprocessing spec keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if k in ("mean", "std") else v for k, v in d.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        return cls.from_dict(json.loads(text))


# The conventions our backbones were trained with.
KERAS_01 = PreprocessSpec(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # official MILDNet: x / 255
IMAGENET = PreprocessSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # torchvision weights
INCEPTION = PreprocessSpec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # TF-slim MobileNet: x / 127.5 - 1
