"""One training step and one eval forward of the pre-activation blocks.

fused (the block as built) vs eager (its ``fused=False`` twin: the same modules in eager
PyTorch, cuDNN convolutions) vs that twin under ``torch.compile``. channels_last; bf16, fp16,
and fp32 with TF32 allowed (as PyTorch's default for convolutions); the training step is
forward + ``backward(dy)`` with the input requiring grad, as inside a network; peak memory of
every step.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import cases
import harness
import pytest
import torch
from torch import nn

from fusedres.testing import set_fused


def _train_step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    model(x).backward(dy)


def _eval_forward(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


@pytest.mark.parametrize(("case", "dt", "pass_name"), cases.block_params(harness.mode() != harness.MODE_CUDA))
def test_block(measure_case: Callable[..., dict], bench: harness.BenchSession, case: cases.BlockCase, dt: str,
               pass_name: str) -> None:
    label, dtype, allow_tf32 = cases.DTYPES[dt]
    train = pass_name == cases.TRAIN
    cl = torch.channels_last
    torch.manual_seed(0)
    with harness.tf32(allow_tf32):
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

        def calls(model: nn.Module) -> Callable[[], None]:
            if train:
                return harness.rotating([functools.partial(_train_step, model, x, dy) for x, dy in zip(xs, dys)])
            return harness.rotating([functools.partial(_eval_forward, model, x) for x in xs])

        if bench.mode == harness.MODE_CUDA:
            compile_impl: Callable[[], None] | str = calls(harness.compiled(eager))
        else:
            compile_impl = "not run in interpreter smoke mode: inductor on the CPU would be slow"
        params = [*fused.parameters(), *eager.parameters()]
        p_b = harness.nbytes(*eager.parameters())
        # training: read x, dy and the parameters, write y, dx and the parameter gradients
        min_bytes = 2 * (x_b + y_b + p_b) if train else x_b + y_b + p_b
        measure_case(
            suite="blocks", case=case.name, dtype=label, pass_name=pass_name,
            shape=f"{type(fused).__name__}({fused.in_channels}, {fused.out_channels}) x {tuple(case.input_shape)}",
            impls={"fused": calls(fused), "eager": calls(eager), "compile": compile_impl},
            flops=harness.count_flops(calls(eager)), min_bytes=min_bytes,
            grads=[*params, *xs] if train else [], peak=True,
        )
