"""Functional fused ops.

:func:`bn_relu_conv2d` computes ``conv2d(relu(batch_norm(x)), weight) (+ residual)`` with
the BatchNorm-apply and ReLU done while the convolution loads its input and the residual
added while it stores its output. Its backward recomputes ``relu(batch_norm(x))`` instead of
storing it: only ``x``, the weight and per-channel fp32 statistics are kept.

Where it runs: CUDA tensors run the Triton kernels; CPU tensors run them under the Triton
interpreter when ``TRITON_INTERPRET=1`` was set before ``triton`` was imported, and
otherwise compute the same function with plain PyTorch (:mod:`fusedres.reference`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import _fused, _runtime
from ._fused import ChainSpec, PostActSpec, StageSpec, kernel_weight, sync_group
from .ops import conv as conv_ops
from .reference import bn_relu_conv2d_reference

__all__ = [
    "ChainSpec", "PostActSpec", "StageSpec", "bn_relu_avgpool", "bn_relu_conv2d", "bn_relu_conv_chain",
    "kernel_weight", "post_act_block",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"bn_relu_conv2d: {name} must be one int or a pair of equal ints, got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"bn_relu_conv2d: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"bn_relu_conv2d: {name} must be >= {minimum}, got {value}")
    return value


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    residual: torch.Tensor | None,
    training: bool,
    stride: int,
    padding: int,
) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"bn_relu_conv2d: x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}"
        )
    if x.dim() != 4:
        raise ValueError(f"bn_relu_conv2d: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"bn_relu_conv2d: weight must be 4-D (Cout, Cin, R, S), got shape {tuple(weight.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"bn_relu_conv2d: x must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"bn_relu_conv2d: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    N, C, H, W = x.shape
    Cout, Cin, R, S = weight.shape
    if Cin != C:
        raise ValueError(
            f"bn_relu_conv2d: weight expects {Cin} input channels (shape {tuple(weight.shape)}) "
            f"but x has {C} (shape {tuple(x.shape)})"
        )
    if R != S:
        raise ValueError(f"bn_relu_conv2d: only square kernels are supported, got {R}x{S}")
    if R % 2 == 0:
        raise ValueError(f"bn_relu_conv2d: only odd kernel sizes are supported, got {R}x{S}")
    if min(x.shape[1:]) == 0 or min(weight.shape) == 0:  # an empty batch (N=0) is computed as eager PyTorch does
        raise ValueError(
            f"bn_relu_conv2d: empty channels or images are not supported, got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    OH, OW = conv_ops.conv_out_size(H, R, stride, padding), conv_ops.conv_out_size(W, S, stride, padding)
    if OH < 1 or OW < 1:
        raise ValueError(
            f"bn_relu_conv2d: a {R}x{S} kernel with padding {padding} does not fit input of size {H}x{W}"
        )
    named = {
        "bn_weight": bn_weight,
        "bn_bias": bn_bias,
        "running_mean": running_mean,
        "running_var": running_var,
    }
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bn_relu_conv2d: {name} must be a tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (C,):
            raise ValueError(
                f"bn_relu_conv2d: {name} must have shape ({C},) to match x's channels, got {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bn_relu_conv2d: {name} must be a floating tensor, got {t.dtype}")
        if t.dtype != x.dtype and t.dtype != torch.float32:
            raise TypeError(f"bn_relu_conv2d: {name} dtype {t.dtype} must be float32 or x's dtype {x.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_relu_conv2d: running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("bn_relu_conv2d: running_mean and running_var are required when training=False")
    if training and N * H * W == 1:
        raise ValueError(
            f"bn_relu_conv2d: expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"bn_relu_conv2d: residual must be a tensor or None, got {type(residual).__name__}")
        if tuple(residual.shape) != (N, Cout, OH, OW):
            raise ValueError(
                f"bn_relu_conv2d: residual shape {tuple(residual.shape)} does not match the output shape "
                f"{(N, Cout, OH, OW)}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(f"bn_relu_conv2d: residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    for name, t in {"weight": weight, **named, "residual": residual}.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"bn_relu_conv2d: {name} is on {t.device} but x is on {x.device}")


def _conv_problems(conv: nn.Conv2d) -> list[str]:
    """What in a block's convolution the fused kernels do not compute (empty when it is fine)."""
    problems = []
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    if k[0] != k[1] or k[0] % 2 == 0:
        problems.append(f"kernel_size={k}")
    if s[0] != s[1]:
        problems.append(f"stride={s}")
    if isinstance(p, str) or p[0] != p[1]:
        problems.append(f"padding={p!r}")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups}")
    if conv.dilation != (1, 1):
        problems.append(f"dilation={conv.dilation}")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r}")
    if conv._parameters.get("bias") is not None:  # (not conv.bias: nn.Module.__getattr__ is slow, every call)
        problems.append("a bias")
    return problems


