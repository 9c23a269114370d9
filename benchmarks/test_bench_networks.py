"""One training step and one eval forward of whole networks, bf16, channels_last. The training
step is forward, cross-entropy on random labels, backward (no optimizer step: it is the same
for every implementation).

fused (fusedres network, or ``fusedres.convert`` of a torchvision one) vs eager (the
``fused=False`` twin, or the torchvision original) vs that eager network under
``torch.compile``; peak memory of every step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import cases
import harness
import pytest
import torch
import torch.nn.functional as F
from torch import nn


def _train_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> None:
    F.cross_entropy(model(x).float(), labels).backward()


def _eval_forward(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


@pytest.mark.parametrize(("case", "pass_name"), cases.network_params(harness.mode() != harness.MODE_CUDA))
def test_network(measure_case: Callable[..., dict], bench: harness.BenchSession, case: cases.NetworkCase,
                 pass_name: str) -> None:
    reason = case.skip_reason()
    if reason:
        pytest.skip(reason)
    cl = torch.channels_last
    dtype = torch.bfloat16
    torch.manual_seed(0)
    train = pass_name == cases.TRAIN
    fused, eager = (m.to(bench.device, dtype).to(memory_format=cl).train(train) for m in case.make())
    x0 = torch.randn(case.input_shape, device=bench.device, dtype=dtype).contiguous(memory_format=cl)
    xs = [x0] + [torch.randn_like(x0) for _ in range(bench.copies(harness.nbytes(x0)) - 1)]
    labels = [torch.randint(case.num_classes, (x0.shape[0],), device=bench.device) for _ in xs]

    def calls(model: nn.Module) -> Callable[[], None]:
        if train:
            return harness.rotating([functools.partial(_train_step, model, x, y) for x, y in zip(xs, labels)])
        return harness.rotating([functools.partial(_eval_forward, model, x) for x in xs])

    if bench.mode == harness.MODE_CUDA:
        compile_impl: Callable[[], None] | str = calls(harness.compiled(eager))
    else:
        compile_impl = "not run in interpreter smoke mode: inductor on the CPU would be slow"
    p_b = harness.nbytes(*eager.parameters())
    measure_case(
        suite="networks", case=case.name, dtype="bfloat16", pass_name=pass_name,
        shape=f"input {tuple(case.input_shape)}, {case.num_classes} classes",
        impls={"fused": calls(fused), "eager": calls(eager), "compile": compile_impl},
        # read the input and the parameters (and write the parameter gradients)
        flops=harness.count_flops(calls(eager)), min_bytes=harness.nbytes(x0) + (2 if train else 1) * p_b,
        grads=[*fused.parameters(), *eager.parameters()] if train else [], peak=True,
    )
