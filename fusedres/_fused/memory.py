"""Tensors the fused computations allocate or reuse: the weight layout cache (and why it is
bypassed under CUDA-graph capture) and the empty outputs shared by the impls and their fake
forwards."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops.weights import cached_layout, capturing

__all__ = ["capturing", "cl_empty", "kernel_weight", "stats_empty"]


def kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the layout the kernels read fastest, (Cout, R, S, Cin) in memory.

    A channels_last weight is used as it is; any other is copied once and the copy is cached
    against the parameter's version counter (:func:`fusedres.ops.weights.cached_layout`), so it
    is refreshed after an optimizer step and never rebuilt per call. While a CUDA graph is
    captured the copy is made in the graph instead, so that every replay reads the weight as it
    is then.
    """
    if weight.is_contiguous(memory_format=torch.channels_last):
        return weight
    return cached_layout(weight, "channels_last", lambda w: w.contiguous(memory_format=torch.channels_last))


def cl_empty(shape: Sequence[int], like: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(tuple(shape), device=like.device, dtype=like.dtype, memory_format=fmt)


def stats_empty(channels: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((4, channels), device=like.device, dtype=torch.float32)
