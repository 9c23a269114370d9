"""Checking fused ops against PyTorch: shared by the test suite and ``python -m fusedres``.

The rule (STYLE.md): a fused result's relative error against a float64 reference must be
within twice the error PyTorch itself makes in the same dtype on the same device, plus a
small dtype-dependent floor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .functional import bn_relu_conv2d
from .reference import bn_relu_conv2d_reference

#: Error floor per dtype (relative, in norm): about one rounding of the output dtype.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
#: Floor for fp32 convolutions that run on TF32 tensor cores: both operands keep 10 mantissa
#: bits, so a single product can be off by up to 2 * 2**-10 (seen on an H200 for a 1-element
#: convolution: 1.01e-3). Our kernels use TF32 whenever ``torch.backends.cudnn.allow_tf32``
#: allows it; cuDNN may or may not for a given shape, so eager's own error is no guide there.
TF32_ATOL = 2 * 2**-10


def atol(dtype: torch.dtype, device: torch.device | str, matmul: bool = True) -> float:
    """The error floor for a result in ``dtype`` computed on ``device`` (``matmul``: by a convolution)."""
    tf32 = matmul and dtype == torch.float32 and torch.device(device).type == "cuda"
    return TF32_ATOL if tf32 and torch.backends.cudnn.allow_tf32 else ATOL[dtype]


def rel_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    """||value - ref|| / ||ref|| in float64 (0 when both are 0); NaN anywhere gives inf."""
    v = value.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(v).all():
        return float("inf")
    den = r.norm().item()
    num = (v - r).norm().item()
    return num / den if den > 0 else num


def within_bound(err: float, torch_err: float, dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """The acceptance rule: err <= 2 * torch_err + atol(dtype, device)."""
    return err <= 2.0 * torch_err + atol(dtype, device)


@dataclass
class CaseResult:
    """Errors of the fused op and of eager PyTorch (same dtype) against float64, per quantity."""

    device: torch.device
    fused: dict[str, float] = field(default_factory=dict)
    eager: dict[str, float] = field(default_factory=dict)

    def failures(self, dtype: torch.dtype) -> list[str]:
        return [
            f"{k}: fused {self.fused[k]:.2e} vs eager {self.eager[k]:.2e}"
            for k in self.fused
            if not within_bound(self.fused[k], self.eager[k], dtype, self.device)
        ]


def check_bn_relu_conv2d(
    *,
    n: int,
    c: int,
    h: int,
    w: int,
    cout: int,
    ksize: int,
    stride: int,
    padding: int,
    dtype: torch.dtype,
    device: torch.device | str,
    training: bool = True,
    residual: bool = False,
    affine: bool = True,
    running: bool = True,
    channels_last: bool = True,
    steps: int = 1,
    mean_offset: float = 0.0,
    seed: int = 0,
) -> CaseResult:
    """Run :func:`bn_relu_conv2d` forward and backward ``steps`` times and compare every output,
    gradient and running statistic with float64 PyTorch; eager PyTorch in ``dtype`` is measured
    the same way to give the error it makes itself."""
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)

    def rnd(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        # Rounded to the tested dtype first, so the float64 reference sees the very same
        # inputs and the errors measure the computation, not the input rounding.
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset
        return t.to(dtype).to(torch.float64)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x64 = rnd(n, c, h, w, scale=1.5, offset=mean_offset + 0.3)
    w64 = rnd(cout, c, ksize, ksize, scale=(2.0 / (c * ksize * ksize)) ** 0.5)
    g64 = rnd(c, scale=0.3, offset=1.0) if affine else None
    b64 = rnd(c, scale=0.3) if affine else None
    rm64 = rnd(c, scale=0.5, offset=mean_offset) if running else None
    rv64 = (rnd(c, scale=0.3).abs() + 0.5) * 2.0 if running else None
    oh = (h + 2 * padding - ksize) // stride + 1
    ow = (w + 2 * padding - ksize) // stride + 1
    res64 = rnd(n, cout, oh, ow) if residual else None
    grads64 = [rnd(n, cout, oh, ow) for _ in range(steps)]

    def run(impl, dt: torch.dtype, dev: torch.device) -> dict[str, torch.Tensor]:
        def leaf(t: torch.Tensor | None, keep_fp32: bool = False, grad: bool = True) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.detach().to(dev, torch.float32 if keep_fp32 and dt != torch.float64 else dt, copy=True)
            if t.dim() == 4:
                t = t.contiguous(memory_format=fmt)
            return t.requires_grad_(grad)

        x, wt, res = leaf(x64), leaf(w64), leaf(res64)
        g, b = leaf(g64, True), leaf(b64, True)
        rm, rv = leaf(rm64, True, False), leaf(rv64, True, False)
        outs: dict[str, torch.Tensor] = {}
        named = {"x": x, "weight": wt, "bn_weight": g, "bn_bias": b, "residual": res}
        for i in range(steps):
            for t in named.values():
                if t is not None:
                    t.grad = None  # compare the gradients of the last step alone
            y = impl(x, wt, g, b, rm, rv, training=training, momentum=0.1, eps=1e-5,
                     stride=stride, padding=padding, residual=res)
            y.backward(grads64[i].to(dev, dt).contiguous(memory_format=fmt))
            outs[f"out{i}"] = y.detach()
        for k, t in named.items():
            if t is not None:
                outs[f"grad_{k}"] = t.grad
        if rm is not None:
            outs["running_mean"], outs["running_var"] = rm, rv
        return outs

    ref = run(bn_relu_conv2d_reference, torch.float64, torch.device("cpu"))
    return _errors(ref, run(bn_relu_conv2d, dtype, device), run(bn_relu_conv2d_reference, dtype, device), device)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Let fp32 convolutions and matmuls use TF32 inside the block, or not (our kernels follow
    ``torch.backends.cudnn.allow_tf32``, as PyTorch's convolutions do)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _errors(ref: dict[str, torch.Tensor], fused: dict[str, torch.Tensor], eager: dict[str, torch.Tensor],
            device: torch.device) -> CaseResult:
    """Each quantity's error against the float64 reference, fused and eager."""
    result = CaseResult(device)
    for k, r in ref.items():
        result.fused[k] = rel_error(fused[k], r)
        result.eager[k] = rel_error(eager[k], r)
    return result


