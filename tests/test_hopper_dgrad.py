"""The sm_90 engine's stride-1 dgrad (fusedres.ops.hopper.conv_dgrad) against float64 PyTorch,
and the route's choice of it.

Under the interpreter the tensor descriptors are emulated (out-of-range boxes zero-filled), so
the same kernel runs here as on an H100/H200. Shapes: 2 images of 9x19 input pixels, no multiple
of the 8x16 rectangle in either direction; 24 input channels (the
gradient's channels: 64 weight rows per tile, 40 of them zero-filled) and 48 output channels (the
reduction: three 16-channel boxes per tap in every dtype).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPE_IDS, DTYPES, assert_close64, assert_matches, launched, rounded

from fusedres.ops import bn as bn_ops
from fusedres.ops import hopper, route
from fusedres.ops.configs import HopperConfig

N, C, H, W, K = 2, 24, 9, 19, 48
CL = torch.channels_last
# (ksize, padding) at stride 1
GEOMETRIES = [(1, 0), (3, 1), (3, 0)]
GEOMETRY_IDS = ["1x1", "3x3", "3x3-nopad"]
# (bn_bwd, add, reduce_sums)
EPILOGUES = [(False, False, False), (False, True, False), (True, False, False), (True, True, True)]
EPILOGUE_IDS = ["plain", "add", "bn-relu-bwd", "bn-relu-bwd-add-reduced"]
# Every flag in bf16; the two ends of the epilogue in fp32 and fp16 (the flags are dtype-blind
# constexpr branches; the dtypes differ in the main loop's operands, fp32 as TF32).
CASES = [
    pytest.param(dtype, ksize, pad, *epi, id=f"{did}-{gid}-{eid}")
    for dtype, did in zip(DTYPES, DTYPE_IDS)
    for (ksize, pad), gid in zip(GEOMETRIES, GEOMETRY_IDS)
    for epi, eid in zip(EPILOGUES, EPILOGUE_IDS)
    if dtype == torch.bfloat16 or eid in ("plain", "bn-relu-bwd-add-reduced")
]


def _check(device, dtype, ksize, pad, bn_bwd, add, reduce_sums, *, n=N, c=C, h=H, w=W, k=K, config=None,
           via_route=False, x_format=CL):
    """dz (or da) against float64 by the 2x rule, and with bn_bwd the sums of the stored dz."""
    g = torch.Generator().manual_seed(3)
    x64 = rounded(torch.randn(n, c, h, w, generator=g, dtype=torch.float64) + 0.2, dtype)
    w64 = rounded(torch.randn(k, c, ksize, ksize, generator=g, dtype=torch.float64) * 0.2, dtype)
    oh, ow = h + 2 * pad - ksize + 1, w + 2 * pad - ksize + 1
    dy64 = rounded(torch.randn(n, k, oh, ow, generator=g, dtype=torch.float64), dtype)
    scale = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(c, generator=g, dtype=torch.float64) * 0.5
    mean = x64.mean((0, 2, 3)).float().double()
    invstd = (x64.var((0, 2, 3)) + 1e-5).rsqrt().float().double()
    add64 = rounded(torch.randn(x64.shape, generator=g, dtype=torch.float64), dtype) if add else None

    da64 = torch.nn.grad.conv2d_input(x64.shape, w64, dy64, 1, pad)
    da_eager = torch.nn.grad.conv2d_input(x64.shape, w64.to(device, dtype), dy64.to(device, dtype), 1, pad)
    if add:
        da64 = da64 + add64
        da_eager = da_eager + add64.to(device, dtype)
    keep = (x64 * scale[None, :, None, None] + shift[None, :, None, None]) > 0
    ref = da64 * keep if bn_bwd else da64
    eager = da_eager * keep.to(device) if bn_bwd else da_eager

    dy = dy64.to(device, dtype).contiguous(memory_format=CL)
    wt = w64.to(device, dtype).contiguous(memory_format=CL)
    x = x64.to(device, dtype).contiguous(memory_format=x_format)
    f32 = {"device": device, "dtype": torch.float32}
    bn = (x, scale.to(**f32), shift.to(**f32), mean.to(**f32), invstd.to(**f32)) if bn_bwd else None
    args = dict(stride=1, padding=pad, bn=bn, reduce_sums=reduce_sums,
                add=add64.to(device, dtype).contiguous(memory_format=CL) if add else None)
    with launched("hopper_dgrad_kernel"):
        if via_route:
            with route.engine("hopper"):
                dz, sums = route.conv_dgrad(dy, wt, tuple(x.shape), **args)
        else:
            dz, sums = hopper.conv_dgrad(dy, wt, tuple(x.shape), config=config, **args)
    assert dz.shape == x.shape and dz.dtype == dtype and dz.is_contiguous(memory_format=CL)
    assert_matches(dz, ref, eager, dtype, "hopper dgrad")
    if not bn_bwd:
        assert sums is None
        return
    if reduce_sums:
        assert isinstance(sums, bn_ops.Sums)  # the pointer kernel's contract: reduced in the launch
        s, sx = sums
    else:
        cfg = config or hopper.hopper_dgrad_config(c, k, ksize, 1, dtype)
        rectangles = n * -(-h // cfg.block_h) * -(-w // cfg.block_w)
        assert sums[0].shape == (rectangles, c)  # one row per pixel rectangle
        with launched("bn_bwd_reduce_kernel"):
            s, sx = bn_ops.bn_bwd_reduce(*sums)
    dz64 = dz.double().cpu()
    xhat = (x64 - mean[None, :, None, None]) * invstd[None, :, None, None]
    assert_close64(s, dz64.sum((0, 2, 3)), 1e-5, "sum dz")
    assert_close64(sx, (dz64 * xhat).sum((0, 2, 3)), 1e-5, "sum dz*xhat")


@pytest.mark.parametrize("dtype,ksize,pad,bn_bwd,add,reduce_sums", CASES)
def test_dgrad(poison, device, dtype, ksize, pad, bn_bwd, add, reduce_sums):
    _check(device, dtype, ksize, pad, bn_bwd, add, reduce_sums)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ksize,pad", [(1, 0), (3, 1)], ids=["1x1", "3x3"])
@pytest.mark.parametrize("c", [16, 8])
def test_dgrad_narrow_cin_epilogue(poison, device, dtype, ksize, pad, c):
    """Cin 16 and 8 on the 64-row tile: the epilogue takes the accumulator's first 16 rows
    (EPI_N = 16, two halvings; test_dgrad's Cin 24 takes 32), every fusion on, the sums reduced
    in the launch; the default tile (16x16 pixels in 16 bits, 8x16 in fp32)."""
    block_n = hopper.hopper_dgrad_config(c, K, ksize, 1, dtype).block_n
    assert hopper._epilogue_rows(c, block_n) == 16
    _check(device, dtype, ksize, pad, True, True, True, c=c)


def _pairs_flags(monkeypatch):
    """The PAIRS flag of every Hopper dgrad launch from now on (the launches still run)."""
    flags = []
    real = hopper.launch

    def spy(kernel, grid, *args, **kwargs):
        flags.append(kwargs.get("PAIRS"))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(hopper, "launch", spy)
    return flags


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("ksize,pad", [(1, 0), (3, 1)], ids=["1x1", "3x3"])
@pytest.mark.parametrize("c", [32, 64])
def test_dgrad_pair_epilogue(poison, device, monkeypatch, dtype, ksize, pad, c):
    """Cin 32 (EPI_N 32) and 64 (the 64-row block): every channel of the tile real, x and add
    with dz's strides, so the BatchNorm-backward epilogue reads them as uint32 channel pairs
    (_dgrad_bn_bwd_pairs); the 9x19 images leave rectangles hanging over the edge (their pixels
    past the image read the last row / column, masked). Every fusion on, the sums reduced in the
    launch."""
    flags = _pairs_flags(monkeypatch)
    _check(device, dtype, ksize, pad, True, True, True, c=c)
    assert flags == [True]


def test_dgrad_pair_epilogue_partial_sums(poison, device, monkeypatch):
    """The pair epilogue without the added gradient and with the per-rectangle partial sums
    returned (no ticket)."""
    flags = _pairs_flags(monkeypatch)
    _check(device, torch.bfloat16, 1, 0, True, False, False, c=32)
    assert flags == [True]


def test_dgrad_pair_epilogue_falls_back(poison, device, monkeypatch):
    """x in NCHW (strides other than dz's), or Cin 24 (a column block with rows past Cin): the
    pointer engine's epilogue, PAIRS off."""
    flags = _pairs_flags(monkeypatch)
    _check(device, torch.bfloat16, 1, 0, True, True, True, c=32, x_format=torch.contiguous_format)
    _check(device, torch.bfloat16, 1, 0, True, True, True, c=24)
    assert flags == [False, False]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dgrad_one_image_wide_channels(poison, device, dtype):
    """N=1, a 7x7 image in one 8x8 rectangle, 96 channels each way: two column blocks of 64 (the
    second one half empty) and three 32-channel slices per tap, the sums reduced in the launch."""
    cfg = HopperConfig(block_h=8, block_w=8, block_n=64, block_k=32, num_warps=4, num_stages=2)
    _check(device, dtype, 3, 1, True, True, True, n=1, c=96, h=7, w=7, k=96, config=cfg)


def test_dgrad_two_warpgroups(poison, device):
    """The 128-row tile on 8 warps (what Cin >= 512 takes, on 8x8 rectangles; Cin 128-511 takes 64
    rows on 4 warps) with 136 input channels: a full and a mostly empty Cin block."""
    cfg = HopperConfig(block_h=8, block_w=8, block_n=128, block_k=32, num_warps=8, num_stages=3)
    assert hopper.hopper_dgrad_config(512, 512, 3, 1, torch.bfloat16).num_warps == 8
    assert hopper.hopper_dgrad_config(128, 128, 3, 1, torch.bfloat16).num_warps == 4
    _check(device, torch.bfloat16, 3, 1, True, True, True, n=1, c=136, h=7, w=7, k=32, config=cfg)


def test_dgrad_sums_two_levels(poison, device, monkeypatch):
    """The ticket's two-level reduction (chunks of rectangles, then the chunks), at a size the
    interpreter runs quickly: the thresholds lowered to 16 tiles and chunks of 8, so that the 30
    2x8-pixel rectangles of the 9x19 images make 4 chunks, the last one partial."""
    monkeypatch.setattr(bn_ops, "TWO_LEVEL_TILES", 16)
    monkeypatch.setattr(bn_ops, "FINALIZE_BLOCK_T", 8)
    flags = []
    real = bn_ops.sums_ticket_args

    def spy(*args):
        out = real(*args)
        flags.append(out[2]["TWO_LEVEL"])
        return out

    monkeypatch.setattr(bn_ops, "sums_ticket_args", spy)
    cfg = HopperConfig(block_h=2, block_w=8, block_n=64, block_k=16, num_warps=4, num_stages=2)
    _check(device, torch.bfloat16, 1, 0, True, True, True, config=cfg)
    assert flags == [True]


def test_dgrad_padding_wider_than_kernel(poison, device):
    """A 1x1 kernel with padding 1: the flipped convolution's padding is -1 (dy read one row and
    column down and right)."""
    _check(device, torch.float16, 1, 1, True, True, True)


def test_route_runs_the_hopper_dgrad(poison, device):
    _check(device, torch.bfloat16, 3, 1, True, True, True, via_route=True)


def test_dgrad_weight_cached_per_version(device):
    w = torch.randn(24, 16, 3, 3, device=device)
    wf = hopper.dgrad_weight(w)
    assert wf.shape == (16, 3, 3, 24) and wf.is_contiguous()
    assert torch.equal(wf, w.permute(1, 2, 3, 0).flip(1, 2))
    assert hopper.dgrad_weight(w) is wf, "the flipped copy must be cached, not redone per call"
    with torch.no_grad():
        w.mul_(2)  # an optimizer step: a new version
    fresh = hopper.dgrad_weight(w)
    assert fresh is not wf and torch.equal(fresh, w.permute(1, 2, 3, 0).flip(1, 2))


# ---------------------------------------------------------------- selection (fusedres.ops.route)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values, dense channels_last, at an address 2 bytes past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)[1 : 1 + t.numel()]
    return flat.view(t.shape[0], t.shape[2], t.shape[3], t.shape[1]).permute(0, 3, 1, 2).copy_(t)


def _fallbacks(device):
    def act(k, h=9, w=19, dtype=torch.bfloat16):
        return torch.randn(2, k, h, w, device=device, dtype=dtype).contiguous(memory_format=CL)

    w3 = torch.randn(32, 16, 3, 3, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    w24 = torch.randn(24, 16, 3, 3, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    # (what, dy, weight, stride, padding, words of the reason)
    return [
        ("3x3 stride 2", act(32, 5, 10), w3, 2, 1, "stride 2: the pointer engine's dgrad by input parity"),
        ("1x1 stride 2", act(32, 5, 10), w3[:, :, :1, :1], 2, 0, "stride 2"),
        ("Cout 24", act(24), w24, 1, 1, "Cout=24 is not a multiple of 16"),
        ("NCHW dy", act(32).contiguous(), w3, 1, 1, "dy is not dense channels_last"),
        ("misaligned dy", _misaligned(act(32)), w3, 1, 1, "dy is not dense channels_last at a 16-byte aligned"),
        ("fp32 without TF32", act(32, dtype=torch.float32), w3.float(), 1, 1, "fp32 without TF32"),
    ]


def test_each_dgrad_fallback_reason_is_named(device):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # for the fp32 case; the 16-bit ones ignore it
    try:
        with route.engine("hopper"):
            for what, dy, w, stride, pad, reason in _fallbacks(device):
                engine, why = route.dgrad_engine(dy, w, stride, pad)
                assert engine == "pointer" and reason in why, f"{what}: {engine}, {why!r}"
                with pytest.raises(ValueError, match=reason):
                    hopper.conv_dgrad(dy, w, (2, 16, 9, 19), stride=stride, padding=pad)
    finally:
        torch.backends.cudnn.allow_tf32 = old


def test_dgrad_fallback_runs_the_pointer_kernel(poison, device):
    """Stride 2 on the route: the pointer kernel's parity dgrad, against float64."""
    g = torch.Generator().manual_seed(5)
    w64 = rounded(torch.randn(32, 16, 3, 3, generator=g, dtype=torch.float64) * 0.2, torch.bfloat16)
    dy64 = rounded(torch.randn(2, 32, 5, 10, generator=g, dtype=torch.float64), torch.bfloat16)
    dy = dy64.to(device, torch.bfloat16).contiguous(memory_format=CL)
    wt = w64.to(device, torch.bfloat16).contiguous(memory_format=CL)
    with route.engine("hopper"), launched("conv_dgrad_kernel"):
        da, _ = route.conv_dgrad(dy, wt, (2, 16, 9, 19), stride=2, padding=1)
    ref = torch.nn.grad.conv2d_input((2, 16, 9, 19), w64, dy64, 2, 1)
    eager = torch.nn.grad.conv2d_input((2, 16, 9, 19), w64.to(device, torch.bfloat16), dy, 2, 1)
    assert_matches(da, ref, eager, torch.bfloat16, "fallback dgrad")


def test_dgrad_engine_overrides(device, monkeypatch):
    """The same opt-in as the fprop engine: pointer by default, auto on sm_90 only, hopper anywhere."""
    monkeypatch.setattr(route, "_ENGINE_OVERRIDES", [])  # lift the suite's engine("pointer")
    monkeypatch.delenv("FUSEDRES_CONV_ENGINE", raising=False)
    dy = torch.randn(1, 16, 5, 5, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    w = torch.randn(16, 16, 3, 3, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    engine, why = route.dgrad_engine(dy, w, 1, 1)
    assert engine == "pointer" and why.startswith("FUSEDRES_CONV_ENGINE=pointer (the default")
    monkeypatch.setenv("FUSEDRES_CONV_ENGINE", "auto")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        assert route.dgrad_engine(dy, w, 1, 1) == ("hopper", None)
    else:
        engine, why = route.dgrad_engine(dy, w, 1, 1)
        assert engine == "pointer" and "is not an sm_90 GPU" in why
    monkeypatch.setenv("FUSEDRES_CONV_ENGINE", "hopper")
    assert route.dgrad_engine(dy, w, 1, 1) == ("hopper", None)
    with route.engine("pointer"):
        assert route.dgrad_engine(dy, w, 1, 1) == ("pointer", "engine('pointer') in effect")
    monkeypatch.setenv("FUSEDRES_CONV_ENGINE", "cutlass")
    with pytest.raises(ValueError, match="FUSEDRES_CONV_ENGINE must be"):
        route.dgrad_engine(dy, w, 1, 1)
