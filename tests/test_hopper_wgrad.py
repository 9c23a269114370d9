"""The sm_90 engine's weight gradient (fusedres.ops.hopper.conv_wgrad) against float64 PyTorch,
its bitwise determinism, and the route's choice of it.

Under the interpreter the tensor descriptors are emulated (out-of-range boxes zero-filled), so
the same kernel runs here as on an H100/H200. Shapes: 2 images of 9x19 pixels (no multiple of the
8x8 or 8x16 rectangle either way), 24 input channels (one 32- or 16-channel block, part empty) and
48 output channels (one 64-row dy box, 16 rows zero-filled); three splits of the rectangles, so
that the last split's ticket merges partials from all three.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _helpers import DTYPE_IDS, DTYPES, assert_matches, launched, rounded

from fusedres.ops import bn as bn_ops
from fusedres.ops import conv as conv_ops
from fusedres.ops import hopper, route
from fusedres.ops.configs import HopperWgradConfig

N, C, H, W, K = 2, 24, 9, 19, 48
CL = torch.channels_last
# (ksize, padding, stride)
GEOMETRIES = [(1, 0, 1), (3, 1, 1), (3, 0, 1)]
GEOMETRY_IDS = ["1x1", "3x3", "3x3-nopad"]
CASES = [
    pytest.param(dtype, ksize, pad, stride, prologue, id=f"{did}-{gid}-{'bnrelu' if prologue else 'plain'}")
    for dtype, did in zip(DTYPES, DTYPE_IDS)
    for (ksize, pad, stride), gid in zip(GEOMETRIES, GEOMETRY_IDS)
    for prologue in (True, False)
    if dtype == torch.bfloat16 or gid != "3x3-nopad"
]


def _inputs(device, dtype, ksize, pad, stride, prologue, n=N, c=C, h=H, w=W, k=K, seed=3):
    g = torch.Generator().manual_seed(seed)
    x64 = rounded(torch.randn(n, c, h, w, generator=g, dtype=torch.float64) + 0.2, dtype)
    oh, ow = (h + 2 * pad - ksize) // stride + 1, (w + 2 * pad - ksize) // stride + 1
    dy64 = rounded(torch.randn(n, k, oh, ow, generator=g, dtype=torch.float64), dtype)
    scale = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    # a positive mean shift: relu(shift) is not 0, so a padding tap left unmasked would show
    shift = torch.randn(c, generator=g, dtype=torch.float64) * 0.5 + 0.5
    if prologue:
        a64 = torch.relu(x64 * scale[None, :, None, None] + shift[None, :, None, None])
        a_eager = torch.relu(x64.to(device, torch.float32) * scale.to(device, torch.float32)[None, :, None, None]
                             + shift.to(device, torch.float32)[None, :, None, None]).to(dtype)
    else:
        a64, a_eager = x64, x64.to(device, dtype)
    shape = (k, c, ksize, ksize)
    ref = torch.nn.grad.conv2d_weight(a64, shape, dy64, stride, pad)
    eager = torch.nn.grad.conv2d_weight(a_eager, shape, dy64.to(device, dtype), stride, pad)
    f32 = {"device": device, "dtype": torch.float32}
    args = dict(stride=stride, padding=pad,
                scale=scale.to(**f32) if prologue else None, shift=shift.to(**f32) if prologue else None)
    dy = dy64.to(device, dtype).contiguous(memory_format=CL)
    x = x64.to(device, dtype).contiguous(memory_format=CL)
    like = torch.empty(shape, device=device, dtype=dtype).contiguous(memory_format=CL)
    return dy, x, like, args, ref, eager


def _check(device, dtype, ksize, pad, stride, prologue, *, splits=3, config=None, like_nchw=False, **shape):
    dy, x, like, args, ref, eager = _inputs(device, dtype, ksize, pad, stride, prologue, **shape)
    if like_nchw:
        like = like.contiguous()
    with launched("hopper_wgrad_kernel"):
        dw = hopper.conv_wgrad(dy, x, like, splits=splits, config=config, **args)
    assert dw.shape == like.shape and dw.dtype == dtype and dw.stride() == like.stride()
    assert_matches(dw, ref, eager, dtype, "hopper wgrad")
    # bitwise the same run to run, and the same as the two-launch path (splits reduced by
    # wgrad_reduce_kernel over the same workspace)
    again = hopper.conv_wgrad(dy, x, like, splits=splits, config=config, **args)
    assert torch.equal(dw, again), "the ticket merge is not bitwise reproducible"
    with bn_ops.producer_reductions(False), launched("wgrad_reduce_kernel"):
        pending = hopper.conv_wgrad(dy, x, like, splits=splits, config=config, defer_reduce=True, **args)
        assert isinstance(pending, conv_ops.PendingWgrad)
        two = pending.finish()
    assert torch.equal(dw, two), "the in-launch merge differs from the two-launch reduction"
    return dw


@pytest.mark.parametrize("dtype,ksize,pad,stride,prologue", CASES)
def test_wgrad(poison, device, dtype, ksize, pad, stride, prologue):
    _check(device, dtype, ksize, pad, stride, prologue)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_wgrad_one_image_wide_channels(poison, device, dtype):
    """N=1, a 7x7 image in one 8x8 rectangle (one split), 40 input channels (two 32-channel blocks,
    the second mostly empty) and 80 output channels (two 64-row dy boxes), weight_like NCHW."""
    _check(device, dtype, 3, 1, 1, True, splits=None, n=1, c=40, h=7, w=7, k=80, like_nchw=True)


def test_wgrad_two_warpgroups(poison, device):
    """A 128-row tile (128 dy rows per program, 8 warps: the wider alternative for Cout >= 128 that
    a GPU run may prefer; the chooser gives every Cout the 64-row tile) with 144 output channels: a
    full and a mostly empty Cout block."""
    from fusedres.ops.configs import HopperWgradConfig, hopper_wgrad_config

    chosen = hopper_wgrad_config(C, 144, 3, 1, torch.bfloat16)
    assert (chosen.block_m, chosen.num_warps) == (64, 4)
    cfg = HopperWgradConfig(block_h=8, block_w=8, block_m=128, block_n=chosen.block_n, taps=9, num_warps=8,
                            num_stages=3)
    _check(device, torch.bfloat16, 3, 1, 1, True, config=cfg, k=144)


def test_wgrad_nopad_fewer_dy_columns(poison, device):
    """3x3 without padding where dy has fewer 8-wide column tiles than x (OW = 15, W = 17): the
    rectangles step over dy's columns and x's rows, three splits starting mid-row."""
    _check(device, torch.bfloat16, 3, 0, 1, True, h=9, w=17)


def test_wgrad_strided_1x1(poison, device):
    """The projection shortcut: 1x1 at stride 2, the descriptor over x's strided view."""
    _check(device, torch.bfloat16, 1, 0, 2, True, h=9, w=19)


