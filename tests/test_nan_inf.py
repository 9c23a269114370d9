"""NaN and +-Inf go where eager PyTorch sends them: forward, backward, training and eval.

What the kernels must reproduce: ``relu`` keeps NaN (a plain ``tl.maximum`` is PTX ``max.f32``
on a GPU and ``np.fmax`` in the interpreter: both return 0 for NaN); ReLU's backward
``threshold_backward(grad, relu(pre), 0)`` lets the gradient through where the pre-activation
is NaN (a ``pre > 0`` mask would block it); an infinite input gives the mean eager gives.
Each case poisons one element (of x, of a BatchNorm parameter, or of the upstream gradient) and
compares the fused run with its eager twin in fp32: NaN, +Inf and -Inf at the same positions of
every output, gradient and buffer, the finite values within the project's 2x rule against
float64. Eval mode keeps a poisoned input element local: the strongest check of the masks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import DGRAD, WGRAD, launched, randomize_bn
from torch import nn

import fusedres
from fusedres import PreActBasicBlock, PreActBottleneck
from fusedres.functional import StageSpec, bn_relu_avgpool, bn_relu_conv2d
from fusedres.ops import bn as bn_ops
from fusedres.ops import route
from fusedres.reference import bn_relu_conv2d_reference
from fusedres.testing import rel_error, set_fused, within_bound

NAN, INF = float("nan"), float("inf")
CHAIN_KERNELS = ("conv_fprop_kernel", DGRAD, WGRAD, "bn_bwd_apply_kernel")
POSTACT_KERNELS = ("conv_fprop_kernel", "bn_add_relu_kernel", "bn_add_relu_bwd_kernel", "conv_dgrad_kernel",
                   "conv_wgrad_kernel")
ROUTE_KERNELS = ("bn_relu_apply_kernel", "relu_bn_bwd_partials_kernel")

X_AT = (1, 1, 2, 3)  # the poisoned input element: inside the image, so its whole neighbourhood is seen
GRAD_AT = (0, 2, 1, 1)  # the poisoned upstream-gradient element


def _torchvision(kind: str) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if kind == "basic":
        return fusedres.convert(nn.Sequential(BasicBlock(4, 4)))
    ds = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    return fusedres.convert(nn.Sequential(Bottleneck(4, 2, 2, downsample=ds)))


# name -> (module factory, input channels, the kernels its fused run must launch)
BLOCKS = {
    "preact-basic-identity": (lambda: PreActBasicBlock(4, 4), 4, CHAIN_KERNELS),
    "preact-basic-proj-s2": (lambda: PreActBasicBlock(4, 6, 2), 4, CHAIN_KERNELS),
    "preact-bottleneck-proj": (lambda: PreActBottleneck(4, 2), 4, CHAIN_KERNELS),
    "tv-basic": (lambda: _torchvision("basic"), 4, POSTACT_KERNELS),
    "tv-bottleneck-downsample-s2": (lambda: _torchvision("bottleneck"), 4, POSTACT_KERNELS),
}

# (what is poisoned, value, training): x in eval stays local (NaN spreads over its receptive
# field, +Inf turns into +-Inf, -Inf is clipped by the ReLU); in training it poisons its channel's
# statistics; a BatchNorm parameter poisons its channel; a gradient element its cone of inputs.
CASES = {
    "x-nan-eval": ("x", NAN, False),
    "x-posinf-eval": ("x", INF, False),
    "x-neginf-eval": ("x", -INF, False),
    "x-nan-train": ("x", NAN, True),
    "x-posinf-train": ("x", INF, True),
    "bn2-weight-nan-train": ("bn2.weight", NAN, True),
    "bn2-bias-posinf-eval": ("bn2.bias", INF, False),
    "grad-nan-train": ("grad", NAN, True),
    "grad-neginf-eval": ("grad", -INF, False),
}
# Every case for the op and the simplest block; for the others (the interpreter is slow) a poisoned
# x in eval and in training, a poisoned BatchNorm parameter and a poisoned gradient.
BLOCK_CASES = [("preact-basic-identity", case) for case in CASES] + [
    (name, case)
    for name, cases in {
        "preact-basic-proj-s2": ["x-nan-eval", "x-posinf-train", "bn2-bias-posinf-eval", "grad-neginf-eval"],
        "preact-bottleneck-proj": ["x-posinf-eval", "x-nan-train", "bn2-weight-nan-train", "grad-nan-train"],
        "tv-basic": ["x-nan-eval", "x-neginf-eval", "x-nan-train", "bn2-bias-posinf-eval", "grad-nan-train"],
        "tv-bottleneck-downsample-s2": ["x-nan-eval", "x-posinf-eval", "x-posinf-train", "bn2-weight-nan-train",
                                        "grad-neginf-eval"],
    }.items()
    for case in cases
]


def assert_same_nonfinite(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """NaN, +Inf and -Inf at the same positions as eager; the finite values by the 2x rule."""
    fused, eager, ref64 = (t.detach().cpu() for t in (fused, eager, ref64))
    assert fused.shape == eager.shape, f"{what}: shape {tuple(fused.shape)} vs eager {tuple(eager.shape)}"
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = test(fused), test(eager)
        assert torch.equal(got, want), (
            f"{what}: {name} at {got.sum().item()} positions, eager at {want.sum().item()}; first differing "
            f"index {tuple(torch.nonzero(got != want)[0].tolist())}"
        )
    finite = torch.isfinite(eager)
    err, base = rel_error(fused[finite], ref64[finite]), rel_error(eager[finite], ref64[finite])
    assert within_bound(err, base, torch.float32), f"{what}: finite values off by {err:.2e} (eager {base:.2e})"


def _compare(fused: dict, eager: dict, ref64: dict) -> None:
    assert fused.keys() == eager.keys()
    for k in eager:
        assert_same_nonfinite(fused[k], eager[k], ref64[k], k)


def _poisoned_inputs(shape: tuple[int, ...], case: tuple[str, float, bool]) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if case[0] == "x":
        x[X_AT] = case[1]
    return x


def _run_module(base: nn.Module, fused: bool, x64: torch.Tensor, case, dtype, device) -> dict:
    """Forward and backward of a copy of ``base``: output, input and parameter gradients, buffers."""
    m = set_fused(copy.deepcopy(base), fused).to(device, dtype).to(memory_format=torch.channels_last)
    m.train(case[2])
    x = x64.to(device, dtype, copy=True).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = m(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if case[0] == "grad":
        dy[GRAD_AT] = case[1]
    y.backward(dy.to(device, dtype).contiguous(memory_format=torch.channels_last))
    out = {"out": y, "grad x": x.grad}
    out.update((f"grad {n}", p.grad) for n, p in m.named_parameters())
    out.update((f"buffer {n}", b) for n, b in m.named_buffers())
    return out


def _check_module(name: str, case, device, backend: str = "triton") -> None:
    """One poisoned forward and backward of block ``name``, fused against eager."""
    make, cin, kernels = BLOCKS[name]
    what, value, training = case
    base = randomize_bn(make())
    if what.startswith("bn2."):
        bn2 = next(m for n, m in base.named_modules() if n.endswith("bn2"))
        getattr(bn2, what.split(".")[1]).data[1] = value
    x64 = _poisoned_inputs((2, cin, 5, 6), case)
    eager = _run_module(base, False, x64, case, torch.float32, device)
    ref64 = _run_module(base, False, x64, case, torch.float64, torch.device("cpu"))
    if backend == "cudnn":
        kernels = ROUTE_KERNELS
    if training and kernels is not POSTACT_KERNELS:  # a pre-activation block's first statistics pass
        kernels = (*kernels, "bn_stats_kernel")
    with route.force(backend), launched(*kernels):
        fused = _run_module(base, True, x64, case, torch.float32, device)
    _compare(fused, eager, ref64)


@pytest.mark.parametrize("name,case", BLOCK_CASES, ids=[f"{n}-{c}" for n, c in BLOCK_CASES])
def test_blocks(poison, device, no_tf32, name, case):
    _check_module(name, CASES[case], device)


@pytest.mark.parametrize("case", ["x-nan-eval", "x-posinf-eval", "x-nan-train", "grad-nan-train"])
def test_cudnn_route(poison, device, no_tf32, case):
    """The cuDNN route's elementwise passes around PyTorch's convolution (on the CPU, its own)."""
    _check_module("preact-basic-proj-s2", CASES[case], device, "cudnn")


@pytest.mark.parametrize("case", list(CASES))
def test_bn_relu_conv2d(poison, device, no_tf32, case):
    what, value, training = CASES[case]
    gen = torch.Generator().manual_seed(3)
    x64 = _poisoned_inputs((2, 4, 5, 6), CASES[case])
    w64 = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64) * 0.3
    g64, b64 = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5, torch.randn(4, generator=gen) * 0.3
    rm64, rv64 = torch.randn(4, generator=gen) * 0.2, torch.rand(4, generator=gen) + 0.5
    res64 = torch.randn(2, 5, 5, 6, generator=gen, dtype=torch.float64)
    dy64 = torch.randn(2, 5, 5, 6, generator=gen, dtype=torch.float64)
    if what == "bn2.weight":
        g64[1] = value
    elif what == "bn2.bias":
        b64[1] = value
    elif what == "grad":
        dy64[GRAD_AT] = value

    def run(fn, dtype, dev) -> dict:
        def leaf(t, grad=True):
            t = t.to(dev, dtype, copy=True)
            return (t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t).requires_grad_(grad)

        x, w, g, b, res = leaf(x64), leaf(w64), leaf(g64), leaf(b64), leaf(res64)
        rm, rv = leaf(rm64, False), leaf(rv64, False)
        y = fn(x, w, g, b, rm, rv, training=training, padding=1, residual=res)
        y.backward(dy64.to(dev, dtype).contiguous(memory_format=torch.channels_last))
        return {"out": y, "grad x": x.grad, "grad weight": w.grad, "grad bn_weight": g.grad,
                "grad bn_bias": b.grad, "grad residual": res.grad, "running_mean": rm, "running_var": rv}

    eager = run(bn_relu_conv2d_reference, torch.float32, device)
    ref64 = run(bn_relu_conv2d_reference, torch.float64, torch.device("cpu"))
    with launched(*CHAIN_KERNELS):
        fused = run(bn_relu_conv2d, torch.float32, device)
    _compare(fused, eager, ref64)


@pytest.mark.parametrize("case", ["x-nan-eval", "x-posinf-eval", "x-neginf-eval"])
@pytest.mark.parametrize("name", ["tv-basic", "tv-bottleneck-downsample-s2"])
def test_torchvision_eval_no_grad(poison, device, no_tf32, name, case):
    """Eval under no_grad folds BatchNorm into the convolutions: the ReLUs are the convolution
    epilogue's OUT_RELU."""
    make, cin, _ = BLOCKS[name]
    base = randomize_bn(make()).eval()
    x64 = _poisoned_inputs((2, cin, 5, 6), CASES[case])

    def run(fused: bool, dtype, dev) -> torch.Tensor:
        m = set_fused(copy.deepcopy(base), fused).to(dev, dtype).to(memory_format=torch.channels_last)
        with torch.no_grad():
            return m(x64.to(dev, dtype).contiguous(memory_format=torch.channels_last))

    with launched("conv_fprop_kernel"):
        fused = run(True, torch.float32, device)
    assert_same_nonfinite(fused, run(False, torch.float32, device), run(False, torch.float64, "cpu"), "out")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_bn_relu_avgpool(poison, device, training):
    """The pre-activation network's head: relu(bn(x)).mean((2, 3)), a NaN and an Inf input element."""
    gen = torch.Generator().manual_seed(4)
    x64 = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    x64[X_AT] = NAN
    x64[0, 2, 1, 1] = INF
    g64, b64 = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5, torch.randn(4, generator=gen) * 0.3
    rm64, rv64 = torch.randn(4, generator=gen) * 0.2, torch.rand(4, generator=gen) + 0.5
    dy64 = torch.randn(2, 4, generator=gen, dtype=torch.float64)

    def run(fused: bool, dtype, dev) -> dict:
        x = x64.to(dev, dtype, copy=True).contiguous(memory_format=torch.channels_last).requires_grad_()
        g, b = g64.to(dev, dtype, copy=True).requires_grad_(), b64.to(dev, dtype, copy=True).requires_grad_()
        rm, rv = rm64.to(dev, dtype, copy=True), rv64.to(dev, dtype, copy=True)
        if fused:
            y = bn_relu_avgpool(StageSpec(1, 0, 1e-5, 0.1, training), x, g, b, rm, rv)
        else:
            y = F.relu(F.batch_norm(x, rm, rv, g, b, training, 0.1, 1e-5)).mean((2, 3))
        y.backward(dy64.to(dev, dtype))
        return {"out": y, "grad x": x.grad, "grad weight": g.grad, "grad bias": b.grad, "running_mean": rm,
                "running_var": rv}

    with launched("bn_relu_pool_kernel", "bn_relu_pool_bwd_kernel", "bn_bwd_apply_kernel"):
        fused = run(True, torch.float32, device)
    _compare(fused, run(False, torch.float32, device), run(False, torch.float64, "cpu"))


