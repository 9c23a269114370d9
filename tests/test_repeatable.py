"""Bitwise repeatability: the same training steps from the same state give the same bits.

The promise (README, "Repeatability"): on the Triton route every reduction (BatchNorm statistics,
BatchNorm-backward sums, the weight gradient's split-K) is merged in a fixed order, so two runs of
the same steps (same parameters, buffers, inputs and upstream gradients) give bitwise-identical
outputs, gradients, running statistics and updated parameters. On the cuDNN route the same holds
when cuDNN is asked for deterministic algorithms (``torch.backends.cudnn.deterministic = True``);
its default weight-gradient algorithms may accumulate with atomics.

Each case runs two SGD steps from a saved state, restores the state, runs them again, and compares
every tensor with ``torch.equal``. On the CPU this runs the real kernels under the interpreter (which
executes programs one after another, so it proves the fixed-order merges and the hand-off of
statistics between blocks, not GPU scheduling); ``test_repeatable_on_cuda`` runs the same cases
on a GPU, where atomics and program order are real.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from _helpers import CONV_KERNELS, launched
from torch import nn

import fusedres
import fusedres.testing
from fusedres.models import preact_resnet
from fusedres.ops import route

CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "PreActBottleneck": (lambda: fusedres.PreActBottleneck(16, 4), (2, 16, 6, 6)),
    "PreActBasicBlock projection s2": (lambda: fusedres.PreActBasicBlock(8, 12, 2), (2, 8, 7, 7)),
    "preact_resnet(11)": (lambda: preact_resnet(11, block="bottleneck"), (2, 3, 8, 8)),
}
CUDNN_ROUTE_KERNELS = ("bn_relu_apply_kernel", "relu_bn_bwd_partials_kernel")


def _two_steps(model: nn.Module, xs: list[torch.Tensor], dys: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Two SGD steps; yields every output, gradient, parameter and buffer on the way, by name."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i, (x, dy) in enumerate(zip(xs, dys)):
        opt.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        y = model(x)
        y.backward(dy)
        yield f"step {i} output", y.detach()
        yield f"step {i} input grad", x.grad
        for name, p in model.named_parameters():
            yield f"step {i} grad {name}", p.grad.clone()
        opt.step()
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            yield f"step {i} after update {name}", t.detach().clone()


def _check_repeatable(name: str, device: torch.device, dtype: torch.dtype = torch.float32,
                      shape: tuple[int, ...] | None = None, kernels: tuple = CONV_KERNELS) -> None:
    build, small = CASES[name]
    shape = shape or small
    cl = torch.channels_last
    torch.manual_seed(0)
    model = build().to(device=device, dtype=dtype).to(memory_format=cl).train()
    state = copy.deepcopy(model.state_dict())
    xs = [torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=cl) for _ in range(2)]
    with torch.no_grad():  # the eager twin: the fused kernels' first launches are the steps'
        out_shape = fusedres.testing.set_fused(copy.deepcopy(model), False)(xs[0]).shape
    dys = [torch.randn(out_shape, device=device, dtype=dtype) for _ in range(2)]
    if len(out_shape) == 4:
        dys = [d.contiguous(memory_format=cl) for d in dys]

    with launched(*kernels):
        first = list(_two_steps(model, xs, dys))
    model.load_state_dict(state)
    second = list(_two_steps(model, xs, dys))

    assert [k for k, _ in first] == [k for k, _ in second]
    differ = [k for (k, a), (_, b) in zip(first, second) if not torch.equal(a, b)]
    assert not differ, f"{name}: not bitwise repeatable: {differ[:6]}{' ...' if len(differ) > 6 else ''}"


@contextlib.contextmanager
def _cudnn_route() -> Iterator[None]:
    """Every convolution on cuDNN, with cuDNN's deterministic algorithms."""
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        with route.force("cudnn"):
            yield
    finally:
        torch.backends.cudnn.deterministic = deterministic


@pytest.mark.parametrize("name", list(CASES))
def test_repeatable_triton_route(name: str, device: torch.device) -> None:
    _check_repeatable(name, device)


@pytest.mark.parametrize("name", ["PreActBottleneck", "PreActBasicBlock projection s2"])
def test_repeatable_cudnn_route(name: str, device: torch.device) -> None:
    """The cuDNN route's own passes merge in a fixed order too."""
    with _cudnn_route():
        _check_repeatable(name, device, kernels=CUDNN_ROUTE_KERNELS)


#: Sizes with many programs per kernel on a GPU, so that program order and the two-level
#: reductions (more than 256 tiles) really come into play.
CUDA_SHAPES = {"PreActBottleneck": (64, 16, 32, 32), "PreActBasicBlock projection s2": (64, 8, 33, 33),
               "preact_resnet(11)": (64, 3, 32, 32)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(CASES))
def test_repeatable_on_cuda(name: str, dtype: torch.dtype) -> None:
    """On a GPU, where atomics and program order are real: the Triton route as it is, and the
    cuDNN route with cuDNN's deterministic algorithms."""
    cuda = torch.device("cuda")
    _check_repeatable(name, cuda, dtype, CUDA_SHAPES[name])
    with _cudnn_route():
        _check_repeatable(name, cuda, dtype, CUDA_SHAPES[name], kernels=CUDNN_ROUTE_KERNELS)