def test_wgrad_row_of_taps(poison, device):
    """taps=3: a 3x3 in three programs of one filter row each (per rectangle one dy box and the
    three activation boxes); a tap group that is not whole filter rows is refused."""
    cfg = HopperWgradConfig(block_h=4, block_w=8, block_m=64, block_n=16, taps=3, num_warps=4, num_stages=2)
    _check(device, torch.float16, 3, 1, 1, True, config=cfg)
    dy, x, like, args, _, _ = _inputs(device, torch.float16, 3, 1, 1, True)
    with pytest.raises(ValueError, match="taps=1 is not a whole number of the 3x3 kernel's filter rows"):
        hopper.conv_wgrad(dy, x, like, config=dataclasses.replace(cfg, taps=1), **args)


# the interpreter's numpy matmul warns on the inf * 0 this test makes on purpose
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_wgrad_infinite_activation_in_the_first_row(device):
    """The documented non-finite difference (README): an infinite x in the first row meets the
    zero-filled dy above the image at filter row 2, NaN there where eager leaves the term out;
    every other weight gradient is as finite or not as eager's."""
    dy, x, like, args, _, _ = _inputs(device, torch.bfloat16, 3, 1, 1, True)
    x[0, 3, 0, 5] = float("inf")
    dw = hopper.conv_wgrad(dy, x, like, splits=3, **args).float().cpu()
    a = torch.relu(x.float() * args["scale"][None, :, None, None] + args["shift"][None, :, None, None])
    eager = torch.nn.grad.conv2d_weight(a.to(torch.bfloat16).float(), like.shape, dy.float(), 1, 1).cpu()
    differs = dw.isfinite() != eager.isfinite()
    assert differs.any() and dw[differs].isnan().all() and eager[differs].isfinite().all()
    assert differs.nonzero()[:, 1:3].unique(dim=0).tolist() == [[3, 2]], "only channel 3, filter row 2"