def test_infinite_input_mean_over_many_tiles(poison, device):
    """An infinite element makes its channel's batch mean +-Inf, as in eager, also when the
    finalize kernel merges more than one chunk of tile partials (72 tiles of 128 pixels here):
    Chan's update mean + delta * w would turn Inf + (-Inf) * w into NaN."""
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    x[0, 0, 0, 5] = INF  # first tile: in the first chunk, merged with a finite second chunk
    x[0, 1, 95, 90] = -INF  # last tile: the second chunk
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    F.batch_norm(x, rm_ref, rv_ref, None, None, True, 0.1, 1e-5)
    with launched("bn_stats_kernel", "bn_finalize_kernel"):
        partials = bn_ops.bn_stats(x)
        assert partials[0].shape[0] > 64  # more tiles than one chunk of the finalize loop
        mean, _, _, _ = bn_ops.bn_finalize(partials, x.numel() // 3, None, None, rm, rv, training=True,
                                           momentum=0.1, eps=1e-5, channels=3, device=x.device)
    assert mean[0].item() == INF and mean[1].item() == -INF and torch.isfinite(mean[2])
    for got, want, what in ((rm, rm_ref, "running_mean"), (rv, rv_ref, "running_var")):
        assert_same_nonfinite(got, want, want.double(), what)
