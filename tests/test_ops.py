"""mildnet.ops.gap_concat: the fused kernels against the pure-PyTorch reference, autograd, compile, export, errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mildnet.ops as ops
from mildnet.ops import gap_concat, gap_concat_reference

HAS_CUDA = torch.cuda.is_available()
needs_extension = pytest.mark.skipif(not ops.EXTENSION_LOADED, reason="mildnet._C not built (see test_extension_is_loaded)")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")])]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (C, H, W): odd spatial sizes (7x7, 1x1, 3x5, ...), a plane big enough to be split on the GPU, odd channel counts
SHAPES = [(8, 7, 7), (16, 1, 1), (24, 3, 5), (64, 70, 70), (5, 2, 9), (512, 7, 7), (3, 14, 14)]


def make_features(n: int, k: int, layout: str, dtype: torch.dtype, device: str = "cpu") -> list[torch.Tensor]:
    """K maps Tensor[n, C, H, W] cycling through SHAPES, in the requested memory layout."""
    features = []
    for i in range(k):
        c, h, w = SHAPES[i % len(SHAPES)]
        if layout == "strided":  # every other channel of a wider map, transposed spatially: no layout fits
            f = torch.randn(n, 2 * c, w, h, device=device, dtype=dtype)[:, ::2].transpose(2, 3)
        else:
            f = torch.randn(n, c, h, w, device=device, dtype=dtype)
            if layout == "channels_last":
                f = f.contiguous(memory_format=torch.channels_last)
        features.append(f)
    return features


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = TOLERANCE[ref.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)


def test_extension_is_loaded():
    """A broken build must not fall back silently in CI (set MILDNET_ALLOW_FALLBACK=1 to allow it)."""
    if os.environ.get("MILDNET_ALLOW_FALLBACK") == "1":
        pytest.skip("MILDNET_ALLOW_FALLBACK=1")
    assert ops.EXTENSION_LOADED, f"mildnet._C failed to load: {ops.EXTENSION_ERROR}"
    assert hasattr(torch.ops.mildnet, "gap_concat") and hasattr(torch.ops.mildnet, "gap_concat_backward")


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("k", [1, 3, 17])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("l2", [False, True])
def test_forward_matches_reference(device, dtype, layout, k, n, l2):
    torch.manual_seed(k * 10 + n)
    features = make_features(n, k, layout, dtype, device)
    assert_matches_reference(gap_concat(features, l2), gap_concat_reference(features, l2))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("l2", [False, True])
def test_backward_matches_reference(device, dtype, layout, l2):
    torch.manual_seed(1)
    features = [f.requires_grad_() for f in make_features(2, 4, layout, dtype, device)]
    weights = torch.randn(2, sum(f.shape[1] for f in features), device=device, dtype=dtype)
    (gap_concat(features, l2).float() * weights.float()).sum().backward()
    grads = [f.grad for f in features]
    for f in features:
        f.grad = None
    (gap_concat_reference(features, l2).float() * weights.float()).sum().backward()
    for f, g in zip(features, grads):
        torch.testing.assert_close(g.double(), f.grad.double(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        if layout == "channels_last":  # the gradient comes back in the input's layout
            assert g.is_contiguous(memory_format=torch.channels_last)
        else:
            assert g.is_contiguous()


@needs_extension
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_no_hidden_copies(layout):
    """channels_last and strided inputs are read in place: no aten copy/contiguous/clone runs inside the op."""
    features = make_features(2, 3, layout, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        gap_concat(features, True)
    names = {e.name for e in prof.events()}
    assert "mildnet::gap_concat_forward" in names
    assert not names & {"aten::copy_", "aten::contiguous", "aten::clone", "aten::to", "aten::_to_copy"}, names


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_l2_of_zero_vector_is_zero(device):
    """||p|| < eps: y = p / eps (no NaN), exactly as F.normalize, and its gradient is grad / eps."""
    features = [torch.zeros(2, 4, 3, 3, device=device, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 5, 2, 2, device=device, dtype=torch.float64, requires_grad=True)]
    out = gap_concat(features, True)
    assert_matches_reference(out, gap_concat_reference(features, True))
    assert torch.isfinite(out).all()
    out.sum().backward()
    torch.testing.assert_close(features[0].grad, torch.full_like(features[0], 1e12 / 9))


@needs_extension
@pytest.mark.parametrize("l2", [False, True])
def test_gradcheck_float64(l2):
    torch.manual_seed(0)
    features = [torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 4, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_(),
                torch.randn(2, 6, 1, 1, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda *fs: gap_concat(list(fs), l2), features)


@needs_extension
@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(l2, layout):
    features = [f.requires_grad_() for f in make_features(2, 3, layout, torch.float32)]
    torch.library.opcheck(torch.ops.mildnet.gap_concat_forward.default, (features, l2, 1e-12))
    out, pooled = torch.ops.mildnet.gap_concat_forward(features, l2, 1e-12)
    grad = torch.randn_like(out)
    detached = [f.detach() for f in features]
    torch.library.opcheck(torch.ops.mildnet.gap_concat_backward.default, (grad, pooled.detach(), detached, l2, 1e-12))


@needs_extension
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    features = [f.requires_grad_() for f in make_features(2, 3, "channels_last", torch.float32)]
    compiled = torch.compile(lambda fs: gap_concat(fs, True), fullgraph=True, backend=backend)
    out = compiled(features)
    assert_matches_reference(out, gap_concat_reference(features, True))
    out.square().sum().backward()
    grads = [f.grad.clone() for f in features]
    for f in features:
        f.grad = None
    gap_concat_reference(features, True).square().sum().backward()
    for f, g in zip(features, grads):
        torch.testing.assert_close(g, f.grad, atol=1e-6, rtol=1e-5)


@needs_extension
def test_torch_export():
    class Head(torch.nn.Module):
        def forward(self, a, b):
            return gap_concat([a, b], l2_normalize=True)

    a, b = torch.randn(2, 8, 7, 7), torch.randn(2, 16, 3, 5)
    exported = torch.export.export(Head(), (a, b))
    assert "mildnet.gap_concat" in str(exported.graph)
    a2, b2 = torch.randn(2, 8, 7, 7), torch.randn(2, 16, 3, 5)
    assert_matches_reference(exported.module()(a2, b2), gap_concat_reference([a2, b2], True))


BAD_INPUTS = {
    "empty list": (lambda: [], "empty list"),
    "not 4-D": (lambda: [torch.randn(2, 3, 4)], "4-D"),
    "differing batch sizes": (lambda: [torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4)], "differing batch sizes"),
    "mixed dtypes": (lambda: [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, dtype=torch.float64)], "mixed dtypes"),
    "integer dtype": (lambda: [torch.ones(2, 3, 4, 4, dtype=torch.int32)], "dtype torch.int32|dtype Int"),
    "zero-size spatial": (lambda: [torch.randn(2, 3, 0, 4)], "zero-size spatial"),
    "mixed devices": (lambda: [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, device="meta")], "mixed devices"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("fn", [gap_concat, gap_concat_reference], ids=["op", "reference"])
def test_bad_input_raises_clear_error(case, fn):
    make, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        fn(make())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@needs_extension
def test_cuda_mixed_devices_and_current_stream():
    with pytest.raises(ValueError, match="mixed devices"):
        gap_concat([torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, device="cuda")])
    # VGG16 tap shapes at N=2 in bf16 and fp32, NCHW and channels_last, on a side stream
    taps = [(64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7)]
    stream = torch.cuda.Stream()
    for dtype in (torch.float32, torch.bfloat16):
        for memory_format in (torch.contiguous_format, torch.channels_last):
            features = [torch.randn(2, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
                        for c, h, w in taps]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = gap_concat(features, True)
            torch.cuda.current_stream().wait_stream(stream)
            assert_matches_reference(out, gap_concat_reference([f.cpu() for f in features], True).cuda())


def test_fallback_warns_once_and_matches_reference():
    """Without the extension, gap_concat runs the reference and warns exactly once (in a fresh interpreter)."""
    script = (
        "import warnings, torch\n"
        "import mildnet.ops as ops\n"
        "assert not ops.EXTENSION_LOADED\n"
        "fs = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 1, 1)]\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    a = ops.gap_concat(fs, True)\n"
        "    b = ops.gap_concat(fs, True)\n"
        "assert torch.equal(a, ops.gap_concat_reference(fs, True)) and torch.equal(a, b)\n"
        "msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]\n"
        "print(len(msgs)); print(msgs[0] if msgs else '')\n"
    )
    env = dict(os.environ, MILDNET_DISABLE_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    count, message = result.stdout.splitlines()[:2]
    assert count == "1" and "not available" in message and "gap_concat_reference" in message


def test_reference_is_the_eager_composition():
    """The reference is exactly cat([normalize(t.mean((2, 3))) for t in feats]) in float32."""
    features = make_features(3, 4, "nchw", torch.float32)
    expected = torch.cat([F.normalize(t.mean((2, 3)), dim=1) for t in features], 1)
    torch.testing.assert_close(gap_concat_reference(features, True), expected)


# ---- first-run CUDA bugs: alignment, streams, the torch stack on CUDA, the zoo's real tap shapes ------------------
# They skip without a GPU (bench/gpu_check.sh runs every `cuda`-marked test once on a machine that has one). The
# CPU parametrisations run everywhere.


def cuda_only(test):
    """Marked ``cuda`` (bench/gpu_check.sh selects these) and skipped where no GPU is visible."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")(test))