def test_route_runs_the_hopper_wgrad(poison, device):
    dy, x, like, args, ref, eager = _inputs(device, torch.bfloat16, 3, 1, 1, True)
    with route.engine("hopper"), launched("hopper_wgrad_kernel"):
        dw = route.conv_wgrad(dy, x, like, **args)
    assert_matches(dw, ref, eager, torch.bfloat16, "routed hopper wgrad")


# ---------------------------------------------------------------- selection (fusedres.ops.route)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)[1 : 1 + t.numel()]
    return flat.view(t.shape[0], t.shape[2], t.shape[3], t.shape[1]).permute(0, 3, 1, 2).copy_(t)


def _fallbacks(device):
    def act(k, h=9, w=19, dtype=torch.bfloat16):
        return torch.randn(2, k, h, w, device=device, dtype=dtype).contiguous(memory_format=CL)

    w3 = torch.empty(32, 16, 3, 3, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    # (what, dy, x, weight_like, stride, padding, words of the reason)
    return [
        ("3x3 stride 2", act(32, 5, 10), act(16), w3, 2, 1, "stride 2 with a 3x3 kernel"),
        ("Cout 12", act(12), act(16), w3[:12], 1, 1, "dy is not dense channels_last"),
        ("Cin 12", act(32), act(12), w3[:, :12], 1, 1, "x is not dense channels_last"),
        ("NCHW dy", act(32).contiguous(), act(16), w3, 1, 1, "dy is not dense channels_last"),
        ("misaligned x", act(32), _misaligned(act(16)), w3, 1, 1, "x is not dense channels_last"),
        ("fp32 without TF32", act(32, dtype=torch.float32), act(16, dtype=torch.float32), w3.float(), 1, 1,
         "fp32 without TF32"),
        ("5x5", act(32, 9, 19), act(16), torch.empty(32, 16, 5, 5, device=device), 1, 2,
         "more than 3 filter rows or columns"),
        ("1x5", act(32, 9, 15), act(16), torch.empty(32, 16, 1, 5, device=device), 1, 0,
         "more than 3 filter rows or columns"),
    ]


def test_each_wgrad_fallback_reason_is_named(device):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # for the fp32 case; the 16-bit ones ignore it
    try:
        with route.engine("hopper"):
            for what, dy, x, w, stride, pad, reason in _fallbacks(device):
                engine, why = route.wgrad_engine(dy, x, w, stride, pad)
                assert engine == "pointer" and reason in why, f"{what}: {engine}, {why!r}"
                with pytest.raises(ValueError, match=reason):
                    hopper.conv_wgrad(dy, x, w, stride=stride, padding=pad)
    finally:
        torch.backends.cudnn.allow_tf32 = old


def test_wgrad_fallback_runs_the_pointer_kernel(poison, device):
    """Stride 2 3x3 on the route: the pointer wgrad, against float64."""
    dy, x, like, args, ref, eager = _inputs(device, torch.bfloat16, 3, 1, 2, True)
    with route.engine("hopper"), launched("conv_wgrad_kernel"):
        dw = route.conv_wgrad(dy, x, like, **args)
    assert_matches(dw, ref, eager, torch.bfloat16, "fallback wgrad")


def test_wgrad_engine_overrides(device, monkeypatch):
    """The same opt-in as the other roles: pointer by default, auto on sm_90 only, hopper anywhere."""
    monkeypatch.setattr(route, "_ENGINE_OVERRIDES", [])
    monkeypatch.delenv("FUSEDRES_CONV_ENGINE", raising=False)
    dy = torch.randn(1, 16, 5, 5, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    x = torch.randn(1, 16, 5, 5, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    w = torch.empty(16, 16, 3, 3, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
    engine, why = route.wgrad_engine(dy, x, w, 1, 1)
    assert engine == "pointer" and why.startswith("FUSEDRES_CONV_ENGINE=pointer (the default")
    monkeypatch.setenv("FUSEDRES_CONV_ENGINE", "auto")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        assert route.wgrad_engine(dy, x, w, 1, 1) == ("hopper", None)
    else:
        engine, why = route.wgrad_engine(dy, x, w, 1, 1)
        assert engine == "pointer" and "is not an sm_90 GPU" in why
    monkeypatch.setenv("FUSEDRES_CONV_ENGINE", "hopper")
    assert route.wgrad_engine(dy, x, w, 1, 1) == ("hopper", None)
    with route.engine("pointer"):
        assert route.wgrad_engine(dy, x, w, 1, 1) == ("pointer", "engine('pointer') in effect")
