"""Launches per training step of a fused block inside a network, on the Triton route: Triton
launches (``fusedres.launch_counts``) and ATen ops that run a kernel (a ``TorchDispatchMode`` log
without the ops that only allocate or view). Exact numbers, so that a launch that comes back fails
(benchmarks/NOTES.md §2 and the issue's targets, met: basic <= 7, bottleneck <= 10, projection
bottleneck <= 12).

The block's input is the output of a previous fused block (its statistics are handed off), as
inside a network; gradients start at None (no accumulation kernels). Called on its own, the
block finalizes its first BatchNorm in a launch of its own (``bn_finalize_kernel``: the previous
block did not know that BatchNorm); run after the previous block by fusedres's linking loop
(``PreActSequential``, the stages of ``PreActResNet``), it launches no ``bn_finalize_kernel``: the
previous block's last convolution finalized it (the "linked" cases)."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres import _runtime
from fusedres.ops import bn as bn_ops
from fusedres.ops import conv as conv_ops

# ATen ops in the log that launch no kernel on a GPU: allocations, views, metadata.
_NO_KERNEL = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "view",
              "_unsafe_view", "as_strided", "unbind", "select", "slice", "t", "transpose", "permute", "expand",
              "unsqueeze", "squeeze", "_to_copy", "lift_fresh", "is_same_size", "_has_compatible_shallow_copy_type")


class _AtenLog(TorchDispatchMode):
    """ATen ops outside Triton launches (the interpreter moves tensors through numpy with ATen ops
    of its own; a GPU launch runs none)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.in_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_launch and name not in _NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def launches_unlogged(self) -> Iterator[None]:
        real = _runtime.launch

        def launch(kernel, grid, *args, **kwargs) -> None:  # noqa: ANN001 - the launcher's signature
            self.in_launch = True
            try:
                real(kernel, grid, *args, **kwargs)
            finally:
                self.in_launch = False

        with mock.patch.object(conv_ops, "launch", launch), mock.patch.object(bn_ops, "launch", launch):
            yield


def _step(make_first, make_block) -> tuple[dict[str, int], dict[str, int]]:
    """(Triton launches, ATen ops) of one training step of ``make_block()`` whose input is the output
    of ``make_first()``; the second of two steps (the first allocates the ticket counters)."""
    cl = torch.channels_last
    torch.manual_seed(0)
    first, block = make_first().to(memory_format=cl), make_block().to(memory_format=cl)
    params = list(block.parameters())
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=cl)
    dy = None
    for _ in range(2):
        with torch.no_grad():
            h = first(x)  # hands its output statistics to ``block``
        h.requires_grad_(True)
        for p in params:
            p.grad = None
        if dy is None:  # the first step
            out = block(h)
            dy = torch.randn(out.shape).contiguous(memory_format=cl)
            out.backward(dy)
            continue
        before = dict(fusedres.launch_counts)
        log = _AtenLog()
        with log.launches_unlogged(), log:
            block(h).backward(dy)
    return _since(before), log.ops


def _since(before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in fusedres.launch_counts.items() if n != before.get(k, 0)}


def _linked_step(make_first, make_block) -> tuple[dict[str, int], dict[str, int]]:
    """(Triton launches, ATen ops) of one training step of ``PreActSequential(make_first(),
    make_block())``: the second block's input comes from the first through the linking loop."""
    cl = torch.channels_last
    torch.manual_seed(0)
    seq = fusedres.PreActSequential(make_first(), make_block()).to(memory_format=cl)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=cl).requires_grad_(True)
    dy = torch.randn(seq(x).shape).contiguous(memory_format=cl)
    before = dict(fusedres.launch_counts)
    log = _AtenLog()
    with log.launches_unlogged(), log:
        seq(x).backward(dy)
    return _since(before), log.ops


def _basic():
    return fusedres.PreActBasicBlock(8, 8)


def _bottleneck():
    return fusedres.PreActBottleneck(8, 2)


CASES = {
    # name: (block before, block, Triton launches by kernel); no ATen kernel: the BatchNorms'
    # num_batches_tracked are incremented by the launches that finalize their statistics, and each
    # convolution's input and weight gradients share one launch (conv_bwd_kernel)
    "basic": (_basic, _basic,
              {"bn_finalize_kernel": 1, "conv_fprop_kernel": 2, "conv_bwd_kernel": 2, "bn_bwd_apply_kernel": 2}),
    "bottleneck": (_bottleneck, _bottleneck,
                   {"bn_finalize_kernel": 1, "conv_fprop_kernel": 3, "conv_bwd_kernel": 3, "bn_bwd_apply_kernel": 3}),
    "projection_bottleneck": (_bottleneck, lambda: fusedres.PreActBottleneck(8, 4, stride=2),
                              {"bn_finalize_kernel": 1, "conv_fprop_kernel": 4, "conv_bwd_kernel": 4,
                               "bn_bwd_apply_kernel": 3}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_block_step_launches(name):
    make_first, make_block, expected = CASES[name]
    triton_launches, aten = _step(make_first, make_block)
    assert triton_launches == expected
    # (ones_like: autograd's copy of the seed gradient, CPU only)
    assert {k: n for k, n in aten.items() if k != "ones_like"} == {}, aten


def test_separate_backward_launches_are_still_there():
    """conv.merged_backward(False): each convolution's input and weight gradients in launches of their own."""
    with conv_ops.merged_backward(False):
        triton_launches, _ = _step(_basic, _basic)
    assert triton_launches == {"bn_finalize_kernel": 1, "conv_fprop_kernel": 2, "conv_wgrad_kernel": 2,
                               "conv_dgrad_kernel": 2, "bn_bwd_apply_kernel": 2}


# The step of the two blocks run by the linking loop, from a fresh input: the first block's input
# statistics are finalized by its statistics pass, every other BatchNorm's by the launch that
# produces its input — the second block's first one by the first block's last convolution.
# Not one bn_finalize: the second block's part is its unlinked count above less its finalize.
LINKED = {
    "basic": {"bn_stats_kernel": 1, "conv_fprop_kernel": 2 + 2, "conv_bwd_kernel": 2 + 2,
              "bn_bwd_apply_kernel": 2 + 2},
    "bottleneck": {"bn_stats_kernel": 1, "conv_fprop_kernel": 3 + 3, "conv_bwd_kernel": 3 + 3,
                   "bn_bwd_apply_kernel": 3 + 3},
    "projection_bottleneck": {"bn_stats_kernel": 1, "conv_fprop_kernel": 3 + 4, "conv_bwd_kernel": 3 + 4,
                              "bn_bwd_apply_kernel": 3 + 3},
}


@pytest.mark.parametrize("name", list(CASES))
def test_linked_block_step_launches(name):
    make_first, make_block, _ = CASES[name]
    triton_launches, aten = _linked_step(make_first, make_block)
    assert triton_launches == LINKED[name]
    # (the linked BatchNorm's batch counted by the producing launch too: no ATen kernel)
    assert {k: n for k, n in aten.items() if k != "ones_like"} == {}, aten


def test_two_launch_path_is_still_there():
    """bn.producer_reductions(False): the reductions go back to launches of their own."""
    with bn_ops.producer_reductions(False):
        triton_launches, _ = _step(_basic, _basic)
    assert triton_launches == {"bn_finalize_kernel": 2, "conv_fprop_kernel": 2, "conv_wgrad_kernel": 2,
                               "conv_dgrad_kernel": 2, "wgrad_bn_reduce_kernel": 2, "bn_bwd_apply_kernel": 2}
