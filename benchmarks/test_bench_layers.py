"""Each convolution kernel role, and the fused op, against cuDNN at the layers of DESIGN.md §5.

bf16, channels_last activations and weights, BatchNorm affine parameters in fp32. Rows
(``pass`` = role; eager = the cuDNN/PyTorch baseline; compile = that baseline under
``torch.compile`` where it does more than call cuDNN):

- ``fprop``        our conv, no fusion                    vs ``F.conv2d`` on the activation
- ``fprop+bnrelu`` our conv with the BN-apply + ReLU prologue
                                                           vs ``F.batch_norm`` (same statistics) + ReLU + ``F.conv2d``
- ``dgrad``        our input gradient, no fusion          vs ``aten.convolution_backward`` (input only)
- ``dgrad+bnbwd``  our input gradient + ReLU mask + BN-backward sums
                                                           vs ``aten.convolution_backward`` + mask + sums
- ``wgrad+bnrelu`` our weight gradient, recomputing relu(bn(x))
                                                           vs ``aten.convolution_backward`` (weight only) on the
                                                             stored activation
- ``op fwd+bwd``   ``bn_relu_conv2d`` forward + backward (training) vs its eager reference
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cases
import harness
import pytest
import torch
import torch.nn.functional as F

from fusedres import bn_relu_conv2d
from fusedres.ops import bn as bn_ops
from fusedres.ops import conv as conv_ops
from fusedres.reference import bn_relu_conv2d_reference

EPS = 1e-5
DTYPE = torch.bfloat16
NOT_APPLICABLE = "not measured: torch.compile would call the same cuDNN convolution"


@dataclass
class LayerInputs:
    """One copy of a layer's tensors; ``a`` = relu(bn(x)) stored, as eager PyTorch keeps it."""

    x: torch.Tensor
    w: torch.Tensor
    dy: torch.Tensor
    g: torch.Tensor
    b: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    a: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor


def make_inputs(shape: cases.LayerShape, device: torch.device) -> LayerInputs:
    cl = torch.channels_last
    pad = shape.ksize // 2
    oh = conv_ops.conv_out_size(shape.hw, shape.ksize, shape.stride, pad)
    x = torch.randn(shape.n, shape.cin, shape.hw, shape.hw, device=device, dtype=DTYPE).contiguous(memory_format=cl)
    w = (torch.randn(shape.cout, shape.cin, shape.ksize, shape.ksize, device=device, dtype=DTYPE) * 0.05)
    dy = torch.randn(shape.n, shape.cout, oh, oh, device=device, dtype=DTYPE).contiguous(memory_format=cl)
    g = torch.rand(shape.cin, device=device) + 0.5
    b = torch.randn(shape.cin, device=device)
    mean, invstd, scale, shift = bn_ops.bn_finalize(
        bn_ops.bn_stats(x), shape.n * shape.hw * shape.hw, g, b, None, None,
        training=True, momentum=0.1, eps=EPS, channels=shape.cin, device=device,
    )
    a = torch.relu(x.float() * scale[None, :, None, None] + shift[None, :, None, None]).to(DTYPE)
    return LayerInputs(
        x=x, w=w.contiguous(memory_format=cl), dy=dy, g=g, b=b, mean=mean, var=invstd.pow(-2) - EPS,
        invstd=invstd, scale=scale, shift=shift, a=a.contiguous(memory_format=cl),
        running_mean=torch.zeros(shape.cin, device=device), running_var=torch.ones(shape.cin, device=device),
    )


def _conv_backward(dy: torch.Tensor, a: torch.Tensor, w: torch.Tensor, stride: int, padding: int,
                   mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
    return torch.ops.aten.convolution_backward(
        dy, a, w, None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], 1, mask)


