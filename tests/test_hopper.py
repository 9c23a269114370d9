"""The sm_90 engine (fusedres.ops.hopper) against float64 PyTorch, and the route's choice of it.

Under the interpreter the tensor descriptors are emulated (out-of-range boxes zero-filled), so
the same kernel runs here as on an H100/H200. Shapes: 2 images of 9x19 pixels, not a multiple
of the 8x16 box in either direction (a rectangle hanging over the bottom and the right edge,
one per image with stats: the per-image merge); 16 input channels (one 16-channel box per tap);
24 output channels, no multiple of the 64 weight rows of a tile (the descriptor zero-fills the
rest).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import DTYPE_IDS, DTYPES, assert_close64, assert_matches, launched, rounded

import fusedres
from fusedres.ops import bn as bn_ops
from fusedres.ops import conv as conv_ops
from fusedres.ops import hopper, route
from fusedres.ops.configs import HopperConfig, hopper_fprop_config
from fusedres.testing import check_module

N, C, H, W, K = 2, 16, 9, 19, 24
# (ksize, stride, padding): the geometries the engine takes
GEOMETRIES = [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 1, 0)]
GEOMETRY_IDS = ["1x1s1", "1x1s2", "3x3s1", "3x3s1-nopad"]
# epilogue fusions: (residual, out_shift and out_relu); each flag is its own constexpr branch,
# so all on covers them as well as one at a time would
EPILOGUES = [(False, False), (True, True)]
EPILOGUE_IDS = ["plain", "res-shift-relu"]
CL = torch.channels_last


def _inputs(dtype, device, ksize, stride, pad, n=N, c=C, h=H, w=W, k=K, seed=1):
    g = torch.Generator().manual_seed(seed)
    x64 = rounded(torch.randn(n, c, h, w, generator=g, dtype=torch.float64) + 0.2, dtype)
    w64 = rounded(torch.randn(k, c, ksize, ksize, generator=g, dtype=torch.float64) * 0.2, dtype)
    scale = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).float()
    shift = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5).float()
    oh, ow = conv_ops.conv_out_size(h, ksize, stride, pad), conv_ops.conv_out_size(w, ksize, stride, pad)
    res64 = rounded(torch.randn(n, k, oh, ow, generator=g, dtype=torch.float64), dtype)
    oshift = torch.randn(k, generator=g).float()
    dev = {
        "x": x64.to(device, dtype).contiguous(memory_format=CL),
        "w": w64.to(device, dtype).contiguous(memory_format=CL),
        "scale": scale.to(device), "shift": shift.to(device),
        "res": res64.to(device, dtype).contiguous(memory_format=CL), "oshift": oshift.to(device),
    }
    return x64, w64, scale.double(), shift.double(), res64, oshift.double(), dev


def _reference(x, w, scale, shift, res, oshift, stride, pad, prologue, residual, shift_relu, act_dtype=None):
    """The fused op in eager PyTorch (float64 when the inputs are; the activation rounded to
    ``act_dtype`` the way eager would hold it)."""
    a = x
    if prologue:
        a = torch.relu(x * scale.to(x)[None, :, None, None] + shift.to(x)[None, :, None, None])
        if act_dtype is not None:
            a = a.to(act_dtype)
    y = F.conv2d(a, w, None, stride, pad)
    if residual:
        y = y + res
    if shift_relu:
        y = torch.relu(y + oshift.to(y)[None, :, None, None])
    return y


def _assert_epilogue_stats(out: torch.Tensor, partials, k: int) -> None:  # noqa: ANN001
    """The epilogue's statistics partials, finalized, against the output's mean and variance in float64."""
    mean, invstd, _, _ = bn_ops.bn_finalize(
        partials, out.numel() // k, None, None, None, None,
        training=True, momentum=0.1, eps=0.0, channels=k, device=out.device,
    )
    o64 = out.double().cpu()
    assert_close64(mean, o64.mean((0, 2, 3)), 1e-5, "epilogue mean")
    assert_close64(invstd.double().pow(-2), o64.var((0, 2, 3), unbiased=False), 1e-5, "epilogue var")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ksize,stride,pad", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("prologue", [False, True], ids=["noprologue", "bn-relu"])
@pytest.mark.parametrize("residual,shift_relu", EPILOGUES, ids=EPILOGUE_IDS)
def test_fprop(poison, device, dtype, ksize, stride, pad, prologue, residual, shift_relu):
    x64, w64, scale, shift, res64, oshift, d = _inputs(dtype, device, ksize, stride, pad)
    ref = _reference(x64, w64, scale, shift, res64, oshift, stride, pad, prologue, residual, shift_relu)
    # Several 8x16 rectangles per image are merged into the image's partials; one is the image's.
    merged = ref.shape[2] > 8 or ref.shape[3] > 16
    with launched("hopper_fprop_kernel", *(["hopper_stats_merge_kernel"] if merged else [])):
        out, partials = hopper.conv_fprop(
            d["x"], d["w"], stride=stride, padding=pad,
            scale=d["scale"] if prologue else None, shift=d["shift"] if prologue else None,
            residual=d["res"] if residual else None, stats=True,
            out_shift=d["oshift"] if shift_relu else None, out_relu=shift_relu,
        )
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous(memory_format=CL)
    xe, we, re = x64.to(device, dtype), w64.to(device, dtype), res64.to(device, dtype)
    eager = _reference(xe, we, scale, shift, re, oshift, stride, pad, prologue, residual, shift_relu, dtype)
    assert_matches(out, ref, eager, dtype, "hopper fprop output")

    # One partial row per image, over OH*OW pixels: what bn_finalize merges.
    assert partials[0].shape == (N, K) and partials[2] == out.shape[2] * out.shape[3]
    mean, invstd, _, _ = bn_ops.bn_finalize(
        partials, out.numel() // K, None, None, None, None,
        training=True, momentum=0.1, eps=0.0, channels=K, device=out.device,
    )
    o64 = out.double().cpu()
    assert_close64(mean, o64.mean((0, 2, 3)), 1e-5, "epilogue mean")
    assert_close64(invstd.double().pow(-2), o64.var((0, 2, 3), unbiased=False), 1e-5, "epilogue var")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ksize,pad", [(1, 0), (3, 1)], ids=["1x1", "3x3"])
@pytest.mark.parametrize("k", [16, 8])
def test_fprop_narrow_cout_epilogue(poison, device, dtype, ksize, pad, k):
    """Cout 16 and 8 on the 64-row tile: the epilogue takes the accumulator's first 16 rows
    (EPI_N = 16, two halvings; test_fprop's Cout 24 takes 32); output and statistics of every
    stored channel, all fusions on."""
    x64, w64, scale, shift, res64, oshift, d = _inputs(dtype, device, ksize, 1, pad, k=k)
    assert hopper._epilogue_rows(k, hopper.hopper_fprop_config(C, k, ksize, 1, dtype).block_n) == 16
    ref = _reference(x64, w64, scale, shift, res64, oshift, 1, pad, True, True, True)
    with launched("hopper_fprop_kernel"):
        out, partials = hopper.conv_fprop(d["x"], d["w"], stride=1, padding=pad, scale=d["scale"],
                                          shift=d["shift"], residual=d["res"], stats=True,
                                          out_shift=d["oshift"], out_relu=True)
    eager = _reference(x64.to(dtype), w64.to(dtype), scale, shift, res64.to(dtype), oshift, 1, pad, True, True,
                       True, dtype)
    assert_matches(out, ref, eager, dtype, "hopper fprop output")
    _assert_epilogue_stats(out, partials, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fprop_one_image_one_rectangle_wide_channels(poison, device, dtype):
    """N=1; a 7x7 image in one rectangle (its partials are the image's, no merge); 96 channels in
    and out: several channel slices per tap and two weight tiles of 64 rows (the second half empty)."""
    x64, w64, scale, shift, res64, oshift, d = _inputs(dtype, device, 3, 1, 1, n=1, c=96, h=7, w=7, k=96)
    ref = _reference(x64, w64, scale, shift, res64, oshift, 1, 1, True, True, False)
    cfg = HopperConfig(block_h=8, block_w=8, block_n=64, block_k=32, num_warps=4, num_stages=2)
    with launched("hopper_fprop_kernel"):
        out, partials = hopper.conv_fprop(d["x"], d["w"], stride=1, padding=1, scale=d["scale"], shift=d["shift"],
                                          residual=d["res"], stats=True, config=cfg)
    eager = _reference(x64.to(dtype), w64.to(dtype), scale, shift, res64.to(dtype), oshift, 1, 1, True, True,
                       False, dtype)
    assert_matches(out, ref, eager, dtype, "hopper fprop output")
    assert partials[2] == 49 and partials[0].shape == (1, 96)
    assert_close64(partials[0][0], out.double().cpu().mean((0, 2, 3)), 1e-5, "image mean")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n,h,w", [(2, 7, 7), (1, 9, 12)], ids=["7x7-one-rectangle", "9x12-four-rectangles"])
def test_fprop_256_channel_tile(poison, device, dtype, n, h, w):
    """The tile the chooser gives 16-bit layers of Cout >= 512 (256 output channels per program,
    two stages, registers capped) run here at Cin 128 (two 64-channel slices: the prologue's
    vectors loaded per slice, as at 512) and Cout 272 (two channel blocks, the second holding 16
    real rows of 256), every fusion on; the statistics finalized by the launch (its last programs
    over 256 channels) match the merge and bn_finalize launches bit for bit."""
    k = 272
    cfg = hopper_fprop_config(512, 512, 3, 1, dtype)
    assert (cfg.block_n, cfg.block_k, cfg.num_stages, cfg.max_regs) == (256, 64, 2, 128), cfg
    x64, w64, scale, shift, res64, oshift, d = _inputs(dtype, device, 3, 1, 1, n=n, c=128, h=h, w=w, k=k)
    kw = dict(stride=1, padding=1, scale=d["scale"], shift=d["shift"], residual=d["res"], stats=True,
              out_shift=d["oshift"], out_relu=True, config=cfg)
    merged = h > 8 or w > 8
    with launched("hopper_fprop_kernel", *(["hopper_stats_merge_kernel"] if merged else [])):
        out, partials = hopper.conv_fprop(d["x"], d["w"], **kw)
    ref = _reference(x64, w64, scale, shift, res64, oshift, 1, 1, True, True, True)
    eager = _reference(x64.to(dtype), w64.to(dtype), scale, shift, res64.to(dtype), oshift, 1, 1, True, True, True,
                       dtype)
    assert_matches(out, ref, eager, dtype, "hopper fprop output (256-channel tile)")

    stats_a = torch.full((4, k), float("nan"), device=device)
    bn_ops.bn_finalize(partials, n * h * w, None, None, None, None, training=True, momentum=0.1, eps=1e-5,
                       channels=k, device=device, out=stats_a)
    stats_b = torch.full((4, k), float("nan"), device=device)
    f = bn_ops.Finalize(stats_b, None, None, None, None, None, 0.1, 1e-5)
    before = dict(fusedres.launch_counts)
    out_b, got = hopper.conv_fprop(d["x"], d["w"], finalize=f, **kw)
    ran = {name: c - before.get(name, 0) for name, c in fusedres.launch_counts.items() if c != before.get(name, 0)}
    assert ran == {"hopper_fprop_kernel": 1} and got is f
    assert torch.equal(out, out_b)
    assert torch.equal(stats_a, stats_b), (stats_a - stats_b).abs().max()
    assert_close64(stats_b[0], out.double().cpu().mean((0, 2, 3)), 1e-5, "finalized mean")



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fprop_one_k_step_1x1_rectangle(poison, device, dtype):
    """The tile the chooser gives a 16-bit 1x1 of Cin <= 32 and Cout >= 128 (the CIFAR
    bottleneck's 32->128): a 16x16 rectangle on one warpgroup, one K step, Cout / 64 programs
    per rectangle. Here 32->136 (a third column block with 8 real rows of 64) on 2 images of
    9x19 (two rectangles per image, both hanging over the edge: the per-image merge), every
    fusion on, output and statistics against float64."""
    k = 136
    cfg = hopper_fprop_config(32, 128, 1, 1, dtype)
    assert cfg == hopper_fprop_config(32, k, 1, 1, dtype)
    assert (cfg.block_h, cfg.block_w, cfg.block_n, cfg.num_warps) == (16, 16, 64, 4), cfg
    x64, w64, scale, shift, res64, oshift, d = _inputs(dtype, device, 1, 1, 0, c=32, k=k)
    ref = _reference(x64, w64, scale, shift, res64, oshift, 1, 0, True, True, True)
    with launched("hopper_fprop_kernel", "hopper_stats_merge_kernel"):
        out, partials = hopper.conv_fprop(d["x"], d["w"], stride=1, padding=0, scale=d["scale"], shift=d["shift"],
                                          residual=d["res"], stats=True, out_shift=d["oshift"], out_relu=True)
    eager = _reference(x64.to(dtype), w64.to(dtype), scale, shift, res64.to(dtype), oshift, 1, 0, True, True, True,
                       dtype)
    assert_matches(out, ref, eager, dtype, "hopper fprop output (one-K-step 1x1 rectangle)")
    _assert_epilogue_stats(out, partials, k)

def test_register_cap_reaches_the_launch(device, monkeypatch):
    """A tile's ``max_regs`` is passed to Triton as ``maxnreg`` (what keeps the 256- and 128-channel
    tiles at 128 registers, two CTAs per SM on sm_90); a tile without one leaves ptxas its own choice."""
    calls = []
    monkeypatch.setattr(hopper, "launch", lambda kernel, grid, *args, **kwargs: calls.append(kwargs))
    x = torch.zeros(1, 64, 7, 7, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    w = torch.zeros(512, 64, 3, 3, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    hopper.conv_fprop(x, w, stride=1, padding=1)
    hopper.conv_fprop(x, w[:128], stride=1, padding=1)
    hopper.conv_fprop(x, w[:64], stride=1, padding=1)
    assert calls[0]["maxnreg"] == 128 and calls[0]["BLOCK_N"] == 256
    assert calls[1]["maxnreg"] == 128 and calls[1]["BLOCK_N"] == 128
    assert "maxnreg" not in calls[2] and calls[2]["BLOCK_N"] == 64


def test_fprop_without_stats_into_given_output(poison, device):
    x64, w64, scale, shift, res64, oshift, d = _inputs(torch.bfloat16, device, 3, 1, 1)
    out = torch.empty((N, K, H, W), device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    with launched("hopper_fprop_kernel"):
        y, partials = hopper.conv_fprop(d["x"], d["w"], stride=1, padding=1, scale=d["scale"], shift=d["shift"],
                                        out=out)
    assert y is out and partials is None
    ref = _reference(x64, w64, scale, shift, res64, oshift, 1, 1, True, False, False)
    eager = _reference(x64.bfloat16(), w64.bfloat16(), scale, shift, None, None, 1, 1, True, False, False,
                       torch.bfloat16)
    assert_matches(out, ref, eager, torch.bfloat16, "hopper fprop output")


def test_fprop_wide_tile_masks_every_tap(poison, device):
    """A 16x16 rectangle of 64-channel boxes (128 activations per thread: the padding mask is
    applied on every tap, no branch around it) over one 64-channel slice, Cout 24."""
    x64, w64, scale, shift, res64, oshift, d = _inputs(torch.bfloat16, device, 3, 1, 1, c=64)
    cfg = HopperConfig(block_h=16, block_w=16, block_n=64, block_k=64, num_warps=4, num_stages=2)
    with launched("hopper_fprop_kernel"):
        out, _ = hopper.conv_fprop(d["x"], d["w"], stride=1, padding=1, scale=d["scale"], shift=d["shift"],
                                   residual=d["res"], config=cfg)
    ref = _reference(x64, w64, scale, shift, res64, oshift, 1, 1, True, True, False)
    eager = _reference(x64.bfloat16(), w64.bfloat16(), scale, shift, res64.bfloat16(), oshift, 1, 1, True, True,
                       False, torch.bfloat16)
    assert_matches(out, ref, eager, torch.bfloat16, "hopper fprop output")


# The 3x3 64-channel layer's tiles: the chooser's 8x32 rectangle and the 8x16 it replaced (the
# fp32 min behind the mask's branch).
TILES_64 = [hopper_fprop_config(64, 64, 3, 1, torch.bfloat16), HopperConfig(8, 16, 64, 64, 4, 3)]


@pytest.mark.parametrize("cfg", TILES_64, ids=["8x32", "8x16"])
@pytest.mark.parametrize("n,c,h,w,zero_scale", [(1, 64, 9, 37, False), (2, 64, 10, 12, True), (1, 128, 10, 12, False)],
                         ids=["N1-9x37", "10x12-zero-scale", "128ch-10x12"])
def test_fprop_64_channel_tiles(poison, device, cfg, n, c, h, w, zero_scale):
    """Every fusion, 64 output channels, images that no rectangle divides (9x37: rectangles over the
    bottom and right edges; 10x12: one narrower than either), padding taps at every edge. The
    8x32 tile masks by the pad value behind the branch; ``zero_scale`` (channel 5: scale 0, shift
    0.75, whose activation relu(shift) inside the image no pad value makes 0 at the padding) sends
    the program to the loop with the select on the rounded tile, as two 64-channel slices do."""
    assert hopper_fprop_config(64, 64, 3, 1, torch.bfloat16) == HopperConfig(8, 32, 64, 64, 4, 2)
    x64, w64, scale, shift, res64, oshift, d = _inputs(torch.bfloat16, device, 3, 1, 1, n=n, c=c, h=h, w=w, k=64)
    if zero_scale:
        scale[5], shift[5] = 0.0, 0.75
        d["scale"], d["shift"] = scale.float().to(device), shift.float().to(device)
    merged = h > cfg.block_h or w > cfg.block_w  # several rectangles per image: the merge launch
    with launched("hopper_fprop_kernel", *(["hopper_stats_merge_kernel"] if merged else [])):
        out, partials = hopper.conv_fprop(d["x"], d["w"], stride=1, padding=1, scale=d["scale"], shift=d["shift"],
                                          residual=d["res"], stats=True, out_shift=d["oshift"], out_relu=True,
                                          config=cfg)
    ref = _reference(x64, w64, scale, shift, res64, oshift, 1, 1, True, True, True)
    eager = _reference(x64.bfloat16(), w64.bfloat16(), scale, shift, res64.bfloat16(), oshift, 1, 1, True, True,
                       True, torch.bfloat16)
    assert_matches(out, ref, eager, torch.bfloat16, f"hopper fprop output ({cfg.block_h}x{cfg.block_w})")
    assert_close64(partials[0].double().mean(0), out.double().cpu().mean((0, 2, 3)), 1e-5, "image mean")


NAN, INF = float("nan"), float("inf")
# (BatchNorm vector, value) put in channel 1: a non-finite scale or shift makes the channel's
# activation non-finite (or, -Inf shift, 0) inside the image; the zero padding must stay 0, as
# eager pads after the activation.
NONFINITE = [("shift", INF), ("scale", INF), ("shift", -INF), ("scale", NAN), ("scale", 0.0)]
NONFINITE_IDS = ["shift+inf", "scale+inf", "shift-inf", "scale-nan", "scale0-shift+"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tile", ["branch", "every-tap", "pad-value"])
@pytest.mark.parametrize("which,value", NONFINITE, ids=NONFINITE_IDS)
def test_fprop_nonfinite_scale_shift_padding(poison, device, dtype, tile, which, value):
    """NaN, +Inf and -Inf where eager PyTorch has them when scale or shift is non-finite (and 0 at the
    padding of a zero scale with a positive shift, which no pad value gives), with the
    taps that read the padding on both paths (taps that stay inside the image for a rectangle skip
    the mask; the wide tile masks every tap; the 64-channel 8x32 tile by the pad value, which +Inf
    scale and -Inf shift keep: the others send it to the loop with the mask on every tap).
    Channel 1's weights are negative on the left filter column and positive elsewhere: at the left
    edge eager sees only positive weights times +Inf, so a padding tap that came out Inf or NaN
    would turn that +Inf into NaN."""
    c, k = (C, K) if tile == "branch" else (64, K if tile == "every-tap" else 64)
    x64, w64, scale, shift, _, _, d = _inputs(dtype, device, 3, 1, 1, c=c, k=k)
    vecs = {"scale": scale.clone(), "shift": shift.clone()}
    vecs[which][1] = value
    if value == 0.0:  # a zero scale with a positive shift: relu(shift) inside, no pad value gives 0
        vecs["shift"][1] = 0.75
    w64[:, 1] = w64[:, 1].abs()
    w64[:, 1, :, 0] = -w64[:, 1, :, 0]
    w = w64.to(device, dtype).contiguous(memory_format=CL)
    cfg = {"branch": None, "every-tap": HopperConfig(16, 16, 64, 64, 4, 2),
           "pad-value": HopperConfig(8, 32, 64, 64, 4, 2)}[tile]
    with launched("hopper_fprop_kernel"):
        out, _ = hopper.conv_fprop(d["x"], w, stride=1, padding=1, scale=vecs["scale"].float().to(device),
                                   shift=vecs["shift"].float().to(device), config=cfg)
    eager = _reference(x64.to(dtype), w64.to(dtype), vecs["scale"], vecs["shift"], None, None, 1, 1, True, False,
                       False, dtype).to(dtype)
    ref = _reference(x64, w64, vecs["scale"], vecs["shift"], None, None, 1, 1, True, False, False)
    got = out.cpu()
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(test(got), test(eager)), (
            f"{name} at {test(got).sum().item()} positions, eager at {test(eager).sum().item()}")
    if value == INF:
        assert torch.isposinf(eager[..., 0]).any(), "no +Inf at the left edge: a bad padding tap would not show"
    finite = torch.isfinite(eager)
    if finite.any():
        assert_matches(got[finite], ref[finite], eager[finite], dtype, "finite outputs")


# ---------------------------------------------------------------- selection (fusedres.ops.route)


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values, dense channels_last, at an address 2 bytes past a 16-byte boundary."""
    flat = torch.empty(x.numel() + 8, dtype=x.dtype, device=x.device)[1 : 1 + x.numel()]
    return flat.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2).copy_(x)


def _fallbacks(device):
    x = torch.randn(2, 16, 9, 19, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    w3 = torch.randn(24, 16, 3, 3, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    x24 = torch.randn(2, 24, 9, 19, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    w24 = torch.randn(24, 24, 3, 3, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    # (what, x, weight, stride, padding, words of the reason)
    return [
        ("Cin 24", x24, w24, 1, 1, "Cin=24 is not a multiple of 16"),
        ("3x3 stride 2", x, w3, 2, 1, "stride 2 with a 3x3 kernel"),
        ("NCHW x", x.contiguous(), w3, 1, 1, "x is not dense channels_last"),
        ("NCHW weight", x, w3.contiguous(), 1, 1, "weight is not dense channels_last"),
        ("misaligned x", _misaligned(x), w3, 1, 1, "x is not dense channels_last at a 16-byte aligned address"),
        ("fp32 without TF32", x.float(), w3.float(), 1, 1, "fp32 without TF32"),
    ]


def test_each_fallback_reason_is_named(device):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # for the fp32 case; the 16-bit ones ignore it
    try:
        with route.engine("hopper"):
            for what, x, w, stride, pad, reason in _fallbacks(device):
                engine, why = route.fprop_engine(x, w, stride, pad)
                assert engine == "pointer" and reason in why, f"{what}: {engine}, {why!r}"
                with pytest.raises(ValueError, match=reason):
                    hopper.conv_fprop(x, w, stride=stride, padding=pad)
    finally:
        torch.backends.cudnn.allow_tf32 = old


def test_fallbacks_run_the_pointer_kernel(poison, device):
    """On the route every fallback computes on the pointer engine (the 3x3 stride-2 one here)."""
    x64, w64, scale, shift, res64, oshift, d = _inputs(torch.bfloat16, device, 3, 2, 1)
    with route.engine("hopper"), launched("conv_fprop_kernel"):
        out, _ = route.conv_fprop(d["x"], d["w"], stride=2, padding=1, scale=d["scale"], shift=d["shift"])
    eager = _reference(x64.bfloat16(), w64.bfloat16(), scale, shift, None, None, 2, 1, True, False, False,
                       torch.bfloat16)
    ref = _reference(x64, w64, scale, shift, None, None, 2, 1, True, False, False)
    assert_matches(out, ref, eager, torch.bfloat16, "fallback output")


def test_engine_overrides(device, monkeypatch):
    monkeypatch.setattr(route, "_ENGINE_OVERRIDES", [])  # lift the suite's engine("pointer")
    monkeypatch.delenv("FUSEDRES_CONV_ENGINE", raising=False)
    x = torch.randn(1, 16, 5, 5, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    w = torch.randn(16, 16, 1, 1, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    engine, why = route.fprop_engine(x, w, 1, 0)  # opt-in until a GPU run validates it
    assert engine == "pointer" and why.startswith("FUSEDRES_CONV_ENGINE=pointer (the default")
    monkeypatch.setenv("FUSEDRES_CONV_ENGINE", "auto")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        assert route.fprop_engine(x, w, 1, 0) == ("hopper", None)
    else:
        engine, why = route.fprop_engine(x, w, 1, 0)
        assert engine == "pointer" and "is not an sm_90 GPU" in why
    monkeypatch.setenv("FUSEDRES_CONV_ENGINE", "hopper")
    assert route.fprop_engine(x, w, 1, 0) == ("hopper", None)
    with route.engine("pointer"):  # the innermost override wins over the environment
        assert route.fprop_engine(x, w, 1, 0) == ("pointer", "engine('pointer') in effect")
        with route.engine("hopper"):
            assert route.fprop_engine(x, w, 1, 0) == ("hopper", None)
    monkeypatch.setenv("FUSEDRES_CONV_ENGINE", "pointer")
    assert route.fprop_engine(x, w, 1, 0)[0] == "pointer"
    with pytest.raises(ValueError, match="engine must be"):
        route.engine("cutlass")
    monkeypatch.setenv("FUSEDRES_CONV_ENGINE", "cutlass")
    with pytest.raises(ValueError, match="FUSEDRES_CONV_ENGINE must be"):
        route.fprop_engine(x, w, 1, 0)


def test_route_runs_the_hopper_engine(poison, device):
    x64, w64, scale, shift, res64, oshift, d = _inputs(torch.float16, device, 1, 2, 0)
    with route.engine("hopper"), launched("hopper_fprop_kernel"):
        out, partials = route.conv_fprop(d["x"], d["w"], stride=2, padding=0, scale=d["scale"], shift=d["shift"],
                                         residual=d["res"], stats=True)
    ref = _reference(x64, w64, scale, shift, res64, oshift, 2, 0, True, True, False)
    eager = _reference(x64.half(), w64.half(), scale, shift, res64.half(), oshift, 2, 0, True, True, False,
                       torch.float16)
    assert_matches(out, ref, eager, torch.float16, "routed output")
    assert partials[2] == out.shape[2] * out.shape[3]


def test_block_trains_on_the_hopper_engine(poison, device):
    """A basic block's forward convolutions and input gradients on the Hopper engine, its
    statistics partials through the BatchNorm finalize, its backward sums through the dgrad's
    ticket, the weight gradients through the Hopper wgrad's split-merge ticket: the same training
    as eager."""
    block = fusedres.PreActBasicBlock(16, 16)
    with route.engine("hopper"), launched("hopper_fprop_kernel", "hopper_dgrad_kernel", "hopper_wgrad_kernel"):
        r = check_module(block, (1, 16, 9, 7), dtype=torch.float32, device=device, steps=1)
    bad = r.failures(torch.float32)
    assert not bad, "; ".join(bad)


def _finalize_inputs(k, affine, running, device, seed=3):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(k, generator=g) + 0.5).to(device) if affine else None
    bias = torch.randn(k, generator=g).to(device) if affine else None
    rm = torch.randn(k, generator=g).to(device) if running else None
    rv = (torch.rand(k, generator=g) + 0.5).to(device) if running else None
    return weight, bias, rm, rv


@pytest.mark.parametrize("shape,box", [((2, 16, 9, 19), (8, 16)), ((3, 16, 7, 7), (8, 8))],
                         ids=["4-rectangles-per-image", "1-rectangle-per-image"])
@pytest.mark.parametrize("affine,running", [(True, True), (False, False)], ids=["affine-running", "bare"])
def test_fprop_ticket_finalizes_as_the_two_launches(poison, device, shape, box, affine, running):
    """With a Finalize the launch merges each image's rectangles in the image's last program and
    finalizes over the images in the channel block's last program: the same bits as the merge
    launch and bn_finalize after it (statistics rows and running statistics), in one launch."""
    n, c, h, w = shape
    x64, w64, scale, shift, res64, oshift, d = _inputs(torch.bfloat16, device, 3, 1, 1, n=n, c=c, h=h, w=w)
    cfg = HopperConfig(block_h=box[0], block_w=box[1], block_n=64, block_k=16, num_warps=4, num_stages=2)
    weight, bias, rm, rv = _finalize_inputs(K, affine, running, device)
    kw = dict(stride=1, padding=1, scale=d["scale"], shift=d["shift"], residual=d["res"], stats=True, config=cfg)

    before = dict(fusedres.launch_counts)
    out_a, partials = hopper.conv_fprop(d["x"], d["w"], **kw)
    stats_a = torch.full((4, K), float("nan"), device=device)
    run_a = (rm.clone(), rv.clone()) if running else None
    bn_ops.bn_finalize(partials, partials[0].shape[0] * partials[2], weight, bias,
                       run_a[0] if running else None, run_a[1] if running else None, training=True, momentum=0.1,
                       eps=1e-5, channels=K, device=device, out=stats_a)

    mid = dict(fusedres.launch_counts)
    stats_b = torch.full((4, K), float("nan"), device=device)
    run_b = (rm.clone(), rv.clone()) if running else (None, None)
    f = bn_ops.Finalize(stats_b, weight, bias, run_b[0], run_b[1], None, 0.1, 1e-5)
    out_b, got = hopper.conv_fprop(d["x"], d["w"], finalize=f, **kw)
    after = dict(fusedres.launch_counts)
    two = {k: v - before.get(k, 0) for k, v in mid.items() if v != before.get(k, 0)}
    one = {k: v - mid.get(k, 0) for k, v in after.items() if v != mid.get(k, 0)}
    merge = {"hopper_stats_merge_kernel": 1} if box == (8, 16) else {}
    assert two == {"hopper_fprop_kernel": 1, "bn_finalize_kernel": 1, **merge}
    assert one == {"hopper_fprop_kernel": 1}
    assert got is f
    assert torch.equal(out_a, out_b)
    assert torch.equal(stats_a, stats_b), (stats_a - stats_b).abs().max()
    if running:
        assert torch.equal(run_a[0], run_b[0]) and torch.equal(run_a[1], run_b[1])
    # and the statistics are those of the stored output
    assert_close64(stats_b[0], out_b.double().cpu().mean((0, 2, 3)), 1e-5, "finalized mean")


def test_fprop_ticket_leaves_many_images_to_bn_finalize(poison, device, monkeypatch):
    """Above TWO_LEVEL_TILES images (bn_finalize merges chunks of images first) the launch takes
    no ticket: the route finalizes the per-image partials in a launch of their own."""
    monkeypatch.setattr(hopper, "TWO_LEVEL_TILES", 1)
    x64, w64, scale, shift, res64, oshift, d = _inputs(torch.bfloat16, device, 3, 1, 1)
    stats = torch.full((4, K), float("nan"), device=device)
    f = bn_ops.Finalize(stats, None, None, None, None, None, 0.1, 1e-5)
    with route.engine("hopper"), launched("hopper_fprop_kernel", "hopper_stats_merge_kernel", "bn_finalize_kernel"):
        out, got = route.conv_fprop(d["x"], d["w"], stride=1, padding=1, scale=d["scale"], shift=d["shift"],
                                    stats=True, finalize=f)
    assert got is f
    assert_close64(stats[0], out.double().cpu().mean((0, 2, 3)), 1e-5, "finalized mean")
