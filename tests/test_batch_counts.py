"""``num_batches_tracked`` counted by the launches that finalize each BatchNorm's statistics (the
planned block path passes the counters down instead of launching a ``_foreach_add_``): after a
few training steps every counter holds what eager PyTorch's modules would hold, whichever launch
finalizes — the producing convolution's ticket (pointer or Hopper engine), the statistics pass,
``bn_finalize`` after a hand-off or on the two-launch path, or the cuDNN route's statistics pass."""

from __future__ import annotations

import contextlib

import pytest
import torch
from _helpers import launched

import fusedres
from fusedres.ops import bn as bn_ops
from fusedres.ops import route

CL = torch.channels_last

# mode: (context, a kernel it must launch)
MODES = {
    "tickets": (contextlib.nullcontext, "conv_fprop_kernel"),
    "two launches": (lambda: bn_ops.producer_reductions(False), "bn_finalize_kernel"),
    "hopper engine": (lambda: route.engine("hopper"), "hopper_fprop_kernel"),
    "cudnn route": (lambda: route.force("cudnn"), "bn_stats_kernel"),
}


# (mode, block before, block, change to the block): each mode once, the counted BatchNorms vary
CASES = [
    ("tickets", lambda: fusedres.PreActBasicBlock(16, 16), lambda: fusedres.PreActBasicBlock(16, 16, 2),
     lambda b: None),
    ("two launches", lambda: fusedres.PreActBottleneck(16, 4), lambda: fusedres.PreActBottleneck(16, 4),
     lambda b: b.bn2.eval()),
    ("hopper engine", lambda: fusedres.PreActBottleneck(16, 4), lambda: fusedres.PreActBottleneck(16, 4),
     lambda b: setattr(b.bn1, "track_running_stats", False)),
    ("cudnn route", lambda: fusedres.PreActBasicBlock(16, 16), lambda: fusedres.PreActBasicBlock(16, 16, 2),
     lambda b: b.bn1.eval()),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_batches_counted_by_the_finalizing_launches(case):
    mode, make_first, make_block, change = case
    torch.manual_seed(0)
    first, block = make_first().to(memory_format=CL), make_block().to(memory_format=CL)
    change(block)
    bns = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [int(bn.num_batches_tracked) for bn in bns]
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL)
    steps = 2
    context, kernel = MODES[mode]
    with context(), launched(kernel):
        for step in range(steps):
            with torch.no_grad():
                h = first(x)  # the block's first statistics come handed off (step 0) or by a pass (step 1)
            if step == 1:
                h = h.clone()  # not the handed-off tensor: a statistics pass of its own
            block(h.requires_grad_(True)).sum().backward()
    assert block.__dict__.get("_fused_plan") is not None  # the planned path (the one that passes counters)
    for bn, n in zip(bns, before):
        want = n + steps if bn.training and bn.track_running_stats else n
        assert int(bn.num_batches_tracked) == want, (bn, int(bn.num_batches_tracked), want)