def _check_block_convs(block: str, convs: list[tuple[str, nn.Conv2d]]) -> None:
    """ValueError naming the first convolution of ``block`` that the fused kernels cannot compute."""
    for name, conv in convs:
        problems = _conv_problems(conv)
        if problems:
            raise ValueError(
                f"{block}: {name} has {', '.join(problems)}; the fused kernels take square odd kernels, equal "
                f"strides and paddings, groups=1, dilation=1, zero padding and no bias (fused=False runs the "
                f"block in eager PyTorch)"
            )


def _misplaced(modules: list[nn.Module], device: torch.device) -> bool:
    """Whether a parameter or buffer of ``modules`` (not their children) is on another device; read
    from the modules' dicts, not through nn.Module.__getattr__, which is slow, every call."""
    return any(t is not None and t.device != device
               for m in modules for d in (m._parameters, m._buffers) for t in d.values())


def _check_block_devices(block: str, module: nn.Module, x: torch.Tensor) -> None:
    """ValueError naming the first parameter or buffer of ``module`` on another device than ``x``."""
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in named:
            if t.device != x.device:
                raise ValueError(f"{block}: {kind} {name} is on {t.device} but the input is on {x.device}")


def _check_single_values(block: str, x: torch.Tensor, stages: list[tuple[nn.Module, tuple[int, int]]]) -> None:
    """eager BatchNorm's ValueError for a training-mode BatchNorm that would see one value per
    channel; ``stages`` holds each BatchNorm with the (H, W) of its input."""
    for bn, (h, w) in stages:
        # SyncBatchNorm across processes counts the values of every rank: eager checks the total
        batch_stats = bn.training or bn.running_mean is None
        if batch_stats and x.shape[0] * h * w == 1 and sync_group(bn) is None:
            raise ValueError(f"{block}: expected more than 1 value per channel when training, got input size "
                             f"{tuple(x.shape)} ({h}x{w} values per channel at a BatchNorm)")


