"""Block-output statistics handed to the next fused BatchNorm (fusedres._fused._input_stats).

A training-mode fused pre-activation block computes the tile statistics of its output in its last
convolution's epilogue (on the cuDNN route: in the pass that also adds the residual), and the
BatchNorm that opens the next fused block — or the head — uses them instead of reading the tensor
again. These tests check that the statistics pass really disappears, that the results still match
eager PyTorch, and that a modified or different tensor never gets stale statistics.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import CHAIN_KERNELS, CONV_KERNELS, ROUTE_KERNELS, launched
from torch import nn

import fusedres
from fusedres import PreActBasicBlock, PreActBottleneck
from fusedres.models import PreActResNet
from fusedres.ops import route
from fusedres.testing import check_module, set_fused


def _stats_launches(fn) -> int:
    before = fusedres.launch_counts["bn_stats_kernel"]
    fn()
    return fusedres.launch_counts["bn_stats_kernel"] - before


def _pair(device, kind: str = "basic") -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if kind == "basic":
        a, b = PreActBasicBlock(8, 8), PreActBasicBlock(8, 16, stride=2)
    else:
        a, b = PreActBottleneck(8, 2), PreActBottleneck(8, 4, stride=2)
    return (a.to(device).to(memory_format=torch.channels_last), b.to(device).to(memory_format=torch.channels_last))


def _input(device) -> torch.Tensor:
    return torch.randn(2, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["triton", "cudnn"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_second_block_reads_no_statistics(device, backend, kind):
    a, b = _pair(device, kind)
    x = _input(device)
    with route.force(backend):
        # the cuDNN route runs one statistics pass per convolution output (with the residual add
        # in the last one); the Triton route none: only the first block's input is read for them
        per_block = 0 if backend == "triton" else (2 if kind == "basic" else 3)
        assert _stats_launches(lambda: a(x)) == 1 + per_block
        assert _stats_launches(lambda: b(a(x))) == 1 + 2 * per_block


def test_modified_output_gets_fresh_statistics(device):
    a, b = _pair(device)
    x = _input(device)
    with torch.no_grad():
        y = a(x)  # the very tensor whose statistics were handed off
    y.mul_(3.0).add_(1.0)  # in place: the handed-off statistics describe the old values
    assert _stats_launches(lambda: b(y)) == 1
    with launched("conv_fprop_kernel"):
        out = b(y)
    torch.testing.assert_close(out, _eager(b, y), rtol=1e-4, atol=1e-4)


def test_other_tensor_gets_fresh_statistics(device):
    a, b = _pair(device)
    x = _input(device)
    a(x)
    other = torch.randn(2, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    assert _stats_launches(lambda: b(other)) == 1
    with launched("conv_fprop_kernel"):
        out = b(other)
    torch.testing.assert_close(out, _eager(b, other), rtol=1e-4, atol=1e-4)


def test_eval_and_no_handoff_leak(device):
    """An eval block computes no output statistics, and a later training block does not pick up
    statistics handed off before it."""
    a, b = _pair(device)
    x = _input(device)
    y = a(x)
    a.eval()
    assert _stats_launches(lambda: a(y)) == 0  # eval: running statistics, no output statistics
    z = a(y)
    assert _stats_launches(lambda: b(z)) == 1


def _eager(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy

    with torch.no_grad():
        return set_fused(copy.deepcopy(block), False)(x)


@pytest.mark.parametrize("backend", ["triton", "cudnn"])
def test_network_with_handoff_matches_eager(poison, device, no_tf32, backend):
    """A pre-activation bottleneck network (preact_resnet(11)'s stages at a quarter of its widths:
    the interpreter's time goes with the channel blocks): every block after the first and the head
    take their input statistics from the block before; outputs, gradients and running statistics
    still match float64 eager."""
    torch.manual_seed(0)
    model = PreActResNet(PreActBottleneck, [1, 1, 1], [4, 8, 16], num_classes=5, stem="cifar", stem_channels=16)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.2)
    with route.force(backend), launched("bn_relu_pool_kernel", "bn_relu_pool_bwd_kernel",
                                        *(CHAIN_KERNELS if backend == "triton" else ROUTE_KERNELS)):
        r = check_module(model, (2, 3, 8, 8), dtype=torch.float32, device=device, steps=2)
    bad = r.failures(torch.float32)
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("backend", ["triton", "cudnn"])
def test_activation_checkpointing(device, no_tf32, backend):
    """torch.utils.checkpoint recomputes each block's forward during backward: the recomputation
    must never pick up statistics handed off by another block, and the gradients must match an
    uncheckpointed step (up to the merge order of the statistics)."""
    import copy

    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    blocks = nn.Sequential(PreActBasicBlock(8, 8), PreActBasicBlock(8, 8), PreActBottleneck(8, 2))
    blocks = blocks.to(device).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(blocks)
    x = torch.randn(2, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    kernels = CONV_KERNELS if backend == "triton" else ROUTE_KERNELS
    with route.force(backend):
        with launched(*kernels):
            xa = x.clone().requires_grad_(True)
            ya = blocks(xa)
            ya.backward(dy)
        with launched(*kernels):
            xb = x.clone().requires_grad_(True)
            h = xb
            for blk in twin:
                h = checkpoint(blk, h, use_reentrant=False)
            h.backward(dy)
    torch.testing.assert_close(h, ya, rtol=0, atol=0)  # the first forward is the same computation
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(blocks.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)
