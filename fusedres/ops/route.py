"""Which engine runs each convolution: one of our two Triton engines, or cuDNN with the fusions
kept around it. This is the one place that chooses.

The two Triton engines have the same launcher contract: :mod:`fusedres.ops.conv`, the portable
pointer kernels (any architecture, any strides), and :mod:`fusedres.ops.hopper`, the sm_90 engine
(TMA tensor descriptors, wgmma; fprop, dgrad at stride 1, wgrad). :func:`fprop_engine`,
:func:`dgrad_engine` and :func:`wgrad_engine` name the engine and, for the pointer engine, the reason.
``FUSEDRES_CONV_ENGINE`` (read per call) chooses:

- ``pointer`` (the default): the pointer kernels everywhere. The Hopper engine is correct under
  the interpreter and its sm_90 build is read offline (``benchmarks/NOTES.md`` §3), but no GPU
  has run it yet: it becomes the default on sm_90 (``auto``) once a GPU run shows it matches
  the pointer engine and is faster (``scripts/gpu_check.sh``, stage ``hopper-fprop``).
- ``auto``: the Hopper engine on an sm_90 GPU wherever its layout rules hold
  (:func:`fusedres.ops.hopper.unsupported`, :func:`~fusedres.ops.hopper.unsupported_dgrad`,
  :func:`~fusedres.ops.hopper.unsupported_wgrad`), the
  pointer kernels elsewhere.
- ``hopper``: the Hopper engine on any device wherever its layout rules hold.

:func:`engine` overrides the variable inside a ``with`` block (tests use ``engine("hopper")`` to
run that engine on the CPU under the interpreter); nothing overrides the layout rules.

:func:`conv_fprop`, :func:`conv_dgrad` and :func:`conv_wgrad` have the signatures and results
of the Triton launchers in :mod:`fusedres.ops.conv`. Routed to cuDNN they keep what the fused
path keeps: the BatchNorm-apply + ReLU becomes one elementwise pass whose output cuDNN reads
(recomputed in the backward, never saved), the statistics of the output come from the stats
kernel, the dgrad's BatchNorm-ReLU backward from one elementwise pass over (da, x).

The choice is a table measured per architecture (``dispatch/sm_XX.json``, made by
``benchmarks/make_dispatch.py`` from a layer benchmark run on that card): for each measured
layer and role, the Triton kernel's time against cuDNN's plus the extra elementwise pass.
A call uses the nearest measured layer of the same role, kernel size and stride. Without a
table for the GPU's architecture every convolution stays on Triton (nothing is guessed), and
``FUSEDRES_CONV_BACKEND=triton|cudnn`` or :func:`force` overrides the table (tests use it to
run the cuDNN route on the CPU, where PyTorch's own convolution stands in for cuDNN).
:func:`table` applies a named architecture's table on any device, so that the mixed routing an
H100/H200 gets by default can be run and checked on the CPU under the interpreter.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from . import bn as bn_ops
from . import conv as conv_ops
from . import hopper as hopper_ops

_TABLES = Path(__file__).resolve().parent / "dispatch"
#: Overrides entered by :func:`force` (a backend) and :func:`table` (an architecture), innermost last.
_OVERRIDES: list[str] = []
ROLES = ("fprop", "dgrad", "wgrad")
BACKENDS = ("triton", "cudnn")
#: The Triton engines: the portable pointer kernels and the sm_90 TMA + wgmma kernels.
ENGINES = ("pointer", "hopper")
#: Overrides entered by :func:`engine`, innermost last.
_ENGINE_OVERRIDES: list[str] = []


@contextlib.contextmanager
def _override(entry: str, engines: bool = False) -> Iterator[None]:
    # the module's lists looked up at entry (tests swap them for empty ones)
    stack = _ENGINE_OVERRIDES if engines else _OVERRIDES
    stack.append(entry)
    try:
        yield
    finally:
        stack.pop()


def force(backend: str) -> contextlib.AbstractContextManager[None]:
    """Route every convolution to ``backend`` ("triton" or "cudnn") inside the block."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'triton' or 'cudnn', got {backend!r}")
    return _override(backend)


def table(arch: str) -> contextlib.AbstractContextManager[None]:
    """Route every convolution by the committed dispatch table of ``arch`` (e.g. "sm_90") inside
    the block, whatever the device, as :func:`choose` would on a GPU of that architecture.

    The innermost :func:`force` or :func:`table` decides (so a test can apply a table inside the
    test suite's ``force("triton")``); both take precedence over ``FUSEDRES_CONV_BACKEND``.
    """
    if not _table(arch):
        have = sorted(p.stem for p in _TABLES.glob("sm_*.json"))
        raise ValueError(f"no dispatch table for {arch!r} in {_TABLES} (have: {', '.join(have) or 'none'})")
    return _override(arch)


