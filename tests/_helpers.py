"""Small helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

from fusedres import _runtime
from fusedres.testing import atol, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def covering_rows(sizes: Sequence[int], strength: int) -> list[tuple[int, ...]]:
    """Rows of the product of ``range(n) for n in sizes``, in product order, such that for every
    ``strength`` of the axes each combination of their values is in some row (a covering array):
    greedily, the row that covers the most combinations still missing, the first such on ties."""
    rows = list(itertools.product(*(range(n) for n in sizes)))
    axes = list(itertools.combinations(range(len(sizes)), min(strength, len(sizes))))
    missing = {(a, tuple(row[i] for i in a)) for row in rows for a in axes}
    chosen = []
    while missing:
        best = max(rows, key=lambda row: sum((a, tuple(row[i] for i in a)) in missing for a in axes))
        chosen.append(best)
        missing -= {(a, tuple(best[i] for i in a)) for a in axes}
    return sorted(chosen)


def kernel_matrix(axes: dict[str, tuple[Sequence, Sequence[str]]], strength: int = 3) -> tuple[str, list]:
    """``(argnames, params)`` for one ``pytest.mark.parametrize`` over the product of ``axes``
    (name -> (values, ids); a name "a,b" takes tuple values).

    On CUDA the whole product. Under the interpreter (no GPU: every kernel runs in numpy, about a
    second per case) a covering array of it: every combination of the values of any ``strength``
    axes is still tested (every dtype x fusion flag x geometry, say), but not every combination
    of all of them; the GPU run of the suite takes the whole product."""
    values = [v for v, _ in axes.values()]
    ids = [i for _, i in axes.values()]
    if torch.cuda.is_available():
        rows = list(itertools.product(*(range(len(v)) for v in values)))
    else:
        rows = covering_rows([len(v) for v in values], strength)
    params = []
    for row in rows:
        args: list = []
        for name, v, i in zip(axes, values, row):
            args.extend(v[i] if "," in name else [v[i]])
        params.append(pytest.param(*args, id="-".join(idx[i] for idx, i in zip(ids, row))))
    return ",".join(axes), params

# What each fused path launches (fusedres.launch_counts names), for the launch guards below.
#: The input and weight gradients of a convolution: launches of their own, or one merged launch
#: (fusedres.ops.conv.conv_bwd_kernel, where the two configs can share it).
DGRAD = ("conv_dgrad_kernel", "conv_bwd_kernel")
WGRAD = ("conv_wgrad_kernel", "conv_bwd_kernel")
#: The three convolution roles of a training step on the Triton route.
CONV_KERNELS = ("conv_fprop_kernel", DGRAD, WGRAD)
#: Every pointer-engine convolution kernel, by name (for launch counts).
CONV_KERNEL_NAMES = ("conv_fprop_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel", "conv_bwd_kernel")
#: A pre-activation chain's training step (fusedres._fused.Chain), also in eval with gradients.
#: (In training the statistics are finalized by the launch that produces them, so a training step
#: may run no bn_finalize_kernel; eval runs one per BatchNorm.)
CHAIN_KERNELS = (*CONV_KERNELS, "bn_bwd_apply_kernel")
#: A torchvision-style block's training step (fusedres._fused.PostAct): the closing
#: relu(bn(y) + shortcut) pass and its backward besides the convolutions.
POSTACT_KERNELS = (*CONV_KERNELS, "bn_add_relu_kernel", "bn_add_relu_bwd_kernel")
#: A pre-activation network's head (fusedres._fused.Pool), forward and backward.
HEAD_KERNELS = ("bn_relu_pool_kernel", "bn_relu_pool_bwd_kernel")
#: The passes the cuDNN route keeps around PyTorch's convolution (fusedres.ops.route).
ROUTE_KERNELS = ("bn_relu_apply_kernel", "relu_bn_bwd_partials_kernel")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm parameters and running statistics, O(1) and away from the defaults (a
    zero-initialised last BatchNorm, as timm makes, would hide the residual branch from every
    comparison; unit statistics would hide the running-statistics path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 copy of ``t`` after rounding to ``dtype``: the exact values a kernel in ``dtype`` sees."""
    return t.to(dtype).to(torch.float64)


