"""The cuDNN route of the convolutions (fusedres.ops.route): same results as the Triton kernels
and as eager PyTorch, the fusions around it kept, and the measured dispatch table's lookup."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import CONV_KERNEL_NAMES, CONV_KERNELS, ROUTE_KERNELS, launched
from torch import nn

import fusedres
from fusedres import launch_counts
from fusedres.ops import bn as bn_ops
from fusedres.ops import conv as conv_ops
from fusedres.ops import route
from fusedres.testing import check_module


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.2
            m.running_mean.data = torch.randn(m.running_mean.shape, generator=g) * 0.2
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
    return model


def _torchvision(kind: str) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if kind == "tv-basic":
        return fusedres.convert(nn.Sequential(BasicBlock(8, 8)))
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    return fusedres.convert(nn.Sequential(Bottleneck(8, 4, 2, downsample=ds)))


CASES = {
    "basic-identity": lambda: fusedres.PreActBasicBlock(12, 12),
    "basic-proj-s2": lambda: fusedres.PreActBasicBlock(6, 10, 2),
    "bottleneck-proj-s2": lambda: fusedres.PreActBottleneck(8, 3, 2),
    "tv-basic": lambda: _torchvision("tv-basic"),
    "tv-bottleneck-downsample": lambda: _torchvision("tv-bottleneck"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_blocks_on_the_cudnn_route_match_eager(poison, device, no_tf32, name):
    block = _randomize_bn(CASES[name]())
    cin = next(m for m in block.modules() if isinstance(m, nn.Conv2d)).in_channels
    before = {k: launch_counts[k] for k in CONV_KERNEL_NAMES}
    with route.force("cudnn"), launched(*ROUTE_KERNELS):
        r = check_module(block, (2, cin, 9, 7), dtype=torch.float32, device=device, steps=2)
    bad = r.failures(torch.float32)
    assert not bad, "; ".join(bad)
    assert {k: launch_counts[k] for k in CONV_KERNEL_NAMES} == before, "a Triton convolution ran on the cuDNN route"


@pytest.mark.parametrize("stride,ksize", [(1, 3), (2, 3), (2, 1)])
def test_route_roles_match_triton_kernels(poison, device, no_tf32, stride, ksize):
    """Each role on the cuDNN route against the Triton kernel with the same fusion."""
    torch.manual_seed(1)
    cl = torch.channels_last
    x = torch.randn(2, 6, 7, 9, device=device).contiguous(memory_format=cl)
    w = torch.randn(5, 6, ksize, ksize, device=device).contiguous(memory_format=cl)
    scale, shift = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device) * 0.3
    mean, invstd = torch.randn(6, device=device) * 0.1, torch.rand(6, device=device) + 0.5
    pad = ksize // 2
    res_shape = (2, 5, conv_ops.conv_out_size(7, ksize, stride, pad), conv_ops.conv_out_size(9, ksize, stride, pad))
    residual = torch.randn(res_shape, device=device).contiguous(memory_format=cl)
    dy = torch.randn(res_shape, device=device).contiguous(memory_format=cl)
    add = torch.randn(x.shape, device=device).contiguous(memory_format=cl)
    results = {}
    for backend in ("triton", "cudnn"):
        with route.force(backend), launched(*(CONV_KERNELS if backend == "triton" else ROUTE_KERNELS)):
            y, partials = route.conv_fprop(x, w, stride=stride, padding=pad, scale=scale, shift=shift,
                                           residual=residual, stats=True)
            stats = bn_ops.bn_finalize(partials, y.shape[0] * y.shape[2] * y.shape[3], None, None, None, None,
                                       training=True, momentum=0.1, eps=1e-5, channels=5, device=y.device)
            dz, (ps, psx) = route.conv_dgrad(dy, w, tuple(x.shape), stride=stride, padding=pad,
                                             bn=(x, scale, shift, mean, invstd), add=add)
            sums = bn_ops.bn_bwd_reduce(ps, psx)
            dw = route.conv_wgrad(dy, x, w, stride=stride, padding=pad, scale=scale, shift=shift)
        results[backend] = {"y": y, "mean": stats[0], "invstd": stats[1], "dz": dz, "sum_dz": sums[0],
                            "sum_dzx": sums[1], "dw": dw}
    for k, v in results["triton"].items():
        got = results["cudnn"][k]
        assert got.shape == v.shape and got.stride() == v.stride(), k
        torch.testing.assert_close(got, v, rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_partials_pass_adds_in_place(poison, device, dtype):
    """The pass after a cuDNN dgrad with ``add`` and ``in_place``: the same dz and sums, bit for
    bit, as adding first (``da.add_(add)``, rounded) and running the pass on the sum; dz lands in
    da's storage."""
    g = torch.Generator().manual_seed(3)
    cl = torch.channels_last

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device)

    da = rand(3, 19, 9, 7).to(dtype).contiguous(memory_format=cl)
    add = rand(3, 19, 9, 7).to(dtype).contiguous(memory_format=cl)
    x = rand(3, 19, 9, 7).to(dtype).contiguous(memory_format=cl)
    scale, shift = rand(19).abs() + 0.5, rand(19, scale=0.3)
    mean, invstd = rand(19, scale=0.1), rand(19).abs() + 0.5
    summed = da.clone().add_(add)
    with launched("relu_bn_bwd_partials_kernel"):
        ref_dz, (ref_ps, ref_psx) = bn_ops.relu_bn_bwd_partials(summed, x, scale, shift, mean, invstd)
        buf = da.clone()
        dz, (ps, psx) = bn_ops.relu_bn_bwd_partials(buf, x, scale, shift, mean, invstd, add=add, in_place=True)
    assert dz.data_ptr() == buf.data_ptr()
    assert torch.equal(dz, ref_dz)
    assert torch.equal(ps, ref_ps) and torch.equal(psx, ref_psx)
    masked = torch.where(x.float() * scale[:, None, None] + shift[:, None, None] > 0, summed.float(), 0.0)
    torch.testing.assert_close(dz.float(), masked, rtol=0, atol=0)