def engine(name: str) -> contextlib.AbstractContextManager[None]:
    """Run the Triton convolutions on engine ``name`` inside the block: "pointer" always, "hopper"
    wherever its layout rules hold, on any device (the CPU under the interpreter included). It
    takes precedence over ``FUSEDRES_CONV_ENGINE``; :func:`force` and :func:`table` still decide
    between Triton and cuDNN."""
    if name not in ENGINES:
        raise ValueError(f"engine must be 'pointer' or 'hopper', got {name!r}")
    return _override(name, engines=True)


def _wanted_engine(device: torch.device) -> tuple[str, str | None]:
    """The engine the overrides and ``FUSEDRES_CONV_ENGINE`` ask for on ``device``: ``("hopper",
    None)`` (layout rules still to check) or ``("pointer", reason)``."""
    if _ENGINE_OVERRIDES:
        if _ENGINE_OVERRIDES[-1] == "pointer":
            return "pointer", "engine('pointer') in effect"
        return "hopper", None
    wanted = os.environ.get("FUSEDRES_CONV_ENGINE", "pointer")
    if wanted not in ("pointer", "auto", "hopper"):
        raise ValueError(f"FUSEDRES_CONV_ENGINE must be 'pointer', 'auto' or 'hopper', got {wanted!r}")
    if wanted == "pointer":
        return "pointer", "FUSEDRES_CONV_ENGINE=pointer (the default until a GPU run validates the Hopper engine)"
    if wanted == "auto" and _arch(device) != "sm_90":
        return "pointer", f"device {device} is not an sm_90 GPU ({_arch(device) or 'no CUDA'})"
    return "hopper", None


