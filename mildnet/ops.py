"""Python face of the fused MILDNet-head op (C++/CUDA in kernels/, built into ``mildnet._C``).

``gap_concat(features)``: K feature maps ``Tensor[N, C_k, H_k, W_k]`` -> global average pool each -> optionally
L2-normalise each pooled vector (as ``F.normalize``: x / max(||x||, eps)) -> concatenate -> ``Tensor[N, sum C_k]``.

The C++ library defines (see kernels/gap_concat.cpp):
  * ``torch.ops.mildnet.gap_concat(features, l2_normalize=False, eps=1e-12) -> Tensor``, the public op;
  * ``torch.ops.mildnet.gap_concat_forward(features, l2_normalize, eps) -> (out, pooled)`` and
    ``torch.ops.mildnet.gap_concat_backward(grad_out, pooled, features, l2_normalize, eps) -> Tensor[]``, the pair
    autograd, torch.compile and torch.export see. Their fake (meta) kernels and autograd formula live here.
Without the built extension, ``gap_concat`` runs ``gap_concat_reference`` and warns once.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["gap_concat", "gap_concat_reference", "EXTENSION_LOADED", "EXTENSION_ERROR"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

EXTENSION_ERROR: str | None = None
if os.environ.get("MILDNET_DISABLE_EXTENSION") == "1":  # lets tests exercise the fallback in a subprocess
    EXTENSION_LOADED = False
    EXTENSION_ERROR = "disabled by MILDNET_DISABLE_EXTENSION=1"
else:
    try:
        from ._build_info import TORCH_VERSION as _BUILT_AGAINST  # written by setup.py with the extension
    except ImportError:
        _BUILT_AGAINST = None
    _running = torch.__version__.split("+")[0]
    if _BUILT_AGAINST and _BUILT_AGAINST.split("+")[0].split(".")[:2] != _running.split(".")[:2]:
        # Loading it could crash or compute garbage: the C++ ABI of torch changes between minor versions.
        EXTENSION_LOADED = False
        EXTENSION_ERROR = (f"mildnet._C was compiled against torch {_BUILT_AGAINST}, this is torch "
                           f"{torch.__version__}: rebuild it with `pip install --no-build-isolation -e .`")
    else:
        try:
            from . import _C  # noqa: F401  (loading the library registers torch.ops.mildnet.*)

            EXTENSION_LOADED = True
        except ImportError as error:  # not built (or built against another torch)
            EXTENSION_LOADED = False
            EXTENSION_ERROR = str(error)

_fallback_warned = False


def _check_features(features: Sequence[torch.Tensor]) -> None:
    """Same checks and messages as kernels/gap_concat.cpp (used by the reference and the fake kernels)."""
    if len(features) == 0:
        raise ValueError("mildnet::gap_concat: expected at least one feature map, got an empty list")
    first = features[0]
    for k, t in enumerate(features):
        if t.dim() != 4:
            raise ValueError(f"mildnet::gap_concat: feature map {k} has shape {list(t.shape)}; "
                             "expected a 4-D tensor [N, C, H, W]")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"mildnet::gap_concat: feature map {k} has dtype {t.dtype}; "
                             "expected float32, float64, float16 or bfloat16")
        if t.dtype != first.dtype:
            raise ValueError(f"mildnet::gap_concat: mixed dtypes: feature map 0 is {first.dtype} "
                             f"but feature map {k} is {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"mildnet::gap_concat: mixed devices: feature map 0 is on {first.device} "
                             f"but feature map {k} is on {t.device}")
        if t.shape[0] != first.shape[0]:
            raise ValueError(f"mildnet::gap_concat: differing batch sizes: feature map 0 has N={first.shape[0]} "
                             f"but feature map {k} has N={t.shape[0]}")
        if t.shape[2] == 0 or t.shape[3] == 0:
            raise ValueError(f"mildnet::gap_concat: feature map {k} has zero-size spatial dims {list(t.shape)}; "
                             "the mean over H*W = 0 elements is undefined")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_memory_format(t: torch.Tensor) -> torch.memory_format:
    """Layout of the gradient the kernels write: channels_last for channels_last inputs, else NCHW."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def gap_concat_reference(features: Sequence[torch.Tensor], l2_normalize: bool = False,
                         eps: float = 1e-12) -> torch.Tensor:
    """Pure-PyTorch gap_concat: Tensor[N, C_k, H_k, W_k] x K -> Tensor[N, sum C_k] in the input dtype.

    Accumulates in float32 (float64 for float64 inputs), like the kernels. Differentiable through autograd.
    """
    features = list(features)
    _check_features(features)
    acc = _accumulate_dtype(features[0].dtype)
    pooled = [f.to(acc).mean((2, 3)) for f in features]  # (N, C_k) each
    if l2_normalize:
        pooled = [F.normalize(p, dim=1, eps=eps) for p in pooled]
    return torch.cat(pooled, 1).to(features[0].dtype)


def gap_concat(features: Sequence[torch.Tensor], l2_normalize: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """GAP each Tensor[N, C_k, H_k, W_k], optionally L2-normalise each pooled vector, concat -> Tensor[N, sum C_k].

    Runs the fused kernels (any strides, NCHW or channels_last without copies; float32/64/16, bfloat16); falls
    back to ``gap_concat_reference`` with one warning when the extension is not built.
    """
    features = list(features)
    if EXTENSION_LOADED:
        return torch.ops.mildnet.gap_concat(features, l2_normalize, eps)
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"mildnet.ops: the C++/CUDA extension mildnet._C is not available ({EXTENSION_ERROR}); "
                      "using the slower pure-PyTorch gap_concat_reference. Build it with `make build` "
                      "(pip install --no-build-isolation -e .).", RuntimeWarning, stacklevel=2)
    return gap_concat_reference(features, l2_normalize, eps)


if EXTENSION_LOADED:

    @torch.library.register_fake("mildnet::gap_concat_forward")
    def _gap_concat_forward_fake(features, l2_normalize, eps):
        _check_features(features)
        first = features[0]
        shape = (first.shape[0], sum(f.shape[1] for f in features))
        return first.new_empty(shape), first.new_empty(shape, dtype=_accumulate_dtype(first.dtype))

    @torch.library.register_fake("mildnet::gap_concat_backward")
    def _gap_concat_backward_fake(grad_out, pooled, features, l2_normalize, eps):
        _check_features(features)
        return [torch.empty_like(f, memory_format=_grad_memory_format(f)) for f in features]

    def _setup_context(ctx, inputs, output):
        features, l2_normalize, eps = inputs
        _, pooled = output
        # The features are kept for their shapes and layouts only; the backward never reads their values.
        ctx.save_for_backward(pooled, *features)
        ctx.l2_normalize, ctx.eps = l2_normalize, eps
        ctx.mark_non_differentiable(pooled)

    def _backward(ctx, grad_out, _grad_pooled):
        pooled, *features = ctx.saved_tensors
        grads = torch.ops.mildnet.gap_concat_backward(grad_out, pooled, features, ctx.l2_normalize, ctx.eps)
        return list(grads), None, None

    torch.library.register_autograd("mildnet::gap_concat_forward", _backward, setup_context=_setup_context)