def test_dispatch_table_lookup(monkeypatch):
    table = [
        {"role": "fprop", "ksize": 3, "stride": 1, "cin": 64, "cout": 64, "pixels": 802816, "backend": "cudnn"},
        {"role": "fprop", "ksize": 3, "stride": 1, "cin": 16, "cout": 16, "pixels": 131072, "backend": "triton"},
        {"role": "fprop", "ksize": 3, "stride": 2, "cin": 64, "cout": 128, "pixels": 200704, "backend": "cudnn"},
    ]
    monkeypatch.setattr(route, "_table", lambda arch: table if arch == "sm_90" else [])
    monkeypatch.setattr(route, "_arch", lambda device: "sm_90")
    monkeypatch.delenv("FUSEDRES_CONV_BACKEND", raising=False)
    with monkeypatch.context() as m:
        m.setattr(route, "_OVERRIDES", [])
        dev = torch.device("cpu")
        assert route.choose("fprop", dev, 64, 64, 3, 1, 800000) == "cudnn"
        assert route.choose("fprop", dev, 16, 32, 3, 1, 100000) == "triton"  # nearest: the 16-channel row
        assert route.choose("fprop", dev, 32, 64, 3, 2, 100000) == "cudnn"  # same stride preferred
        assert route.choose("dgrad", dev, 64, 64, 3, 1, 800000) == "triton"  # no row for the role
        assert route.choose("fprop", dev, 64, 64, 5, 1, 800000) == "triton"  # no row for the kernel size
        m.setenv("FUSEDRES_CONV_BACKEND", "cudnn")
        assert route.choose("fprop", dev, 16, 16, 3, 1, 131072) == "cudnn"
        m.setattr(route, "_arch", lambda device: "sm_75")
        m.delenv("FUSEDRES_CONV_BACKEND")
        assert route.choose("fprop", dev, 64, 64, 3, 1, 800000) == "triton"  # no table: nothing guessed


def test_committed_sm90_table_is_consistent():
    """The committed table's decisions follow from its own measured times."""
    rows = route._table("sm_90")
    assert rows, "fusedres/ops/dispatch/sm_90.json is missing"
    for r in rows:
        t, c = (r["triton_ms"], r["cudnn_ms"]) if "triton_ms" in r else (r["block_triton_graph_ms"],
                                                                         r["block_cudnn_graph_ms"])
        assert r["backend"] == ("triton" if t <= c else "cudnn"), r
    assert {r["role"] for r in rows} == set(route.ROLES)
    dev = torch.device("cuda")
    with pytest.MonkeyPatch.context() as m:  # what the H100/H200 route today, from the table alone
        m.setattr(route, "_arch", lambda device: "sm_90")
        m.setattr(route, "_OVERRIDES", [])
        m.delenv("FUSEDRES_CONV_BACKEND", raising=False)
        assert route.choose("fprop", dev, 16, 16, 3, 1, 131072) == "triton"  # CIFAR-164 stage 1: Triton
        assert route.choose("wgrad", dev, 64, 64, 3, 1, 802816) == "cudnn"  # ImageNet 56^2: cuDNN


def test_force_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        with route.force("cublas"):
            pass