def _wants_channels_last(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether PyTorch's convolution would return a channels_last tensor for these operands; for a
    chain of convolutions (``weights`` in order), whether its last one would: a channels_last
    operand makes every later output channels_last (a 1x1 weight is both layouts at once, so a
    chain's 3x3 weight decides even when its last convolution is 1x1)."""

    def cl(t: torch.Tensor) -> bool:
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    return cl(x) or any(cl(w) for w in weights)


def bn_relu_conv_chain(
    spec: ChainSpec,
    x: torch.Tensor,
    stage_tensors: list[torch.Tensor | None],
    *,
    residual: torch.Tensor | None = None,
    proj_weight: torch.Tensor | None = None,
    batches: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Run a validated chain through the fused kernels (see :class:`ChainSpec`).

    ``stage_tensors`` holds, per stage: conv weight, bn weight, bn bias, running mean,
    running var (the last four may be None). ``batches``: per stage, the BatchNorm's
    ``num_batches_tracked`` that the launch finalizing its statistics increments (given only
    for stages with batch statistics), or None. Callers validate shapes, dtypes and devices.
    """
    return _fused.run(_fused.Chain, spec, [x, residual, proj_weight, *stage_tensors], batches)


def bn_relu_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    padding: int = 0,
    residual: torch.Tensor | None = None,
    dilation: int = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d(F.relu(F.batch_norm(x, ...)), weight, None, stride, padding) (+ residual)``, fused.

    Args:
        x: input ``(N, C, H, W)``, float32/float16/bfloat16, channels_last (fast) or contiguous.
        weight: convolution weight ``(Cout, C, k, k)`` with odd ``k``, same dtype as ``x``.
        bn_weight, bn_bias: BatchNorm affine parameters ``(C,)`` or None (``affine=False``).
        running_mean, running_var: BatchNorm running statistics ``(C,)`` or None; in training
            they are updated in place exactly as ``F.batch_norm`` does.
        training: use batch statistics (True) or the running statistics (False).
        momentum, eps: as in ``F.batch_norm``.
        stride, padding: of the convolution (zero padding, applied after the activation).
        residual: optional tensor of the output's shape added to the convolution's result.
        dilation, groups: must be 1; accepted so that unsupported convolutions fail loudly.

    Returns:
        ``(N, Cout, OH, OW)`` in ``x``'s dtype and in the memory format ``F.conv2d`` would
        return. Differentiable with respect to x, weight, bn_weight, bn_bias and residual
        (first-order only).
    """
    stride = _as_int(stride, "stride", 1)
    padding = _as_int(padding, "padding", 0)
    if _as_int(dilation, "dilation", 1) != 1:
        raise ValueError(f"bn_relu_conv2d: dilation={dilation} is not supported (only 1)")
    if _as_int(groups, "groups", 1) != 1:
        raise ValueError(f"bn_relu_conv2d: groups={groups} is not supported (only 1)")
    training = bool(training)
    _check_inputs(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, training, stride, padding)
    if training and not eps > 0 or not eps >= 0:  # F.batch_norm's own rule (NaN refused too)
        raise ValueError(f"bn_relu_conv2d: eps must be {'positive' if training else 'non-negative'}"
                         f"{' when training' if training else ''}, got {eps}")
    # An empty batch has nothing to compute: eager PyTorch's result (an empty output, running
    # statistics untouched, zero parameter gradients) comes from the reference.
    if not _runtime.triton_enabled(x.device) or x.shape[0] == 0:
        return bn_relu_conv2d_reference(
            x, weight, bn_weight, bn_bias, running_mean, running_var, training=training,
            momentum=momentum, eps=eps, stride=stride, padding=padding, residual=residual,
        )
    spec = ChainSpec(
        (StageSpec(stride, padding, float(eps), float(momentum), training),),
        shortcut="residual" if residual is not None else "none",
        out_channels_last=_wants_channels_last(x, weight),
    )
    return bn_relu_conv_chain(
        spec, x, [weight, bn_weight, bn_bias, running_mean, running_var], residual=residual
    )


def bn_relu_avgpool(
    st: StageSpec,
    x: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
) -> torch.Tensor:
    """``relu(batch_norm(x)).mean((2, 3))`` through the fused kernels; ``st`` gives the BatchNorm
    mode (its convolution fields are unused). Callers validate the inputs."""
    return _fused.run(_fused.Pool, st, [x, bn_weight, bn_bias, running_mean, running_var])


def post_act_block(
    spec: PostActSpec,
    x: torch.Tensor,
    tensors: list[torch.Tensor | None],
    *,
    shortcut: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run a validated torchvision-style block through the fused kernels (see
    :class:`PostActSpec` and :class:`fusedres._fused.PostAct` for the order of ``tensors``).
    ``shortcut`` is an already computed shortcut (a downsample module that is not conv1x1 +
    BatchNorm); None means the identity or ``spec.downsample``."""
    return _fused.run(_fused.PostAct, spec, [x, shortcut, *tensors])