# Channel counts of the headline models' channels_last taps (MILDNet-Mobile / EfficientNet-Lite0) and a few more:
# multiples of 4 (float4 loads) and of 8 (half/bfloat16), one of 2 only, one odd.
TAP_CHANNELS = [24, 40, 112, 320, 1280, 8, 6, 3]


def channels_last_map(n: int, c: int, h: int, w: int, dtype: torch.dtype, device: str, offset: int) -> torch.Tensor:
    """A dense channels_last ``Tensor[n, c, h, w]`` whose data starts ``offset`` elements into its storage
    (offset 1: the data pointer is off 16-byte alignment, so 128-bit loads must not be used)."""
    storage = torch.randn(n * h * w * c + offset, device=device, dtype=dtype)
    f = storage[offset:].view(n, h, w, c).permute(0, 3, 1, 2)
    assert f.is_contiguous(memory_format=torch.channels_last) and f.storage_offset() == offset
    return f


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1, 2])
@pytest.mark.parametrize("c", TAP_CHANNELS)
def test_channels_last_at_any_storage_offset(device, dtype, offset, c):
    torch.manual_seed(c + offset)
    maps = [channels_last_map(2, c, 7, 5, dtype, device, offset), channels_last_map(2, c, 3, 3, dtype, device, offset)]
    for l2 in (False, True):
        assert_matches_reference(gap_concat(maps, l2), gap_concat_reference(maps, l2))
    grad = torch.randn(2, c, device=device, dtype=dtype)
    x = maps[0].detach().requires_grad_()
    (gap_concat([x]) * grad).sum().backward()
    torch.testing.assert_close(x.grad.double(), (grad[:, :, None, None] / 35).expand_as(x).double(),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [24, 40])
