"""Python face of the fused MILDNet-head op (kernels/). PLACEHOLDER until the kernel work lands:
only the pure-PyTorch reference exists; ``gap_concat`` is the stable public signature."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gap_concat_reference(features: list[torch.Tensor], l2_normalize: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Tensor[N, C_k, H_k, W_k] x K -> Tensor[N, sum C_k]: GAP each, optionally L2-normalise each, concatenate."""
    pooled = [f.float().mean((2, 3)) for f in features]
    if l2_normalize:
        pooled = [F.normalize(p, dim=1, eps=eps) for p in pooled]
    return torch.cat(pooled, 1).to(features[0].dtype)


def gap_concat(features: list[torch.Tensor], l2_normalize: bool = False, eps: float = 1e-12) -> torch.Tensor:
    return gap_concat_reference(list(features), l2_normalize, eps)
