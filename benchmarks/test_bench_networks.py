"""One training step and one eval forward of whole networks, bf16, channels_last. The training
step is forward, cross-entropy on random labels, backward (no optimizer step: it is the same
for every implementation).

fused (fusedres network, or ``fusedres.convert`` of a torchvision one) vs eager (the
``fused=False`` twin, or the torchvision original) vs that eager network under
``torch.compile``; peak memory of every step.

``test_network_graph``: the training step captured in CUDA graphs (fused and eager, see
:func:`harness.cuda_graphed`) and replayed, against the eager network under
``torch.compile(mode="reduce-overhead")``: the time without the CPU's launch overhead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class NetworkSetup:
    """A network pair and the rotated inputs of one case."""

    fused: nn.Module
    eager: nn.Module
    xs: list[torch.Tensor]
    labels: list[torch.Tensor]
    train: bool
    min_bytes: int

    def calls(self, model: nn.Module) -> list[Callable[[], None]]:
        """One call per input copy."""
        if self.train:
            return [functools.partial(_train_step, model, x, y) for x, y in zip(self.xs, self.labels)]
        return [functools.partial(_eval_forward, model, x) for x in self.xs]

    def grads(self) -> list[torch.Tensor]:
        return [*self.fused.parameters(), *self.eager.parameters()] if self.train else []


def setup_network(bench: harness.BenchSession, case: cases.NetworkCase, train: bool) -> NetworkSetup:
    reason = case.skip_reason()
    if reason:
        pytest.skip(reason)
    cl = torch.channels_last
    dtype = torch.bfloat16
    torch.manual_seed(0)
    fused, eager = (m.to(bench.device, dtype).to(memory_format=cl).train(train) for m in case.make())
    x0 = torch.randn(case.input_shape, device=bench.device, dtype=dtype).contiguous(memory_format=cl)
    xs = [x0] + [torch.randn_like(x0) for _ in range(bench.copies(harness.nbytes(x0)) - 1)]
    labels = [torch.randint(case.num_classes, (x0.shape[0],), device=bench.device) for _ in xs]
    p_b = harness.nbytes(*eager.parameters())
    # read the input and the parameters (and write the parameter gradients)
    return NetworkSetup(fused, eager, xs, labels, train, harness.nbytes(x0) + (2 if train else 1) * p_b)


@pytest.mark.parametrize(("case", "pass_name"), cases.network_params(harness.mode() != harness.MODE_CUDA))
def test_network(measure_case: Callable[..., dict], bench: harness.BenchSession, case: cases.NetworkCase,
                 pass_name: str) -> None:
    s = setup_network(bench, case, pass_name == cases.TRAIN)
    compile_impl: Callable[[], None] | str = bench.compile_note() or harness.rotating(
        s.calls(harness.compiled(s.eager)))
    measure_case(
        suite="networks", case=case.name, dtype="bfloat16", pass_name=pass_name,
        shape=f"input {tuple(case.input_shape)}, {case.num_classes} classes",
        impls={"fused": harness.rotating(s.calls(s.fused)), "eager": harness.rotating(s.calls(s.eager)),
               "compile": compile_impl},
        flops=harness.count_flops(harness.rotating(s.calls(s.eager))), min_bytes=s.min_bytes,
        grads=s.grads(), peak=True,
    )


@pytest.mark.parametrize("case", cases.network_graph_params(harness.mode() != harness.MODE_CUDA))
def test_network_graph(measure_case: Callable[..., dict], bench: harness.BenchSession,
                       case: cases.NetworkCase) -> None:
    s = setup_network(bench, case, train=True)
    grads = s.grads()
    compile_impl: Callable[[], None] | str = bench.compile_note() or harness.rotating(
        s.calls(harness.compiled(s.eager, mode="reduce-overhead")))
    skips = harness.cudagraph_skips()
    measure_case(
        suite="networks", case=case.name, dtype="bfloat16", pass_name=cases.GRAPH,
        shape=f"input {tuple(case.input_shape)}, {case.num_classes} classes",
        impls={"fused": harness.cuda_graphed(bench, s.calls(s.fused), grads),
               "eager": harness.cuda_graphed(bench, s.calls(s.eager), grads), "compile": compile_impl},
        flops=harness.count_flops(harness.rotating(s.calls(s.eager))), min_bytes=s.min_bytes, grads=grads,
        extra=lambda: {"compile_cudagraph_skips": harness.cudagraph_skips() - skips},
    )
