"""A model frozen for CPU inference: traced to TorchScript, frozen (batch norm folded into the convolutions,
weights inlined as constants) and passed through ``torch.jit.optimize_for_inference`` (oneDNN layouts, fused
convolution + activation). The served ``mildnet`` model runs this on CPU: it is faster per image than eager
(bench/serving.py shows by how much), the margin a Triton backend needs to match an in-process model.

    forward = freeze_for_cpu(model, (3, 224, 224))   # (B, 3, 224, 224) -> (B, D), as model(x)
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..errors import MildnetError

# Folding batch norm changes the rounding, not the function: unit vectors agree to ~1e-6.
FROZEN_ATOL = 1e-5


class FreezeError(MildnetError, RuntimeError):
    """The model could not be frozen, or the frozen copy disagrees with it."""


def freeze_for_cpu(model: torch.nn.Module, input_shape: tuple[int, ...], atol: float = FROZEN_ATOL
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` (eval mode, CPU, fixed input size) as a frozen TorchScript callable, checked against eager
    on a batch of 3 (another batch size than the trace's, so a shape baked into the trace shows)."""
    example = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    check = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(1))
    try:
        # The trace bakes in shapes computed from the input size (effnet's "same" padding); the served input
        # size is fixed, and the check below runs another batch size, so the warnings say nothing here.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model.eval(), example, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            want, got = model(check), frozen(check)
            frozen(example)  # the first calls specialise the graph: pay for them here, not on a request
    except Exception as e:  # noqa: BLE001 - tracing fails in many ways; the caller keeps eager
        raise FreezeError(f"cannot freeze {type(model).__name__}: {type(e).__name__}: {e}") from e
    if got.shape != want.shape:
        raise FreezeError(f"frozen {type(model).__name__} differs from eager: shape {tuple(got.shape)} for "
                          f"{tuple(want.shape)} at batch {len(check)}")
    err = float((want - got).abs().max())
    if not err <= atol:
        raise FreezeError(f"frozen {type(model).__name__} differs from eager by {err:.2g} (> {atol:g})")
    return frozen
