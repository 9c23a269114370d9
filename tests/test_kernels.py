"""Every kernel role and fusion flag against float64 PyTorch, outputs poisoned with NaN.

Shapes are tiny (the interpreter is slow) but chosen to hit every edge: odd H/W, N=1,
channel counts that are no multiple of any block, several M tiles, stride 1 and 2. The conv
roles' matrices (fusion flags x geometry x dtype x tile) are whole on CUDA; under the
interpreter they are covering arrays in which every combination of any three of their axes
occurs (``_helpers.kernel_matrix``: 42 of 144 fprop and dgrad cases, 54 of 108 wgrad ones).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import DTYPE_IDS, DTYPES, assert_close64, assert_matches, kernel_matrix, launched, rounded

from fusedres.ops import bn as bn_ops
from fusedres.ops import conv as conv_ops
from fusedres.ops.configs import TWO_LEVEL_TILES, ConvConfig

# (ksize, stride, padding)
GEOMETRIES = [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0), (5, 1, 2)]
GEOMETRY_IDS = ["1x1s1", "1x1s2", "3x3s1", "3x3s2", "3x3s1-nopad", "5x5s1"]
# Small tiles so that these shapes span several M tiles, N tiles and K slices.
SMALL = ConvConfig(block_m=32, block_n=16, block_k=16, num_warps=4, num_stages=2)
CONFIGS = [None, SMALL]
CONFIG_IDS = ["default-config", "small-config"]

# N=3, odd 9x7 image; C=19, Cout=21: no multiple of any block size.
N, C, H, W, K = 3, 19, 9, 7, 21


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bn_vectors(c: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(c, generator=g, dtype=torch.float64) * 0.5
    return scale.float().double(), shift.float().double()


def _act64(x64: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return torch.relu(x64 * scale[None, :, None, None] + shift[None, :, None, None])


def _act_eager(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """What eager PyTorch would hold in ``x.dtype``: the activation rounded to that dtype."""
    scale, shift = scale.to(x.device, torch.float32), shift.to(x.device, torch.float32)
    a = torch.relu(x.float() * scale[None, :, None, None] + shift[None, :, None, None])
    return a.to(x.dtype)


@pytest.mark.parametrize(*kernel_matrix({
    "residual": ([False, True], ["nores", "res"]),
    "prologue": ([False, True], ["plain", "bn-relu"]),
    "ksize,stride,pad": (GEOMETRIES, GEOMETRY_IDS),
    "dtype": (DTYPES, DTYPE_IDS),
    "config": (CONFIGS, CONFIG_IDS),
}))
def test_fprop(poison, device, config, dtype, ksize, stride, pad, prologue, residual):
    g = _gen(1)
    x64 = rounded(torch.randn(N, C, H, W, generator=g, dtype=torch.float64) + 0.2, dtype)
    w64 = rounded(torch.randn(K, C, ksize, ksize, generator=g, dtype=torch.float64) * 0.2, dtype)
    scale, shift = _bn_vectors(C, g)
    a64 = _act64(x64, scale, shift) if prologue else x64
    ref = F.conv2d(a64, w64, None, stride, pad)
    res64 = rounded(torch.randn(ref.shape, generator=g, dtype=torch.float64), dtype) if residual else None
    if residual:
        ref = ref + res64

    cl = torch.channels_last
    x = x64.to(device, dtype).contiguous(memory_format=cl)
    w = w64.to(device, dtype).contiguous(memory_format=cl)
    res = res64.to(device, dtype).contiguous(memory_format=cl) if residual else None
    sc, sh = (scale.float().to(device), shift.float().to(device)) if prologue else (None, None)
    with launched("conv_fprop_kernel"):
        out, partials = conv_ops.conv_fprop(
            x, w, stride=stride, padding=pad, scale=sc, shift=sh, residual=res, stats=True, config=config,
        )
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=cl)

    # Eager PyTorch on the same device (cuDNN there: TF32 for fp32 when allowed, like us).
    xe, we = x64.to(device, dtype), w64.to(device, dtype)
    ae = _act_eager(xe, scale, shift) if prologue else xe
    eager = F.conv2d(ae, we, None, stride, pad)
    if residual:
        eager = eager + res64.to(device, dtype)
    assert_matches(out, ref, eager, dtype, "fprop output")

    # The epilogue's statistics describe the stored output exactly (fp32 sums of its values).
    mean, invstd, _, _ = bn_ops.bn_finalize(
        partials, out.numel() // out.shape[1], None, None, None, None,
        training=True, momentum=0.1, eps=0.0, channels=K, device=out.device,
    )
    o64 = out.double().cpu()
    assert_close64(mean, o64.mean((0, 2, 3)), 1e-5, "epilogue mean")
    assert_close64(invstd.double().pow(-2), o64.var((0, 2, 3), unbiased=False), 1e-5, "epilogue var")


def test_fprop_accepts_nchw_and_strided_inputs(poison, device, no_tf32):
    """The kernels address activations through strides: NCHW and sliced tensors work too."""
    g = _gen(2)
    big = torch.randn(2, 2 * C, H, W, generator=g, dtype=torch.float64)
    x64 = big[:, ::2]  # every other channel: stride 2 along C
    w64 = torch.randn(K, C, 3, 3, generator=g, dtype=torch.float64) * 0.2
    out = torch.empty(2, K, H, W, device=device, dtype=torch.float32)  # contiguous NCHW output
    conv_ops.conv_fprop(x64.float().to(device), w64.float().to(device), stride=1, padding=1, out=out)
    assert_close64(out, F.conv2d(x64, w64, None, 1, 1), 1e-5, "strided fprop")


def _check_dgrad(device, config, dtype, shape, ksize, stride, pad, bn_bwd, add, reduce_sums=False, cout=K):
    """conv_dgrad of an (n, C, h, w) input from ``cout`` channels against float64 (the 2x rule), and
    with bn_bwd its sums of the stored dz (from the partials, or with reduce_sums as the launch's
    own reduction)."""
    n, h, w = shape
    g = _gen(3)
    x64 = rounded(torch.randn(n, C, h, w, generator=g, dtype=torch.float64) + 0.2, dtype)
    w64 = rounded(torch.randn(cout, C, ksize, ksize, generator=g, dtype=torch.float64) * 0.2, dtype)
    oh = (h + 2 * pad - ksize) // stride + 1
    ow = (w + 2 * pad - ksize) // stride + 1
    dy64 = rounded(torch.randn(n, cout, oh, ow, generator=g, dtype=torch.float64), dtype)
    scale, shift = _bn_vectors(C, g)
    mean = x64.mean((0, 2, 3)).float().double()
    invstd = (x64.var((0, 2, 3)) + 1e-5).rsqrt().float().double()

    add64 = rounded(torch.randn(x64.shape, generator=g, dtype=torch.float64), dtype) if add else None
    da64 = torch.nn.grad.conv2d_input(x64.shape, w64, dy64, stride, pad)
    if add:
        da64 = da64 + add64
    mask = (x64 * scale[None, :, None, None] + shift[None, :, None, None]) > 0
    ref = da64 * mask if bn_bwd else da64
    da_eager = torch.nn.grad.conv2d_input(x64.shape, w64.to(device, dtype), dy64.to(device, dtype), stride, pad)
    if add:
        da_eager = da_eager + add64.to(device, dtype)
    eager = da_eager * mask.to(device) if bn_bwd else da_eager

    cl = torch.channels_last
    dy = dy64.to(device, dtype).contiguous(memory_format=cl)
    wt = w64.to(device, dtype).contiguous(memory_format=cl)
    x = x64.to(device, dtype).contiguous(memory_format=cl)
    f32 = {"device": device, "dtype": torch.float32}
    bn = (x, scale.to(**f32), shift.to(**f32), mean.to(**f32), invstd.to(**f32)) if bn_bwd else None
    with launched("conv_dgrad_kernel"):
        dz, partials = conv_ops.conv_dgrad(
            dy, wt, tuple(x.shape), stride=stride, padding=pad, bn=bn, config=config, reduce_sums=reduce_sums,
            add=add64.to(device, dtype).contiguous(memory_format=cl) if add else None,
        )
    assert dz.shape == x.shape and dz.dtype == dtype
    assert_matches(dz, ref, eager, dtype, "dgrad")

    if bn_bwd:
        if reduce_sums:
            assert isinstance(partials, bn_ops.Sums)
            s, sx = partials
        else:
            with launched("bn_bwd_reduce_kernel"):
                s, sx = bn_ops.bn_bwd_reduce(*partials)
        # The sums are of the stored dz: fp32 accumulation of exactly those values.
        dz64 = dz.double().cpu()
        xhat = (x64 - mean[None, :, None, None]) * invstd[None, :, None, None]
        assert_close64(s, dz64.sum((0, 2, 3)), 1e-5, "sum dz")
        assert_close64(sx, (dz64 * xhat).sum((0, 2, 3)), 1e-5, "sum dz*xhat")


@pytest.mark.parametrize(*kernel_matrix({
    "add": ([False, True], ["noadd", "add"]),
    "bn_bwd": ([False, True], ["plain", "bn-relu-bwd"]),
    "ksize,stride,pad": (GEOMETRIES, GEOMETRY_IDS),
    "dtype": (DTYPES, DTYPE_IDS),
    "config": (CONFIGS, CONFIG_IDS),
}))
def test_dgrad(poison, device, config, dtype, ksize, stride, pad, bn_bwd, add):
    _check_dgrad(device, config, dtype, (N, H, W), ksize, stride, pad, bn_bwd, add)


# Stride 2, by parity class: (n, h, w) with even sides, odd sides, and a side of 1 (the classes of
# odd rows or columns are empty), N=1 throughout but once; 1x1 (only class (0, 0) has a tap: the
# others' dz is the added gradient, or 0) and 3x3 with and without padding (which shifts the
# taps of each class; unpadded 3x3 needs sides of 3).
PARITY_SHAPES = {"even": (1, 8, 6), "odd": (1, 7, 5), "h1": (1, 1, 5), "w1": (2, 5, 1)}
PARITY_GEOMETRIES = {"1x1": (1, 0), "3x3-nopad": (3, 0), "3x3": (3, 1)}
PARITY_CASES = [
    pytest.param(shape, ksize, pad, id=f"{gid}-{sid}")
    for sid, shape in PARITY_SHAPES.items()
    for gid, (ksize, pad) in PARITY_GEOMETRIES.items()
    if min(shape[1:]) + 2 * pad >= ksize
]
# (bn_bwd, add, reduce_sums)
EPILOGUES = [(False, False, False), (False, True, False), (True, False, False), (True, True, True)]
EPILOGUE_IDS = ["plain", "add", "bn-relu-bwd", "bn-relu-bwd-add-reduced"]


@pytest.mark.parametrize("shape,ksize,pad", PARITY_CASES)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=EPILOGUE_IDS)
def test_dgrad_stride2_classes(poison, device, shape, ksize, pad, epilogue):
    """Small tiles: several tiles per class (32 pixels) and two column blocks (C=19)."""
    _check_dgrad(device, SMALL, torch.float32, shape, ksize, 2, pad, *epilogue)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("ksize,pad", list(PARITY_GEOMETRIES.values()), ids=list(PARITY_GEOMETRIES))
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=EPILOGUE_IDS)
def test_dgrad_stride2_classes_low_precision(poison, device, dtype, ksize, pad, epilogue):
    """32 output channels: the reduction ends exactly at a channel block's end (as in real layers),
    where the taps' channel-block counter wraps."""
    _check_dgrad(device, SMALL, dtype, PARITY_SHAPES["odd"], ksize, 2, pad, *epilogue, cout=32)


