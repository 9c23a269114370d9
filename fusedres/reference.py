"""Eager PyTorch references of the fused ops: one definition shared by the tests, the
benchmarks and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bn_relu_conv2d_reference(
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
) -> torch.Tensor:
    """``conv2d(relu(batch_norm(x)), weight, stride, padding) (+ residual)`` in eager PyTorch."""
    a = F.relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    y = F.conv2d(a, weight, None, stride, padding)
    return y if residual is None else y + residual