def eager_bnrelu_conv(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, b: torch.Tensor, mean: torch.Tensor,
                      var: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """BatchNorm with given statistics (as the fused prologue), ReLU, convolution."""
    return F.conv2d(F.relu(F.batch_norm(x, mean, var, g, b, False, 0.0, EPS)), w, None, stride, padding)


def eager_dgrad_bnbwd(dy: torch.Tensor, a: torch.Tensor, w: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                      invstd: torch.Tensor, stride: int, padding: int) -> tuple[torch.Tensor, ...]:
    """Input gradient, ReLU mask, and the two per-channel sums of the BatchNorm backward."""
    da = _conv_backward(dy, a, w, stride, padding, [True, False, False])[0]
    dz = da * (a > 0)
    xhat = (x.float() - mean[None, :, None, None]) * invstd[None, :, None, None]
    return dz, dz.float().sum((0, 2, 3)), (dz.float() * xhat).sum((0, 2, 3))


def role_calls(role: str, t: LayerInputs, s: int, pad: int,
               compile_fn: Callable[[Callable], Callable] | None) -> dict[str, Callable[[], object] | None]:
    """The fused, eager and (where it applies) compiled calls of ``role`` on one input copy."""
    shape = tuple(t.x.shape)
    if role == "fprop":
        return {"fused": lambda: conv_ops.conv_fprop(t.x, t.w, stride=s, padding=pad),
                "eager": lambda: F.conv2d(t.a, t.w, None, s, pad), "compile": None}
    if role == "fprop+bnrelu":
        return {"fused": lambda: conv_ops.conv_fprop(t.x, t.w, stride=s, padding=pad, scale=t.scale, shift=t.shift),
                "eager": lambda: eager_bnrelu_conv(t.x, t.w, t.g, t.b, t.mean, t.var, s, pad),
                "compile": compile_fn and (lambda: compile_fn(t.x, t.w, t.g, t.b, t.mean, t.var, s, pad))}
    if role == "dgrad":
        return {"fused": lambda: conv_ops.conv_dgrad(t.dy, t.w, shape, stride=s, padding=pad),
                "eager": lambda: _conv_backward(t.dy, t.a, t.w, s, pad, [True, False, False]), "compile": None}
    if role == "dgrad+bnbwd":
        def fused() -> object:
            _, parts = conv_ops.conv_dgrad(t.dy, t.w, shape, stride=s, padding=pad,
                                           bn=(t.x, t.scale, t.shift, t.mean, t.invstd))
            return bn_ops.bn_bwd_reduce(*parts)

        return {"fused": fused, "eager": lambda: eager_dgrad_bnbwd(t.dy, t.a, t.w, t.x, t.mean, t.invstd, s, pad),
                "compile": compile_fn and (lambda: compile_fn(t.dy, t.a, t.w, t.x, t.mean, t.invstd, s, pad))}
    if role == "wgrad+bnrelu":
        return {"fused": lambda: conv_ops.conv_wgrad(t.dy, t.x, t.w, stride=s, padding=pad, scale=t.scale,
                                                     shift=t.shift),
                "eager": lambda: _conv_backward(t.dy, t.a, t.w, s, pad, [False, True, False]), "compile": None}
    raise ValueError(f"unknown role {role!r}")


def op_step(forward: Callable[..., torch.Tensor], t: LayerInputs, s: int, pad: int) -> Callable[[], object]:
    """Forward in training mode (running statistics updated) and the gradients of x, w, and the
    BatchNorm affine parameters."""
    leaves = [t.x.detach().requires_grad_(), t.w.detach().requires_grad_(),
              t.g.detach().requires_grad_(), t.b.detach().requires_grad_()]

    def step() -> object:
        out = forward(*leaves, t.running_mean, t.running_var, training=True, stride=s, padding=pad)
        return torch.autograd.grad(out, leaves, t.dy)

    return step


_COMPILE_TARGETS = {"fprop+bnrelu": eager_bnrelu_conv, "dgrad+bnbwd": eager_dgrad_bnbwd,
                    "op fwd+bwd": bn_relu_conv2d_reference}


@pytest.mark.parametrize(("shape", "role"), cases.layer_params(harness.mode() != harness.MODE_CUDA))
def test_layer(measure_case: Callable[..., dict], bench: harness.BenchSession, shape: cases.LayerShape,
               role: str) -> None:
    torch.manual_seed(0)
    s, pad = shape.stride, shape.ksize // 2
    first = make_inputs(shape, bench.device)
    inputs = [first] + [make_inputs(shape, bench.device)
                        for _ in range(bench.copies(harness.nbytes(first.x, first.dy, first.a)) - 1)]

    compile_note: str | None = None
    compile_fn = None
    if role not in _COMPILE_TARGETS:
        compile_note = NOT_APPLICABLE
    elif bench.compile_note():
        compile_note = bench.compile_note()
    elif bench.quick:
        compile_note = "not run in --quick"
    else:
        compile_fn = harness.compiled(_COMPILE_TARGETS[role])

    esz = first.x.element_size()
    x_b, w_b, dy_b = first.x.numel() * esz, first.w.numel() * esz, first.dy.numel() * esz
    if role == "op fwd+bwd":
        impls: dict[str, Callable[[], object] | str] = {
            "fused": harness.rotating([op_step(bn_relu_conv2d, t, s, pad) for t in inputs]),
            "eager": harness.rotating([op_step(bn_relu_conv2d_reference, t, s, pad) for t in inputs]),
            "compile": harness.rotating([op_step(compile_fn, t, s, pad) for t in inputs]) if compile_fn
            else compile_note,
        }
        # forward reads x, w and writes y; backward reads dy, x, w and writes dx, dw
        min_bytes, passes = 3 * (x_b + w_b) + 2 * dy_b, 3
    else:
        calls = [role_calls(role, t, s, pad, compile_fn) for t in inputs]
        impls = {name: harness.rotating([c[name] for c in calls]) if calls[0][name] else compile_note
                 for name in harness.IMPLS}
        extra = {"dgrad+bnbwd": x_b}.get(role, 0)  # the BN backward also reads x
        min_bytes, passes = x_b + w_b + dy_b + extra, 1
    flops = 2.0 * first.dy.numel() * shape.cin * shape.ksize * shape.ksize * passes
    measure_case(
        suite="layers", case=shape.name, dtype="bfloat16", pass_name=role, impls=impls, flops=flops,
        min_bytes=min_bytes, peak=role == "op fwd+bwd",
        shape=f"x ({shape.n}, {shape.cin}, {shape.hw}, {shape.hw}) w ({shape.cout}, {shape.cin}, {shape.ksize}, "
              f"{shape.ksize}) stride {s} padding {pad}",
    )