@pytest.mark.parametrize(*kernel_matrix({
    "splits": ([1, 3, None], ["split1", "split3", "split-auto"]),
    "prologue": ([False, True], ["plain", "bn-relu"]),
    "ksize,stride,pad": (GEOMETRIES, GEOMETRY_IDS),
    "dtype": (DTYPES, DTYPE_IDS),
}))
def test_wgrad(poison, device, dtype, ksize, stride, pad, prologue, splits):
    g = _gen(4)
    x64 = rounded(torch.randn(N, C, H, W, generator=g, dtype=torch.float64) + 0.2, dtype)
    w_shape = (K, C, ksize, ksize)
    oh = (H + 2 * pad - ksize) // stride + 1
    ow = (W + 2 * pad - ksize) // stride + 1
    dy64 = rounded(torch.randn(N, K, oh, ow, generator=g, dtype=torch.float64), dtype)
    scale, shift = _bn_vectors(C, g)
    a64 = _act64(x64, scale, shift) if prologue else x64
    ref = torch.nn.grad.conv2d_weight(a64, w_shape, dy64, stride, pad)
    ae = _act_eager(x64.to(device, dtype), scale, shift) if prologue else x64.to(device, dtype)
    eager = torch.nn.grad.conv2d_weight(ae, w_shape, dy64.to(device, dtype), stride, pad)

    cl = torch.channels_last
    x = x64.to(device, dtype).contiguous(memory_format=cl)
    dy = dy64.to(device, dtype).contiguous(memory_format=cl)
    w_like = torch.empty(w_shape, device=device, dtype=dtype).contiguous(memory_format=cl)
    sc, sh = (scale.float().to(device), shift.float().to(device)) if prologue else (None, None)
    # Tiles wider than Cout and Cin (masked edges); short pixel slices so each split loops.
    config = ConvConfig(block_m=32, block_n=32, block_k=16, num_warps=4, num_stages=2)
    # the splits summed by the last split of each tile (tests/test_ticket.py: the same bits as the
    # two-launch path, whose reduction kernel is launched here too)
    with launched("conv_wgrad_kernel"):
        dw = conv_ops.conv_wgrad(dy, x, w_like, stride=stride, padding=pad, scale=sc, shift=sh,
                                 splits=splits, config=config)
    assert dw.shape == w_shape and dw.dtype == dtype and dw.stride() == w_like.stride()
    assert_matches(dw, ref, eager, dtype, "wgrad")