def fprop_engine(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> tuple[str, str | None]:
    """``("hopper", None)``, or ``("pointer", reason)`` with the reason the Hopper engine does not
    run this forward convolution."""
    wanted, why = _wanted_engine(x.device)
    if wanted == "pointer":
        return wanted, why
    reason = hopper_ops.unsupported(x, weight, stride=stride, padding=padding)
    return ("pointer", reason) if reason else ("hopper", None)


def dgrad_engine(dy: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> tuple[str, str | None]:
    """:func:`fprop_engine` for the input gradient of that convolution (``dy`` the output
    gradient): the Hopper engine's stride-1 dgrad (:func:`fusedres.ops.hopper.unsupported_dgrad`)."""
    wanted, why = _wanted_engine(dy.device)
    if wanted == "pointer":
        return wanted, why
    reason = hopper_ops.unsupported_dgrad(dy, weight, stride=stride, padding=padding)
    return ("pointer", reason) if reason else ("hopper", None)


def wgrad_engine(dy: torch.Tensor, x: torch.Tensor, weight_like: torch.Tensor, stride: int,
                 padding: int) -> tuple[str, str | None]:
    """:func:`fprop_engine` for the weight gradient of that convolution: the Hopper engine's wgrad
    (:func:`fusedres.ops.hopper.unsupported_wgrad`)."""
    wanted, why = _wanted_engine(x.device)
    if wanted == "pointer":
        return wanted, why
    reason = hopper_ops.unsupported_wgrad(dy, x, weight_like, stride=stride, padding=padding)
    return ("pointer", reason) if reason else ("hopper", None)


@functools.cache
def _table(arch: str) -> list[dict]:
    path = _TABLES / f"{arch}.json"
    if not path.exists():
        return []
    return json.loads(path.read_text())["layers"]


def _arch(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def choose(role: str, device: torch.device, cin: int, cout: int, ksize: int, stride: int, pixels: int) -> str:
    """"triton" or "cudnn" for one convolution (see the module docstring)."""
    if _OVERRIDES and _OVERRIDES[-1] in BACKENDS:
        return _OVERRIDES[-1]
    if _OVERRIDES:  # a table applied with table()
        arch: str | None = _OVERRIDES[-1]
    else:
        env = os.environ.get("FUSEDRES_CONV_BACKEND", "auto")
        if env in BACKENDS:
            return env
        arch = _arch(device)
    rows = [r for r in _table(arch) if r["role"] == role and r["ksize"] == ksize] if arch else []
    if not rows:
        return "triton"
    same_stride = [r for r in rows if r["stride"] == stride]
    rows = same_stride or rows

    def distance(r: dict) -> float:
        return (abs(math.log2(r["cin"] / cin)) + abs(math.log2(r["cout"] / cout))
                + 0.5 * abs(math.log2(r["pixels"] / max(pixels, 1))))

    return min(rows, key=distance)["backend"]


def state() -> tuple:
    """Everything a routing decision reads besides the convolution and its device: the overrides
    in effect and the two environment variables (a caller that keeps decisions between calls keys
    them on it, with the tensors' layouts and devices)."""
    env = os.environ
    return (tuple(_OVERRIDES), tuple(_ENGINE_OVERRIDES), env.get("FUSEDRES_CONV_BACKEND"),
            env.get("FUSEDRES_CONV_ENGINE"))


def _pointer(role: str, device: torch.device, cin: int, cout: int, ksize: int, stride: int, pixels: int) -> bool:
    """Whether the convolution runs on the pointer kernels whatever its tensors' addresses: Triton
    chosen and the pointer engine asked for (the Hopper engine's layout rules are not consulted:
    where it is wanted, the decision is made per call)."""
    return choose(role, device, cin, cout, ksize, stride, pixels) == "triton" and _wanted_engine(device)[0] == "pointer"


def fprop_plan(x: torch.Tensor, weight: torch.Tensor, *, stride: int, padding: int,
               scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, stats: bool = False, out_shift: torch.Tensor | None = None,
               out_relu: bool = False, finalize: bn_ops.Finalize | None = None) -> conv_ops._Plan | None:
    """For :func:`conv_fprop`'s arguments: the pointer launcher's plan where the route is the
    pointer kernels by :func:`state` and the shapes alone (pass it to
    :func:`fusedres.ops.conv.conv_fprop` as ``plan``), else None (call :func:`conv_fprop`)."""
    N, C, H, W = x.shape
    K, _, R, _ = weight.shape
    OH = conv_ops.conv_out_size(H, R, stride, padding)
    OW = conv_ops.conv_out_size(W, R, stride, padding)
    if not _pointer("fprop", x.device, C, K, R, stride, N * OH * OW):
        return None
    return conv_ops.fprop_plan(x, weight, stride=stride, padding=padding, scale=scale, residual=residual,
                               stats=stats, out_shift=out_shift, out_relu=out_relu, finalize=finalize)


def dgrad_plan(dy: torch.Tensor, weight: torch.Tensor, input_shape: tuple[int, int, int, int], *, stride: int,
               padding: int, bn: tuple[torch.Tensor, ...] | None = None, add: torch.Tensor | None = None,
               reduce_sums: bool = False) -> conv_ops._Plan | None:
    """:func:`fprop_plan` for :func:`conv_dgrad`."""
    N, C, H, W = input_shape
    K, _, R, _ = weight.shape
    if not _pointer("dgrad", dy.device, C, K, R, stride, N * H * W):
        return None
    return conv_ops.dgrad_plan(dy, weight, input_shape, stride=stride, padding=padding, bn=bn, add=add,
                               reduce_sums=reduce_sums)


def wgrad_plan(dy: torch.Tensor, x: torch.Tensor, weight_like: torch.Tensor, *, stride: int, padding: int,
               scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
               defer_reduce: bool = False) -> conv_ops._Plan | None:
    """:func:`fprop_plan` for :func:`conv_wgrad`."""
    N, C, H, W = x.shape
    K, _, R, _ = weight_like.shape
    _, _, OH, OW = dy.shape
    if not _pointer("wgrad", x.device, C, K, R, stride, N * OH * OW):
        return None
    return conv_ops.wgrad_plan(dy, x, weight_like, stride=stride, padding=padding, scale=scale)


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _conv_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                   mask: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """cuDNN's convolution backward with every operand channels_last (the format it then keeps)."""
    return torch.ops.aten.convolution_backward(_cl(dy), x, weight, None, [stride, stride], [padding, padding],
                                               [1, 1], False, [0, 0], 1, list(mask))


def conv_fprop(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride: int,
    padding: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    stats: bool = False,
    out_shift: torch.Tensor | None = None,
    out_relu: bool = False,
    finalize: bn_ops.Finalize | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, int] | bn_ops.Finalize | None]:
    """:func:`fusedres.ops.conv.conv_fprop` on the chosen engine (on cuDNN's, the statistics pass
    takes ``finalize``)."""
    N, C, H, W = x.shape
    K, _, R, _ = weight.shape
    OH = conv_ops.conv_out_size(H, R, stride, padding)
    OW = conv_ops.conv_out_size(W, R, stride, padding)
    if choose("fprop", x.device, C, K, R, stride, N * OH * OW) == "triton":
        if fprop_engine(x, weight, stride, padding)[0] == "pointer":
            return conv_ops.conv_fprop(x, weight, stride=stride, padding=padding, scale=scale, shift=shift,
                                       residual=residual, stats=stats, out_shift=out_shift, out_relu=out_relu,
                                       finalize=finalize)
        y, partials = hopper_ops.conv_fprop(x, weight, stride=stride, padding=padding, scale=scale, shift=shift,
                                            residual=residual, stats=stats, out_shift=out_shift, out_relu=out_relu,
                                            finalize=finalize)
        if finalize is not None and partials is not None and not isinstance(partials, bn_ops.Finalize):
            # Above TWO_LEVEL_TILES images the Hopper fprop takes no ticket: its per-image
            # partials are finalized by a launch of their own, into the buffers the caller gave.
            f = finalize
            bn_ops.bn_finalize(partials, N * OH * OW, f.weight, f.bias, f.running_mean, f.running_var,
                               training=True, momentum=f.momentum, eps=f.eps, channels=K, device=x.device,
                               out=f.stats, running_out=f.running_out, batches=f.batches)
            partials = f
        return y, partials
    a = bn_ops.bn_relu_apply(x, scale, shift) if scale is not None else _cl(x)
    y = _cl(F.conv2d(a, weight, None, stride, padding))
    if stats and out_shift is None and not out_relu and (residual is None or residual.dtype == y.dtype):
        return y, bn_ops.bn_stats(y, add=residual, finalize=finalize)  # the residual added in the statistics pass
    if residual is not None:
        y.add_(residual)
    if out_shift is not None:
        y.add_(out_shift.to(y.dtype)[:, None, None])
    if out_relu:
        y.relu_()
    return y, (bn_ops.bn_stats(y, finalize=finalize) if stats else None)


def conv_dgrad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    input_shape: tuple[int, int, int, int],
    *,
    stride: int,
    padding: int,
    bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    add: torch.Tensor | None = None,
    reduce_sums: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | bn_ops.Sums | None]:
    """:func:`fusedres.ops.conv.conv_dgrad` on the chosen engine (on cuDNN's, ``reduce_sums`` is
    not done: the partials come back)."""
    N, C, H, W = input_shape
    K, _, R, _ = weight.shape
    if choose("dgrad", dy.device, C, K, R, stride, N * H * W) == "triton":
        if dgrad_engine(dy, weight, stride, padding)[0] == "hopper":
            return hopper_ops.conv_dgrad(dy, weight, input_shape, stride=stride, padding=padding, bn=bn, add=add,
                                         reduce_sums=reduce_sums)
        return conv_ops.conv_dgrad(dy, weight, input_shape, stride=stride, padding=padding, bn=bn, add=add,
                                   reduce_sums=reduce_sums)
    # The input argument only carries the shape and the channels_last format (never read):
    # torch.nn.grad.conv2d_input passes an expanded scalar instead, and cuDNN may then pick NCHW
    # kernels and transpose whole activations around them.
    like = torch.empty(input_shape, device=dy.device, dtype=dy.dtype, memory_format=torch.channels_last)
    da = _cl(_conv_backward(dy, like, _cl(weight), stride, padding, (True, False, False))[0])
    if bn is None:
        if add is not None:
            da.add_(add)
        return da, None
    # the second gradient added and dz written over da in the one pass after cuDNN
    return bn_ops.relu_bn_bwd_partials(da, *bn, add=add, in_place=True)


def conv_wgrad(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight_like: torch.Tensor,
    *,
    stride: int,
    padding: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    defer_reduce: bool = False,
) -> torch.Tensor | conv_ops.PendingWgrad:
    """:func:`fusedres.ops.conv.conv_wgrad` on the chosen engine (on cuDNN's, ``defer_reduce`` has
    nothing to defer: the gradient comes back done)."""
    N, C, H, W = x.shape
    K, _, R, _ = weight_like.shape
    _, _, OH, OW = dy.shape
    if choose("wgrad", x.device, C, K, R, stride, N * OH * OW) == "triton":
        if wgrad_engine(dy, x, weight_like, stride, padding)[0] == "hopper":
            return hopper_ops.conv_wgrad(dy, x, weight_like, stride=stride, padding=padding, scale=scale,
                                         shift=shift, defer_reduce=defer_reduce)
        return conv_ops.conv_wgrad(dy, x, weight_like, stride=stride, padding=padding, scale=scale, shift=shift,
                                   defer_reduce=defer_reduce)
    a = bn_ops.bn_relu_apply(x, scale, shift) if scale is not None else _cl(x)
    dw = _conv_backward(dy, a, _cl(weight_like), stride, padding, (False, True, False))[1]
    if dw.stride() != weight_like.stride():
        dw = torch.empty_like(weight_like).copy_(dw)
    return dw
