"""``fusedres bench``: a quick speed and memory table of block training steps on the current GPU.

fused (the block as built) vs eager (its ``fused=False`` twin: the same modules in eager
PyTorch, cuDNN convolutions) vs that twin under ``torch.compile``; bf16, channels_last; one
training step is forward + ``backward(dy)`` with the input requiring grad, as inside a network.
Times are medians of ``triton.testing.do_bench`` after a warm-up; peak memory is
``torch.cuda.max_memory_allocated`` during one step, above what was allocated before it.
The full suite, with saved results, is ``pytest benchmarks/ --benchmark-only`` in a checkout.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch import nn

from .blocks import PreActBasicBlock, PreActBottleneck
from .testing import set_fused

# (label, block factory, input shape)
CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, int, int, int]]] = [
    ("PreActBasicBlock 64ch 56x56 N=64", lambda: PreActBasicBlock(64, 64), (64, 64, 56, 56)),
    ("PreActBottleneck 64/16ch 32x32 N=128", lambda: PreActBottleneck(64, 16), (128, 64, 32, 32)),
]
DTYPE = torch.bfloat16
IMPLS = ("fused", "eager", "compile")
_WARMUP_CALLS = 3  # untimed calls first: Triton and inductor compilation, cuDNN heuristics


def _timed(step: Callable[[], None], grads: list[torch.Tensor]) -> tuple[float, float]:
    """(median ms, peak MiB above the allocation before one step) of ``step``."""
    from triton.testing import do_bench

    for _ in range(_WARMUP_CALLS):
        for t in grads:
            t.grad = None
        step()
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = float(do_bench(step, warmup=25, rep=100, grad_to_none=grads, return_mode="median"))
    return ms, peak


def _train_step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    model(x).backward(dy)


def _measure(build: Callable[[], nn.Module], shape: tuple[int, int, int, int],
             device: torch.device) -> dict[str, tuple[float, float]]:
    """(median ms, peak MiB) of a training step of the block, per implementation."""
    cl = torch.channels_last
    torch.manual_seed(0)
    fused = build().to(device, DTYPE).to(memory_format=cl).train()
    eager = set_fused(copy.deepcopy(fused), False)
    torch._dynamo.reset()  # a clean compile cache per case: no dynamic shapes carried over
    impls = {"fused": fused, "eager": eager, "compile": torch.compile(copy.deepcopy(eager), dynamic=False)}
    x = torch.randn(shape, device=device, dtype=DTYPE).contiguous(memory_format=cl).requires_grad_()
    with torch.no_grad():
        out_shape = eager(x).shape
    dy = torch.randn(out_shape, device=device, dtype=DTYPE).contiguous(memory_format=cl)
    results = {}
    for name, model in impls.items():
        grads = [x, *model.parameters()]
        results[name] = _timed(functools.partial(_train_step, model, x, dy), grads)
        for t in grads:
            t.grad = None
    return results


def run() -> int:
    """Print the table on the current CUDA device; without one, say so. Returns 0."""
    if not torch.cuda.is_available():
        print("fusedres bench: no CUDA GPU on this machine; nothing measured")
        return 0
    device = torch.device("cuda")
    print(f"fusedres bench on {torch.cuda.get_device_name(device)} (torch {torch.__version__}): "
          f"block training step, {str(DTYPE).removeprefix('torch.')}, channels_last, median of do_bench")
    head = f"{'case':<38} {'fused ms':>9} {'eager ms':>9} {'compile ms':>11} {'vs eager':>9} {'vs compile':>11}"
    print(f"{head} {'peak MiB fused/eager/compile':>29}")
    for label, build, shape in CASES:
        results = _measure(build, shape, device)
        f, e, c = (results[k][0] for k in IMPLS)
        peaks = "/".join(f"{results[k][1]:.0f}" for k in IMPLS)
        print(f"{label:<38} {f:>9.3f} {e:>9.3f} {c:>11.3f} {e / f:>8.2f}x {c / f:>10.2f}x {peaks:>29}")
        torch.cuda.empty_cache()
    print("vs eager / vs compile: the baseline's time over fused (above 1: fused is faster)")
    return 0
