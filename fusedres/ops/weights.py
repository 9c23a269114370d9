"""Weight layouts the kernels read, cached per parameter version: the one cache of them.

:func:`fusedres._fused.memory.kernel_weight` (the channels_last weight every engine reads) and
:func:`fusedres.ops.hopper.dgrad_weight` (the sm_90 dgrad's transposed, tap-flipped copy) both
come from :func:`cached_layout`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

# (id(weight), kind) -> (weak reference to weight, weight._version, the copy in that layout)
_CACHE: dict[tuple[int, str], tuple[weakref.ref, int, torch.Tensor]] = {}


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s work is being recorded into a CUDA graph: host-side caches must not be used
    then (a replay would read what the cache held at capture time, not the current values)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def cached_layout(weight: torch.Tensor, kind: str, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(weight.detach())``, made once per version of ``weight`` and layout ``kind``.

    The copy is cached against the tensor's version counter, so it is refreshed after an
    optimizer step (an in-place update) and never rebuilt per call; the entry goes when the
    tensor does. While a CUDA graph is captured the copy is made in the graph instead, so that
    every replay reads the weight as it is then. A write through ``weight.data`` (e.g.
    ``p.data.add_(...)``) does not bump the version counter, so it is not seen: the copy stays
    stale until the next tracked in-place update (``torch.no_grad()`` + ``p.add_``, every
    ``torch.optim`` step, ``load_state_dict``) or a new tensor.
    """
    if capturing(weight):
        return make(weight.detach())
    key = (id(weight), kind)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    copy = make(weight.detach())
    ref = weakref.ref(weight, lambda _ref, key=key: _CACHE.pop(key, None))
    _CACHE[key] = (ref, weight._version, copy)
    return copy