def set_fused(model: torch.nn.Module, fused: bool) -> torch.nn.Module:
    """Switch every fusedres block (and network head) in ``model`` to the fused or eager path."""
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = fused
    return model


def check_module(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    steps: int = 2,
    eval_after: bool = True,
    channels_last: bool = True,
    seed: int = 0,
) -> CaseResult:
    """Train ``model`` (fused) for ``steps`` forward/backward passes, then run it in eval, and
    compare outputs, input and parameter gradients, and buffers (running statistics,
    ``num_batches_tracked``) with its eager twin in float64; the eager twin in ``dtype`` gives
    PyTorch's own error."""
    import copy

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [torch.randn(input_shape, generator=gen, dtype=torch.float64).to(dtype).double() for _ in range(steps + 1)]
    base = copy.deepcopy(model).train()

    def run(fused: bool, dt: torch.dtype, dev: torch.device) -> dict[str, torch.Tensor]:
        m = set_fused(copy.deepcopy(base), fused)
        m = m.to(dev, dt)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        outs: dict[str, torch.Tensor] = {}
        g = torch.Generator().manual_seed(seed + 1)
        for i in range(steps):
            m.zero_grad(set_to_none=True)
            x = inputs[i].to(dev, dt, copy=True).contiguous(memory_format=fmt).requires_grad_()
            y = m(x)
            dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dt)
            y.backward(dy.to(dev).contiguous(memory_format=fmt) if y.dim() == 4 else dy.to(dev))
            outs[f"out{i}"] = y.detach()
        outs["grad_input"] = x.grad
        for name, p in m.named_parameters():
            outs[f"grad {name}"] = p.grad
        if eval_after:
            m.eval()
            with torch.no_grad():
                outs["eval_out"] = m(inputs[steps].to(dev, dt).contiguous(memory_format=fmt))
        for name, b in m.named_buffers():
            outs[f"buffer {name}"] = b.detach().to(torch.float64)
        return outs

    ref = run(False, torch.float64, torch.device("cpu"))
    return _errors(ref, run(True, dtype, device), run(False, dtype, device), device)