def test_routes_agree_on_a_block_forward(device, no_tf32):
    """The same block forward on either route (a deep copy, so no state is shared)."""
    block = fusedres.PreActBasicBlock(8, 8).to(device)
    x = torch.randn(2, 8, 5, 5, device=device)
    with route.force("cudnn"), launched("bn_relu_apply_kernel"):
        a = block(x)
    with route.force("triton"), launched("conv_fprop_kernel"):
        b = copy.deepcopy(block)(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# The default dispatch of an H100/H200: the committed sm_90 table applied with route.table. The
# test suite's autouse fixture (conftest.py) holds route.force("triton") around every test;
# route.table entered inside the test is the innermost override, and the innermost one decides.
# PreActBasicBlock(8, 16, 2) on a 9x7 image mixes the routes: the stride-2 3x3 conv1 is nearest
# to the table's only stride-2 3x3 row (cuDNN), the 3x3 conv2 to the CIFAR bottleneck's 3x3 rows
# (Triton), and the 1x1 projection to its 1x1 rows (Triton).
SM90_BLOCK = (8, 16, 2)
SM90_INPUT = (2, 8, 9, 7)


def _sm90_roles() -> dict[str, dict[str, str]]:
    cin, ch, stride = SM90_BLOCK
    n, _, h, w = SM90_INPUT
    oh, ow = conv_ops.conv_out_size(h, 3, stride, 1), conv_ops.conv_out_size(w, 3, stride, 1)
    dev = torch.device("cpu")
    convs = {"conv1": (cin, ch, 3, stride), "conv2": (ch, ch, 3, 1), "shortcut.0": (cin, ch, 1, stride)}
    in_pixels = {"conv1": n * h * w, "conv2": n * oh * ow, "shortcut.0": n * h * w}
    with route.table("sm_90"):
        return {name: {role: route.choose(role, dev, ci, co, k, s, in_pixels[name] if role == "dgrad" else n * oh * ow)
                       for role in route.ROLES} for name, (ci, co, k, s) in convs.items()}


def test_sm90_table_mixes_the_routes_of_one_block():
    assert _sm90_roles() == {
        "conv1": {"fprop": "cudnn", "dgrad": "cudnn", "wgrad": "cudnn"},
        "conv2": {"fprop": "triton", "dgrad": "triton", "wgrad": "triton"},
        "shortcut.0": {"fprop": "triton", "dgrad": "triton", "wgrad": "triton"},
    }


def test_sm90_default_dispatch_matches_eager(poison, device, no_tf32):
    """The block under the sm_90 table against its eager twin in float64 (two training steps,
    then eval), with both a Triton convolution and the cuDNN route's passes running."""
    block = _randomize_bn(fusedres.PreActBasicBlock(*SM90_BLOCK))
    with route.table("sm_90"), launched(*CONV_KERNELS, *ROUTE_KERNELS):
        r = check_module(block, SM90_INPUT, dtype=torch.float32, device=device, steps=2)
    bad = r.failures(torch.float32)
    assert not bad, "; ".join(bad)


def test_sm90_training_step_launches(device):
    """One training step under the sm_90 table, counted: conv1 on the cuDNN route (its BN-ReLU
    apply pass for fprop and wgrad, the ReLU-mask + BatchNorm-backward pass after its dgrad), conv2
    and the projection on the Triton kernels (two fprops instead of three, and each one's input and
    weight gradients in one merged launch)."""
    block = fusedres.PreActBasicBlock(*SM90_BLOCK).to(device)
    x = torch.randn(SM90_INPUT, device=device, requires_grad=True)
    kernels = (*CONV_KERNEL_NAMES, *ROUTE_KERNELS)
    before = {k: launch_counts[k] for k in kernels}
    with route.table("sm_90"):
        block(x).square().sum().backward()
    assert {k: launch_counts[k] - before[k] for k in kernels} == {
        "conv_fprop_kernel": 2, "conv_dgrad_kernel": 0, "conv_wgrad_kernel": 0, "conv_bwd_kernel": 2,
        "bn_relu_apply_kernel": 2, "relu_bn_bwd_partials_kernel": 1,
    }


def test_table_overrides_nest_and_leave_the_default_alone(monkeypatch):
    dev = torch.device("cpu")
    sm90_cudnn = ("wgrad", dev, 64, 64, 3, 1, 802816)  # ImageNet 56^2: cuDNN in the sm_90 table
    monkeypatch.delenv("FUSEDRES_CONV_BACKEND", raising=False)
    monkeypatch.setattr(route, "_OVERRIDES", [])
    assert route.choose(*sm90_cudnn) == "triton"  # no table for a CPU device by default
    with route.table("sm_90"):
        assert route.choose(*sm90_cudnn) == "cudnn"
        with route.force("triton"):
            assert route.choose(*sm90_cudnn) == "triton"  # the innermost override decides
        monkeypatch.setenv("FUSEDRES_CONV_BACKEND", "triton")
        assert route.choose(*sm90_cudnn) == "cudnn"  # an applied table wins over the variable
    assert route.choose(*sm90_cudnn) == "triton" and route._OVERRIDES == []
    with pytest.raises(ValueError, match=r"no dispatch table for 'sm_75'.*have: sm_90"):
        route.table("sm_75")