def test_wgrad_default_config_and_nchw_weight(poison, device, no_tf32):
    g = _gen(5)
    x64 = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
    dy64 = torch.randn(2, K, H, W, generator=g, dtype=torch.float64)
    w_like = torch.empty(K, C, 3, 3, device=device)  # contiguous (Cout, Cin, R, S)
    dw = conv_ops.conv_wgrad(dy64.float().to(device), x64.float().to(device), w_like, stride=1, padding=1)
    assert dw.is_contiguous()
    assert_close64(dw, torch.nn.grad.conv2d_weight(x64, w_like.shape, dy64, 1, 1), 1e-5, "wgrad")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 5, 1, 2), (3, 19, 9, 7), (4, 40, 16, 16)], ids=["N1-2px", "odd", "multi-tile"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
def test_bn_stats_finalize_training(poison, device, dtype, shape, affine):
    g = _gen(6)
    c = shape[1]
    x64 = rounded(torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5, dtype)
    x = x64.to(device, dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(c, generator=g) + 0.5).to(device) if affine else None
    bias = torch.randn(c, generator=g).to(device) if affine else None
    rm0 = torch.randn(c, generator=g)
    rv0 = torch.rand(c, generator=g) + 0.5
    rm, rv = rm0.clone().to(device), rv0.clone().to(device)
    with launched("bn_stats_kernel", "bn_finalize_kernel"):
        partials = bn_ops.bn_stats(x)
        count = x.numel() // c
        mean, invstd, scale, shift = bn_ops.bn_finalize(
            partials, count, weight, bias, rm, rv, training=True, momentum=0.3, eps=1e-5, channels=c, device=x.device,
        )
    m64 = x64.mean((0, 2, 3))
    v64 = x64.var((0, 2, 3), unbiased=False)
    inv64 = (v64 + 1e-5).rsqrt()
    assert_close64(mean, m64, 1e-6, "mean")
    assert_close64(invstd, inv64, 1e-6, "invstd")
    w64 = weight.double().cpu() if affine else torch.ones(c, dtype=torch.float64)
    b64 = bias.double().cpu() if affine else torch.zeros(c, dtype=torch.float64)
    assert_close64(scale, w64 * inv64, 1e-6, "scale")
    assert_close64(shift, b64 - m64 * w64 * inv64, 1e-6, "shift")
    assert_close64(rm, 0.7 * rm0.double() + 0.3 * m64, 1e-6, "running_mean")
    assert_close64(rv, 0.7 * rv0.double() + 0.3 * x64.var((0, 2, 3), unbiased=True), 1e-6, "running_var")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("res_layout", ["channels_last", "nchw"])
def test_bn_stats_with_add(poison, device, dtype, res_layout):
    """bn_stats(y, add=r): y becomes y + r rounded to y's dtype (what ``y.add_(r)`` gives), and the
    partials are the statistics of that sum."""
    g = _gen(16)
    shape = (3, 19, 9, 7)
    y64 = rounded(torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5, dtype)
    r64 = rounded(torch.randn(shape, generator=g, dtype=torch.float64) - 1.0, dtype)
    y = y64.to(device, dtype).contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if res_layout == "channels_last" else torch.contiguous_format
    r = r64.to(device, dtype).contiguous(memory_format=fmt)
    expected = y.clone().add_(r)
    with launched("bn_stats_kernel"):
        partials = bn_ops.bn_stats(y, add=r)
    assert torch.equal(y, expected), "the in-place sum differs from y.add_(r)"
    mean, invstd, _, _ = bn_ops.bn_finalize(partials, y.numel() // 19, None, None, None, None, training=True,
                                            momentum=0.1, eps=1e-5, channels=19, device=y.device)
    s64 = expected.double().cpu()
    assert_close64(mean, s64.mean((0, 2, 3)), 1e-6, "mean")
    assert_close64(invstd, (s64.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt(), 1e-6, "invstd")


def test_bn_statistics_exact_when_mean_dominates(poison, device):
    """x = 1000 + randn: a plain fp32 sum / sum-of-squares loses every digit of the variance
    here; the per-tile (mean, M2) partials merged with Chan's formula must not."""
    g = _gen(7)
    x64 = (1000.0 + torch.randn(8, 6, 32, 32, generator=g, dtype=torch.float64)).float().double()
    x = x64.float().to(device).contiguous(memory_format=torch.channels_last)
    mean, invstd, _, _ = bn_ops.bn_finalize(
        bn_ops.bn_stats(x), x.numel() // 6, None, None, None, None,
        training=True, momentum=0.1, eps=0.0, channels=6, device=x.device,
    )
    assert_close64(mean, x64.mean((0, 2, 3)), 1e-6, "mean")  # a few fp32 ulps
    assert_close64(invstd.double().pow(-2), x64.var((0, 2, 3), unbiased=False), 1e-4, "variance")
    # For contrast, the naive one-pass fp32 formula is far off on the same data.
    xf = x64.float()
    naive = (xf * xf).mean((0, 2, 3)) - xf.mean((0, 2, 3)) ** 2
    assert (naive.double() - x64.var((0, 2, 3), unbiased=False)).abs().max() > 1e-2


def test_two_level_merge_and_sums(poison, device):
    """More partial tiles than TWO_LEVEL_TILES: finalize and the backward sums reduce in two levels
    (chunk merges in parallel, then the chunks), exact at |mean| >> std and with a ragged last tile."""
    g = _gen(9)
    c, rows = 5, bn_ops.STATS_CONFIG.block_m
    pixels = (TWO_LEVEL_TILES + 3) * rows + 17  # T > TWO_LEVEL_TILES, last tile partial
    x64 = (1000.0 + torch.randn(1, c, 1, pixels, generator=g, dtype=torch.float64)).float().double()
    x = x64.float().to(device).contiguous(memory_format=torch.channels_last)
    partials = bn_ops.bn_stats(x)
    assert partials[0].shape[0] > TWO_LEVEL_TILES
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    with launched("bn_merge_kernel", "bn_finalize_kernel"):
        mean, invstd, _, _ = bn_ops.bn_finalize(partials, pixels, None, None, rm, rv, training=True, momentum=0.5,
                                                eps=0.0, channels=c, device=x.device)
    assert_close64(mean, x64.mean((0, 2, 3)), 1e-6, "mean")
    assert_close64(invstd.double().pow(-2), x64.var((0, 2, 3), unbiased=False), 1e-4, "variance")
    assert_close64(rv, 0.5 + 0.5 * x64.var((0, 2, 3), unbiased=True), 1e-4, "running_var")
    psum = torch.randn(TWO_LEVEL_TILES * 3 + 7, c, generator=g, dtype=torch.float64)
    psumx = torch.randn(psum.shape, generator=g, dtype=torch.float64)
    with launched("bn_sum_chunks_kernel", "bn_bwd_reduce_kernel"):
        s, sx = bn_ops.bn_bwd_reduce(psum.float().to(device), psumx.float().to(device))
    assert_close64(s, psum.float().double().sum(0), 1e-6, "sum dz")
    assert_close64(sx, psumx.float().double().sum(0), 1e-6, "sum dz*xhat")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tiles", [5, TWO_LEVEL_TILES * 3 + 7], ids=["one-level", "two-level"])
@pytest.mark.parametrize("weight_layout", ["channels_last", "nchw"])
def test_wgrad_and_bn_sums_in_one_launch(poison, device, dtype, tiles, weight_layout):
    """The combined reduction gives the weight gradient and the backward sums bit for bit as the
    two reductions apart (same order, same arithmetic), and they match float64."""
    g = _gen(17)
    K, C, R, S, splits, bc = 21, 19, 3, 3, 5, 13
    ws64 = torch.randn(splits, K, R, S, C, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if weight_layout == "channels_last" else torch.contiguous_format
    w_like = torch.empty(K, C, R, S, device=device, dtype=dtype).contiguous(memory_format=fmt)
    psum64 = torch.randn(tiles, bc, generator=g, dtype=torch.float64)
    psumx64 = torch.randn(tiles, bc, generator=g, dtype=torch.float64)
    ws, psum, psumx = (t.float().to(device) for t in (ws64, psum64, psumx64))

    def pending():
        return conv_ops.PendingWgrad(ws, torch.empty_like(w_like), splits, S)

    with launched("wgrad_bn_reduce_kernel"):
        dw, s, sx = conv_ops.reduce_wgrad_and_bn_sums(pending(), psum, psumx)
    with launched("wgrad_reduce_kernel", "bn_bwd_reduce_kernel"):
        dw_apart = pending().finish()
        s_apart, sx_apart = bn_ops.bn_bwd_reduce(psum, psumx)
    assert dw.stride() == w_like.stride()
    assert torch.equal(dw, dw_apart) and torch.equal(s, s_apart) and torch.equal(sx, sx_apart)
    ref = ws.double().cpu().sum(0).permute(0, 3, 1, 2)  # (K, R, S, C) -> (K, C, R, S)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert_close64(dw.float(), ref, tol, "dw")
    assert_close64(s, psum.double().cpu().sum(0), 1e-6, "sum dz")
    assert_close64(sx, psumx.double().cpu().sum(0), 1e-6, "sum dz*xhat")


@pytest.mark.parametrize("half_running", [False, True], ids=["fp32-running", "fp16-running"])
def test_bn_finalize_eval(poison, device, half_running):
    g = _gen(8)
    c = 37
    rdt = torch.float16 if half_running else torch.float32
    rm = torch.randn(c, generator=g).to(device, rdt)
    rv = (torch.rand(c, generator=g) + 0.5).to(device, rdt)
    weight = torch.randn(c, generator=g).to(device)
    bias = torch.randn(c, generator=g).to(device)
    rm_before, rv_before = rm.clone(), rv.clone()
    mean, invstd, scale, shift = bn_ops.bn_finalize(
        None, 0, weight, bias, rm, rv, training=False, momentum=0.1, eps=1e-3, channels=c, device=rm.device,
    )
    inv64 = (rv.double().cpu() + 1e-3).rsqrt()
    assert_close64(mean, rm.double().cpu(), 1e-7, "mean")
    assert_close64(invstd, inv64, 1e-6, "invstd")
    assert_close64(scale, weight.double().cpu() * inv64, 1e-6, "scale")
    assert_close64(shift, bias.double().cpu() - rm.double().cpu() * weight.double().cpu() * inv64, 1e-6, "shift")
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before), "eval must not touch running statistics"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("add", [False, True], ids=["noadd", "add"])
def test_bn_bwd_apply(poison, device, dtype, training, affine, add):
    g = _gen(9)
    shape = (3, 19, 9, 7)
    c = shape[1]
    m = shape[0] * shape[2] * shape[3]
    x64 = rounded(torch.randn(shape, generator=g, dtype=torch.float64), dtype)
    dz64 = rounded(torch.randn(shape, generator=g, dtype=torch.float64), dtype)
    add64 = rounded(torch.randn(shape, generator=g, dtype=torch.float64), dtype) if add else None
    mean = x64.mean((0, 2, 3)).float().double()
    invstd = (x64.var((0, 2, 3)) + 1e-5).rsqrt().float().double()
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).float().double() if affine else None
    xhat = (x64 - mean[None, :, None, None]) * invstd[None, :, None, None]
    s = dz64.sum((0, 2, 3))
    sx = (dz64 * xhat).sum((0, 2, 3))
    gi = (weight if affine else torch.ones(c, dtype=torch.float64)) * invstd
    if training:
        ref = gi[None, :, None, None] * (dz64 - s[None, :, None, None] / m - xhat * sx[None, :, None, None] / m)
    else:
        ref = dz64 * gi[None, :, None, None]
    if add:
        ref = ref + add64

    cl = torch.channels_last
    f32 = {"device": device, "dtype": torch.float32}
    with launched("bn_bwd_apply_kernel"):
        dx = bn_ops.bn_bwd_apply(
            dz64.to(device, dtype).contiguous(memory_format=cl), x64.to(device, dtype).contiguous(memory_format=cl),
            mean.to(**f32), invstd.to(**f32), weight.to(**f32) if affine else None, s.to(**f32), sx.to(**f32),
            training=training, add=add64.to(device, dtype).contiguous(memory_format=cl) if add else None,
        )
    assert dx.dtype == dtype and dx.shape == shape
    # One fp32 evaluation rounded once to dtype: within a rounding of the exact result.
    assert_matches(dx, ref, ref.to(dtype), dtype, "bn backward apply", matmul=False)


@pytest.mark.parametrize("allow", [False, True])
def test_input_precision_follows_cudnn_tf32_flag(allow):
    old = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = allow
        assert conv_ops.input_precision(torch.float32) == ("tf32" if allow else "ieee")
        assert conv_ops.input_precision(torch.bfloat16) == "tf32"  # ignored for 16-bit operands
    finally:
        torch.backends.cudnn.allow_tf32 = old
