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
    from triton.tools.tensor_descriptor import TensorDescriptor

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

#: Of those, the launches that took the direct path of :data:`FAST_LAUNCH`, by kernel name.
fast_launch_counts: collections.Counter[str] = collections.Counter()


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


def _env_flag(name: str) -> bool:
    import os

    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


#: Opt-in (``FUSEDRES_FAST_LAUNCH=1``, read at import): repeat launches call the cached compiled
#: kernel directly instead of going through ``JITFunction.run``. Off by default until measured
#: and checked on a GPU; never on under the interpreter.
FAST_LAUNCH: bool = _env_flag("FUSEDRES_FAST_LAUNCH") and HAVE_TRITON and not INTERPRET

# (kernel, device, exact argument key, keyword items) -> (run, function, packed metadata,
# values of the parameters after the positional ones, the compiled kernel), or None where the
# fast path cannot be used.
_FAST_CACHE: dict[tuple, tuple | None] = {}


def _fast_key(kernel: Any, device: int, args: tuple, kwargs: dict) -> tuple:
    """A cache key at least as fine as Triton's specialization: tensors by dtype and 16-byte
    alignment of their address (what Triton specializes pointers on), every other argument by
    its exact value (Triton specializes integers on ``== 1``, divisibility by 16 and width, all
    functions of the value)."""
    T = torch.Tensor
    return (kernel, device,
            tuple([a if type(a) is int else (a.dtype, a.data_ptr() & 15) if isinstance(a, T) else (type(a), a)
                   for a in args]),
            *kwargs.items())


def _fast_entry(kernel: Any, compiled: Any, nargs: int, kwargs: dict) -> tuple | None:
    """What a direct launch of ``compiled`` needs, or None when this Triton's objects do not
    look as expected (then every launch of this key goes through ``kernel[grid]``)."""
    import inspect

    if compiled is not None and hasattr(compiled, "result"):  # an asynchronous compilation's future
        compiled = compiled.result()
    params = getattr(kernel, "params", None)
    try:
        run = compiled.run
        function = compiled.function
        packed = compiled.packed_metadata
        names = [p.name for p in params]
    except Exception:  # noqa: BLE001 - any other Triton: keep the public path
        return None
    if run is None or function is None or nargs > len(names):
        return None
    tail = []
    for p, name in zip(params[nargs:], names[nargs:]):
        if name in kwargs:
            tail.append(kwargs[name])
        else:
            default = getattr(p, "default", inspect.Parameter.empty)
            if default is inspect.Parameter.empty:
                return None
            tail.append(default)
    # the compiled kernel rides along: its module is unloaded when it is collected
    return run, function, packed, tuple(tail), compiled


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` and count it in :data:`launch_counts`.

    With :data:`FAST_LAUNCH`, the first launch of each specialization goes through Triton and
    its compiled kernel is kept; later launches with the same key call it directly with the
    arguments Triton's own launcher would pass (``JITFunction.run``'s call convention, the same
    in Triton 3.6 and 3.8), unless a launch hook is installed (a profiler).
    """
    # Host tensor descriptors are expanded by Triton's own launcher (into the TMA descriptor and
    # its shape and strides): only the public path passes them.
    if FAST_LAUNCH and not any(type(a) is TensorDescriptor for a in args):
        rt = triton.knobs.runtime
        if rt.launch_enter_hook is None and rt.launch_exit_hook is None:
            device = torch.cuda.current_device()
            key = _fast_key(kernel, device, args, kwargs)
            entry = _FAST_CACHE.get(key, False)
            if entry is False:
                compiled = kernel[grid](*args, **kwargs)
                _FAST_CACHE[key] = _fast_entry(kernel, compiled, len(args), kwargs)
            elif entry is not None:
                run, function, packed, tail, _ = entry
                g = (*grid, 1, 1)
                run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(device), function, packed, None,
                    None, None, *args, *tail)
                fast_launch_counts[kernel.fn.__name__] += 1
            else:
                kernel[grid](*args, **kwargs)
            launch_counts[kernel.fn.__name__] += 1
            return
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
