"""Where the Triton kernels can run, and a record of which kernels were launched.

The Triton path runs on CUDA (or ROCm) tensors, and on CPU tensors when the Triton
interpreter is on (``TRITON_INTERPRET=1`` set before ``triton`` is imported). Anywhere
else the functional ops compute the same function with plain PyTorch.
"""

from __future__ import annotations

import collections
from typing import Any

import torch

try:
    import triton

    try:
        from triton import knobs as _knobs

        INTERPRET: bool = bool(_knobs.runtime.interpret)
    except ImportError:  # older triton reads the variable directly
        import os

        INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
    HAVE_TRITON = True
    if INTERPRET:
        from . import _interpreter_fixes

        _interpreter_fixes.apply()
except ImportError:  # pragma: no cover - triton is a hard dependency on Linux
    triton = None
    INTERPRET = False
    HAVE_TRITON = False

#: How many times each fusedres kernel has been launched in this process, by kernel name.
#: Tests read it to prove that a fused path really ran Triton code.
launch_counts: collections.Counter[str] = collections.Counter()


def triton_enabled(device: torch.device) -> bool:
    """True when tensors on ``device`` are computed by the Triton kernels."""
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRET


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the host-side grid arithmetic (``triton.cdiv`` is a constexpr function
    whose host-side call costs microseconds, dozens of times per block step)."""
    return -(-a // b)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` and count it in :data:`launch_counts`."""
    kernel[grid](*args, **kwargs)
    launch_counts[kernel.fn.__name__] += 1


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Number of multiprocessors of a CUDA device; a small stand-in under the interpreter."""
    if device.type != "cuda":
        return 2
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
