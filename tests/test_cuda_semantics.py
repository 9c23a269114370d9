"""Semantics that only a GPU shows in full: NaN and Inf propagation through the fused blocks on
CUDA (the default convolution dispatch, Triton and cuDNN mixed as the measured table says, and
forced Triton), and fp16 autocast with a GradScaler skipping exactly the steps eager PyTorch
skips. Skipped without CUDA, except the GradScaler test's CPU variant, which runs the same
training logic with cpu fp16 autocast and ``GradScaler("cpu")`` on the Triton interpreter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from _helpers import randomize_bn
from torch import nn
from torchvision.models.resnet import BasicBlock as TVBasic
from torchvision.models.resnet import Bottleneck as TVBottleneck

import fusedres
from fusedres import _runtime
from fusedres.models import PreActResNet, preact_resnet
from fusedres.ops import route
from fusedres.testing import set_fused

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _ds(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _preact(build: Callable[[], nn.Module]) -> Callable[[], tuple[nn.Module, nn.Module]]:
    def make() -> tuple[nn.Module, nn.Module]:
        fused = randomize_bn(build())
        return fused, set_fused(copy.deepcopy(fused), False)

    return make


def _torchvision(build: Callable[[], nn.Module]) -> Callable[[], tuple[nn.Module, nn.Module]]:
    def make() -> tuple[nn.Module, nn.Module]:
        twin = randomize_bn(nn.Sequential(build()))
        return fusedres.convert(twin), twin

    return make


# 64-channel 3x3 convolutions go to cuDNN on the measured H200 table, the 16-channel
# bottleneck's to Triton: the default dispatch mixes both.
NAN_BLOCKS = {
    "preact-basic-64": (_preact(lambda: fusedres.PreActBasicBlock(64, 64)), 64),
    "preact-bottleneck-64/16": (_preact(lambda: fusedres.PreActBottleneck(64, 16)), 64),
    "preact-basic-proj-s2": (_preact(lambda: fusedres.PreActBasicBlock(32, 64, 2)), 32),
    "tv-basic-64": (_torchvision(lambda: TVBasic(64, 64)), 64),
    "tv-bottleneck-ds-s2": (_torchvision(lambda: TVBottleneck(32, 16, 2, _ds(32, 64, 2))), 32),
}


@pytest.fixture
def _dispatch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """"default": the measured table (the autouse fixture's forced Triton route lifted);
    "triton": every convolution on Triton."""
    monkeypatch.delenv("FUSEDRES_CONV_BACKEND", raising=False)
    if request.param == "default":
        monkeypatch.setattr(route, "_FORCED", [])
        yield request.param
    else:
        with route.force("triton"):
            yield request.param


def _masks(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf, per element."""
    t = t.detach().to("cpu", torch.float64)
    return torch.isnan(t).long() + 2 * torch.isposinf(t).long() + 3 * torch.isneginf(t).long()


def _nan_run(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """Forward and backward; in eval also a forward under no_grad (the torchvision blocks' folded
    path). Outputs, gradients and buffers after it."""
    model.train(mode == "train")
    xg = x.clone().requires_grad_()
    y = model(xg)
    y.backward(dy.to(y.dtype))
    outs = {"out": y, "grad input": xg.grad}
    outs.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    outs.update({f"buffer {n}": b for n, b in model.named_buffers()})
    if mode == "eval":
        with torch.no_grad():
            outs["out no_grad"] = model(x)
    return outs


@needs_cuda
@pytest.mark.parametrize("_dispatch", ["default", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("block", list(NAN_BLOCKS))
def test_nan_inf_positions_on_cuda(no_tf32, _dispatch, dtype, mode, value, block):
    """One NaN or ±Inf element in x: the NaN/+Inf/-Inf positions of the output, the input and
    parameter gradients and the running statistics are eager PyTorch's.

    The oracle is the eager twin in float64 on the CPU (direct convolutions: exact IEEE
    propagation) or the eager twin in the same dtype on CUDA — either is what eager PyTorch
    does; they can differ where cuDNN picks a transform-based algorithm (Winograd, FFT), which
    may turn one Inf into NaNs around it.
    """
    make, cin = NAN_BLOCKS[block]
    device = torch.device("cuda")
    torch.manual_seed(0)
    fused, twin = make()
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(2, cin, 8, 8, generator=g, dtype=torch.float64).to(dtype).double()
    x64[1, 5, 3, 4] = value
    probe = copy.deepcopy(twin).double().eval()
    with torch.no_grad():
        dy64 = torch.randn(probe(x64.nan_to_num(0.0)).shape, generator=g, dtype=torch.float64)

    def on(dev: torch.device, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cl = torch.channels_last
        return x64.to(dev, dt).contiguous(memory_format=cl), dy64.to(dev, dt).contiguous(memory_format=cl)

    before = sum(_runtime.launch_counts.values())
    got = _nan_run(fused.to(device, dtype).to(memory_format=torch.channels_last), *on(device, dtype), mode)
    assert sum(_runtime.launch_counts.values()) > before, "no Triton kernel ran"
    oracles = {
        "float64 cpu": _nan_run(copy.deepcopy(twin).double(), x64, dy64, mode),
        f"{dtype} cuda": _nan_run(copy.deepcopy(twin).to(device, dtype).to(memory_format=torch.channels_last),
                                  *on(device, dtype), mode),
    }
    bad = []
    for k, v in got.items():
        m = _masks(v)
        if not any(torch.equal(m, _masks(o[k])) for o in oracles.values()):
            counts = {name: [int((_masks(o[k]) == i).sum()) for i in (1, 2, 3)] for name, o in oracles.items()}
            bad.append(f"{k}: fused NaN/+Inf/-Inf counts {[int((m == i).sum()) for i in (1, 2, 3)]}, eager {counts}")
    assert not bad, "; ".join(bad)


def _amp_models(device: torch.device) -> dict[str, tuple[nn.Module, nn.Module]]:
    """(fused model, eager twin) pairs: a pre-activation network, and a converted torchvision
    stack (stem, BasicBlock, Bottleneck with a downsample, head)."""
    torch.manual_seed(0)
    if device.type == "cuda":
        net = preact_resnet(11, block="bottleneck")
    else:  # the interpreter is slow: two blocks (identity, projection with stride 2) and the head
        net = PreActResNet(fusedres.PreActBasicBlock, [1, 1], [8, 16], num_classes=10, stem="cifar", stem_channels=8)
    stack = nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        TVBasic(16, 16), TVBottleneck(16, 8, 2, _ds(16, 32, 2)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    return {
        "preact_resnet": (net.to(device), set_fused(copy.deepcopy(net), False).to(device)),
        "torchvision stack": (fusedres.convert(stack).to(device), stack.to(device)),
    }


#: Steps that must be skipped: step 0 by the initial scale (2**24 makes every fp16 logit
#: gradient overflow; the backoff of 2**-12 then leaves a scale with a wide margin), step 2 by
#: an input element of 1e5, which is Inf in fp16 and turns the forward into Infs and NaNs.
OVERFLOW_INPUT_STEPS = (2,)
EXPECTED_TAKEN = [False, True, False, True]


def _train_amp(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
               ) -> tuple[list[float], list[bool]]:
    """Train with fp16 autocast and a GradScaler; (scale after each step, whether the step
    changed any parameter)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**24, backoff_factor=2.0**-12, growth_interval=1000)
    scales, taken = [], []
    for x, y in batches:
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        taken.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
    return scales, taken


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=needs_cuda),
    pytest.param("cpu", marks=pytest.mark.skipif(not _runtime.INTERPRET, reason="the CPU runs the kernels only "
                                                 "under the Triton interpreter")),
])
@pytest.mark.parametrize("name", ["preact_resnet", "torchvision stack"])
def test_amp_grad_scaler_skips_the_same_steps(device, name):
    """fp16 autocast + GradScaler, fused and eager trained side by side on the same batches: the
    same steps overflow and are skipped (same scale sequence, parameters unchanged on exactly
    those steps). The overflow must reach the loss through the fused blocks: a block that
    swallowed the NaNs of an overflowed input (a NaN-dropping max in the ReLU) would let a step
    through that eager skips.

    On the CPU this runs cpu fp16 autocast (torch >= 2.4) and ``GradScaler("cpu")`` with the
    kernels under the Triton interpreter, which computes with numpy (NaN-propagating maximum):
    it checks the training logic and the autocast dtypes, not the GPU's NaN handling of max.
    """
    device = torch.device(device)
    fused, eager = _amp_models(device)[name]
    size, batch = (16, 8) if device.type == "cuda" else (4, 4)  # the interpreter is slow
    g = torch.Generator().manual_seed(2)
    batches = []
    for step in range(len(EXPECTED_TAKEN)):
        x = torch.randn(batch, 3, size, size, generator=g)
        if step in OVERFLOW_INPUT_STEPS:
            x[0, 0, size // 2, size // 2] = 1e5  # above fp16's largest value, 65504
        batches.append((x.to(device), torch.randint(0, 10, (batch,), generator=g).to(device)))
    before = sum(_runtime.launch_counts.values())
    fused_scales, fused_taken = _train_amp(fused, batches, device)
    assert sum(_runtime.launch_counts.values()) > before, "no Triton kernel ran"
    eager_scales, eager_taken = _train_amp(eager, batches, device)
    assert eager_taken == EXPECTED_TAKEN, f"the test's overflows did not happen as designed: eager took {eager_taken}"
    assert fused_taken == eager_taken, f"steps taken: fused {fused_taken}, eager {eager_taken}"
    assert fused_scales == eager_scales, f"loss scales: fused {fused_scales}, eager {eager_scales}"
