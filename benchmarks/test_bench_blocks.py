"""One training step and one eval forward of the pre-activation blocks.

fused (the block as built) vs eager (its ``fused=False`` twin: the same modules in eager
PyTorch, cuDNN convolutions) vs that twin under ``torch.compile``. channels_last; bf16, fp16,
and fp32 with TF32 allowed (as PyTorch's default for convolutions); the training step is
forward + ``backward(dy)`` with the input requiring grad, as inside a network; peak memory of
every step.

``test_block_graph``: the bf16 training step captured in CUDA graphs (fused and eager, see
:func:`harness.cuda_graphed`) and replayed, against the eager twin under
``torch.compile(mode="reduce-overhead")`` (inductor's own CUDA graphs): the time without the
CPU's launch overhead.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import cases
import harness
import pytest
import torch
from torch import nn

from fusedres.testing import set_fused, tf32


def _train_step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    model(x).backward(dy)


def _eval_forward(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


@dataclass
class BlockSetup:
    """A block, its eager twin and the rotated inputs of one case."""

    fused: nn.Module
    eager: nn.Module
    xs: list[torch.Tensor]
    dys: list[torch.Tensor]
    train: bool
    min_bytes: int

    def calls(self, model: nn.Module) -> list[Callable[[], None]]:
        """One call per input copy."""
        if self.train:
            return [functools.partial(_train_step, model, x, dy) for x, dy in zip(self.xs, self.dys)]
        return [functools.partial(_eval_forward, model, x) for x in self.xs]

    def grads(self) -> list[torch.Tensor]:
        return [*self.fused.parameters(), *self.eager.parameters(), *self.xs] if self.train else []

    def shape(self, case: cases.BlockCase) -> str:
        return (f"{type(self.fused).__name__}({self.fused.in_channels}, {self.fused.out_channels}) "
                f"x {tuple(case.input_shape)}")


def setup_block(bench: harness.BenchSession, case: cases.BlockCase, dtype: torch.dtype, train: bool) -> BlockSetup:
    cl = torch.channels_last
    torch.manual_seed(0)
    fused = case.build().to(bench.device, dtype).to(memory_format=cl).train(train)
    eager = set_fused(copy.deepcopy(fused), False)
    x0 = torch.randn(case.input_shape, device=bench.device, dtype=dtype).contiguous(memory_format=cl)
    with torch.no_grad():
        out_shape = eager(x0).shape
    x_b = harness.nbytes(x0)
    y_b = x_b // x0.numel() * out_shape.numel()
    copies = bench.copies(x_b + y_b)
    xs = [x0.requires_grad_(train)] + [torch.randn_like(x0).requires_grad_(train) for _ in range(copies - 1)]
    dys = [torch.randn(out_shape, device=bench.device, dtype=dtype).contiguous(memory_format=cl)
           for _ in range(copies if train else 0)]
    p_b = harness.nbytes(*eager.parameters())
    # training: read x, dy and the parameters, write y, dx and the parameter gradients
    min_bytes = 2 * (x_b + y_b + p_b) if train else x_b + y_b + p_b
    return BlockSetup(fused, eager, xs, dys, train, min_bytes)


@pytest.mark.parametrize(("case", "dt", "pass_name"), cases.block_params(harness.mode() != harness.MODE_CUDA))
def test_block(measure_case: Callable[..., dict], bench: harness.BenchSession, case: cases.BlockCase, dt: str,
               pass_name: str) -> None:
    label, dtype, allow_tf32 = cases.DTYPES[dt]
    with tf32(allow_tf32):
        s = setup_block(bench, case, dtype, pass_name == cases.TRAIN)
        compile_impl: Callable[[], None] | str = bench.compile_note() or harness.rotating(
            s.calls(harness.compiled(s.eager)))
        measure_case(
            suite="blocks", case=case.name, dtype=label, pass_name=pass_name, shape=s.shape(case),
            impls={"fused": harness.rotating(s.calls(s.fused)), "eager": harness.rotating(s.calls(s.eager)),
                   "compile": compile_impl},
            flops=harness.count_flops(harness.rotating(s.calls(s.eager))), min_bytes=s.min_bytes,
            grads=s.grads(), peak=True,
        )


@pytest.mark.parametrize("case", cases.block_graph_params(harness.mode() != harness.MODE_CUDA))
def test_block_graph(measure_case: Callable[..., dict], bench: harness.BenchSession, case: cases.BlockCase) -> None:
    label, dtype, allow_tf32 = cases.DTYPES["bf16"]
    with tf32(allow_tf32):
        s = setup_block(bench, case, dtype, train=True)
        grads = s.grads()
        compile_impl: Callable[[], None] | str = bench.compile_note() or harness.rotating(
            s.calls(harness.compiled(s.eager, mode="reduce-overhead")))
        skips = harness.cudagraph_skips()
        measure_case(
            suite="blocks", case=case.name, dtype=label, pass_name=cases.GRAPH, shape=s.shape(case),
            impls={"fused": harness.cuda_graphed(bench, s.calls(s.fused), grads),
                   "eager": harness.cuda_graphed(bench, s.calls(s.eager), grads), "compile": compile_impl},
            flops=harness.count_flops(harness.rotating(s.calls(s.eager))), min_bytes=s.min_bytes, grads=grads,
            extra=lambda: {"compile_cudagraph_skips": harness.cudagraph_skips() - skips},
        )