def assert_matches(
    fused: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype, what: str, matmul: bool = True
) -> None:
    """The fused error against float64 is within 2x PyTorch's own error in ``dtype``, plus the
    dtype's floor (the TF32 floor for fp32 convolutions on CUDA while TF32 is allowed)."""
    err, base = rel_error(fused, ref64), rel_error(eager, ref64)
    floor = atol(dtype, fused.device, matmul)
    assert err <= 2.0 * base + floor, f"{what}: fused error {err:.3e}, eager {dtype} error {base:.3e}, floor {floor}"


def assert_close64(value: torch.Tensor, ref64: torch.Tensor, tol: float, what: str) -> None:
    err = rel_error(value, ref64)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


@contextlib.contextmanager
def launched(*names: str | tuple[str, ...]) -> Iterator[None]:
    """Assert that each named Triton kernel was launched inside the block; a tuple of names is one
    role that any of its kernels carries out (:data:`DGRAD`, :data:`WGRAD`).

    Names are required: a fused path is proven by the kernels it must run, and a guard without
    names would pass with the path silently replaced by eager PyTorch.
    """
    if not names:
        raise TypeError("launched() needs the names of the kernels the fused path must launch")
    roles = [name if isinstance(name, tuple) else (name,) for name in names]
    before = {n: _runtime.launch_counts[n] for role in roles for n in role}
    yield
    missing = [role for role in roles if all(_runtime.launch_counts[n] == before[n] for n in role)]
    assert not missing, f"Triton kernels not launched: {missing}"


@contextlib.contextmanager
def nothing_launched() -> Iterator[None]:
    """Assert that no fusedres kernel was launched inside the block (a documented eager path)."""
    before = dict(_runtime.launch_counts)
    yield
    ran = {k: n - before.get(k, 0) for k, n in _runtime.launch_counts.items() if n != before.get(k, 0)}
    assert not ran, f"fusedres kernels launched on a path that must run eager PyTorch: {ran}"


def assert_low_precision_block(module, input_shape, dtype, device, *, kernels: tuple[str, ...],
                                steps: int = 2) -> None:
    """A block or network in fp16/bf16: outputs (train and eval) and running statistics by the 2x
    rule, with each of ``kernels`` launched by the fused run.

    Gradients of chained BatchNorm-ReLU stages are not compared at low precision: a
    pre-activation within a rounding of zero flips its ReLU mask against the float64 reference,
    and one flip moves every gradient of that BatchNorm's channel, so one run's gradient error is
    heavy-tailed — 10-100x on some seeds, for eager PyTorch as for the fused kernels (measured
    both ways, on different seeds; neither mean nor median over 5-8 seeds was stable). Gradients
    are held to the 2x rule in fp32 here, and at low precision per kernel and for the one-stage
    op, where there is no chain to amplify a flip.
    """
    from fusedres.testing import check_module

    with launched(*kernels):
        r = check_module(module, input_shape, dtype=dtype, device=device, steps=steps)
    bad = [f for f in r.failures(dtype) if f.startswith(("out", "eval_out", "buffer"))]
    assert not bad, "; ".join(bad)


class HandWrittenPreAct(nn.Module):
    """The common hand-written pre-activation basic block (bn1, conv1, bn2, conv2, an optional
    ``shortcut = Sequential(Conv2d 1x1)``): what ``fusedres.convert`` makes a PreActBasicBlock."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(x))
        s = self.shortcut(a) if hasattr(self, "shortcut") else x
        return self.conv2(torch.relu(self.bn2(self.conv1(a)))) + s
