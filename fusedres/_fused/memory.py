"""Tensors the fused computations allocate or reuse: the weight layout cache (and why it is
bypassed under CUDA-graph capture) and the empty outputs shared by the impls and their fake
forwards."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

# id(weight) -> (weak reference to weight, weight._version, channels_last copy)
_WEIGHT_CACHE: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s work is being recorded into a CUDA graph: host-side caches must not be used
    then (a replay would read what the cache held at capture time, not the current values)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the layout the kernels read fastest, (Cout, R, S, Cin) in memory.

    A channels_last weight is used as it is; any other is copied once and the copy is cached
    against the parameter's version counter, so it is refreshed after an optimizer step and
    never rebuilt per call. While a CUDA graph is captured the copy is made in the graph instead,
    so that every replay reads the weight as it is then.
    """
    if weight.is_contiguous(memory_format=torch.channels_last):
        return weight
    if capturing(weight):
        return weight.detach().contiguous(memory_format=torch.channels_last)
    key = id(weight)
    hit = _WEIGHT_CACHE.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    reordered = weight.detach().contiguous(memory_format=torch.channels_last)
    ref = weakref.ref(weight, lambda _ref, key=key: _WEIGHT_CACHE.pop(key, None))
    _WEIGHT_CACHE[key] = (ref, weight._version, reordered)
    return reordered


def cl_empty(shape: Sequence[int], like: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(tuple(shape), device=like.device, dtype=like.dtype, memory_format=fmt)


def stats_empty(channels: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((4, channels), device=like.device, dtype=torch.float32)