def test_channels_last_batch_stride_off_alignment(device, c):
    """Dense channels_last rows, but each image starts one element after the previous one ends: rows of image 0
    are aligned, those of image 1 are not (only N == 1 may ignore the batch stride)."""
    n, h, w = 3, 4, 5
    storage = torch.randn(n * (h * w * c + 1), device=device)
    f = storage.as_strided((n, c, h, w), (h * w * c + 1, 1, w * c, c))
    odd_rows = torch.randn(n, h, w, c + 1, device=device)[..., :c].permute(0, 3, 1, 2)  # row stride c + 1
    for maps in ([f], [odd_rows], [f[:1]], [f, odd_rows, channels_last_map(3, 40, 2, 2, torch.float32, device, 3)]):
        assert_matches_reference(gap_concat(maps, True), gap_concat_reference(maps, True))


@needs_extension
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@cuda_only
def test_cuda_result_is_ordered_on_the_callers_stream(memory_format):
    """Inputs written on a side stream after a long GPU sleep, the op called on that stream, and the result read
    after synchronising THAT stream only: a launch on any other stream reads the inputs before they are written."""
    torch.manual_seed(0)
    sources = [torch.randn(4, c, 14, 14, device="cuda").contiguous(memory_format=memory_format)
               for c in (24, 40, 112)]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        maps = [torch.zeros_like(s) for s in sources]
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the inputs exist
        for m, s in zip(maps, sources):
            m.copy_(s)
        out = gap_concat(maps, True)
    side.synchronize()
    expected = gap_concat_reference([s.cpu() for s in sources], True)
    assert_matches_reference(out.cpu(), expected)



