"""One launch for a convolution's input and weight gradients (``fusedres.ops.conv.conv_bwd_kernel``):
each program runs the tile it runs in its own launch, so a training step gives the same bits with
the launches merged as with ``conv.merged_backward(False)`` — outputs, every gradient, running
statistics — in every block layout (stride-2 parity classes, the projection's pair, a dgrad without
BatchNorm epilogue) and dtype; where the two configs cannot share a launch (different ``num_warps``)
the step falls back to two launches. The interpreter runs programs one after another; the GPU's
concurrent programs (two tickets racing in one launch) are ``tests/test_ticket.py``'s CUDA stress."""

from __future__ import annotations

import pytest
import torch
from _helpers import launched

import fusedres
from fusedres import _runtime
from fusedres.ops import bn as bn_ops
from fusedres.ops import conv as conv_ops

CL = torch.channels_last

CASES = {
    # name: (block, input shape, dtype, merged launches expected per step)
    "basic projection s2, fp32": (lambda: fusedres.PreActBasicBlock(8, 16, 2), (2, 8, 7, 7), torch.float32, 3),
    "bottleneck, bf16": (lambda: fusedres.PreActBottleneck(16, 4), (2, 16, 6, 6), torch.bfloat16, 3),
    # 64 channels in bf16: the dgrad's config has 8 warps, the wgrad's 4 — two launches each
    "basic 64 channels, bf16": (lambda: fusedres.PreActBasicBlock(64, 64), (1, 64, 4, 4), torch.bfloat16, 0),
}


def _step(make, shape, dtype, merged: bool) -> tuple[list[torch.Tensor], dict[str, int]]:
    torch.manual_seed(0)
    block = make().to(dtype=dtype, memory_format=CL)
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=CL).requires_grad_(True)
    before = dict(_runtime.launch_counts)
    with conv_ops.merged_backward(merged):
        y = block(x)
        y.backward(torch.randn_like(y))
    ran = {k: n - before.get(k, 0) for k, n in _runtime.launch_counts.items() if n != before.get(k, 0)}
    return [y, x.grad, *(p.grad for p in block.parameters()), *block.buffers()], ran


@pytest.mark.parametrize("name", list(CASES))
def test_merged_backward_is_bitwise_the_two_launches(name):
    make, shape, dtype, expected = CASES[name]
    got, ran = _step(make, shape, dtype, True)
    ref, ran_ref = _step(make, shape, dtype, False)
    assert ran.get("conv_bwd_kernel", 0) == expected, ran
    assert "conv_bwd_kernel" not in ran_ref
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_merged_counters_follow_the_dgrad_ticket():
    """The weight gradient's ticket counters start after the dgrad's in the stream's counter buffer:
    the two tickets of one launch never share a counter (a GPU race the interpreter cannot show)."""
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    w = torch.randn(8, 8, 3, 3).contiguous(memory_format=CL)
    v = torch.rand(8) + 0.5
    bn = (x, v, v, v, v)
    dplan = conv_ops.dgrad_plan(x, w, tuple(x.shape), stride=1, padding=1, bn=bn, reduce_sums=True)
    wplan = conv_ops.wgrad_plan(x, x, w, stride=1, padding=1, scale=v)
    plan = conv_ops.bwd_plan(dplan, wplan, x.device)
    assert plan is not None
    d_counters = bn_ops.ticket_plan(*dplan.grid)[2]
    assert d_counters > 0
    _, w_counters = plan.make()
    assert w_counters.storage_offset() == d_counters
    assert w_counters.numel() >= wplan.grid[0] * wplan.grid[1]
    with launched("conv_bwd_kernel"):
        dz, sums, dw = conv_ops.conv_bwd(plan, x, w, bn=bn, add=None, x=x, weight_like=w, scale=v, shift=v)
    dz_ref, sums_ref = conv_ops.conv_dgrad(x, w, tuple(x.shape), stride=1, padding=1, bn=bn, reduce_sums=True)
    dw_ref = conv_ops.conv_wgrad(x, x, w, stride=1, padding=1, scale=v, shift=v)
    for a, b in ((dz, dz_ref), (sums[0], sums_ref[0]), (sums[1], sums_ref[1]), (dw, dw_ref)):
        assert torch.equal(a, b)