@needs_extension
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "misaligned"])
@pytest.mark.parametrize("l2", [False, True])
@cuda_only
def test_opcheck_cuda(layout, l2):
    if layout == "misaligned":
        features = [channels_last_map(2, c, 5, 3, torch.float32, "cuda", 1) for c in (24, 40)]
    else:
        features = make_features(2, 3, layout, torch.float32, "cuda")
    features = [f.requires_grad_() for f in features]
    torch.library.opcheck(torch.ops.mildnet.gap_concat_forward.default, (features, l2, 1e-12))
    out, pooled = torch.ops.mildnet.gap_concat_forward(features, l2, 1e-12)
    detached = [f.detach() for f in features]
    torch.library.opcheck(torch.ops.mildnet.gap_concat_backward.default,
                          (torch.randn_like(out), pooled.detach(), detached, l2, 1e-12))



@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@cuda_only
def test_torch_compile_cuda(dtype):
    torch.manual_seed(0)
    torch._dynamo.reset()
    features = [torch.randn(2, c, 7, 7, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
                .requires_grad_() for c in (24, 40, 112)]
    compiled = torch.compile(lambda fs: gap_concat(fs, True), fullgraph=True, backend="inductor")
    out = compiled(features)
    assert out.device.type == "cuda"
    assert_matches_reference(out, gap_concat_reference(features, True))
    out.float().square().sum().backward()
    grads = [f.grad.clone() for f in features]
    for f in features:
        f.grad = None
    gap_concat_reference(features, True).float().square().sum().backward()
    for f, g in zip(features, grads):
        torch.testing.assert_close(g.double(), f.grad.double(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])



@needs_extension
@cuda_only
def test_torch_export_cuda():

    class Head(torch.nn.Module):
        def forward(self, a, b):
            return gap_concat([a, b], l2_normalize=True)

    def inputs():
        return (torch.randn(2, 24, 7, 7, device="cuda").contiguous(memory_format=torch.channels_last),
                torch.randn(2, 1280, 3, 3, device="cuda").contiguous(memory_format=torch.channels_last))

    exported = torch.export.export(Head(), inputs())
    assert "mildnet.gap_concat" in str(exported.graph)
    a, b = inputs()
    out = exported.module()(a, b)
    assert out.device.type == "cuda"
    assert_matches_reference(out, gap_concat_reference([a, b], True))



def _zoo_with_taps() -> list[str]:
    from mildnet.models import create, list_models

    return [name for name in list_models() if hasattr(create(name), "tap_maps")]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@cuda_only
def test_cuda_every_zoo_models_real_taps(dtype):
    """The tapped maps each zoo model really produces (channels_last, at its own input size) pooled on the GPU in
    this dtype, and the same maps at a misaligned storage offset, against the reference."""
    from mildnet.models import create

    names = _zoo_with_taps()
    assert names, "no zoo model exposes its taps"
    torch.manual_seed(0)
    for name in names:
        model = create(name).eval().cuda()
        size = model.spec.input_size
        with torch.no_grad():
            maps = [m.to(dtype) for m in model.tap_maps(torch.randn(2, 3, size, size, device="cuda")
                                                        .contiguous(memory_format=torch.channels_last))]
        shifted = []
        for m in maps:
            s = channels_last_map(*m.shape, dtype, "cuda", 1)
            s.copy_(m)
            shifted.append(s)
        for fs in (maps, shifted):
            try:
                assert_matches_reference(gap_concat(fs, True), gap_concat_reference(fs, True))
            except AssertionError as e:
                raise AssertionError(f"{name} taps {[tuple(m.shape) for m in fs]} "
                                     f"{[m.stride() for m in fs]}: {e}") from None
        del model

