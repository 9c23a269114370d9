"""Compile every Triton kernel of fusedres ahead of time, without a GPU, and report its resources.

``python -m fusedres.ops.offline [--arch 80,86,89,90] [--amd] [--json PATH] [--jobs N]
[--sass] [--plain] [--ksize 1|3] [--only REGEX] [--lean] [--layer CIN,COUT,HW]``

For every GPU architecture asked for, this builds each convolution kernel role (fprop, dgrad,
wgrad) for every ``(ConvConfig, dtype)`` of :func:`fusedres.ops.configs.all_conv_configs`
(3x3 kernel, padding 1, stride 1, plus stride 2 for the bf16 fprop/dgrad configs) with the
heaviest fusion on, and the per-channel kernels (BatchNorm statistics, finalize, backward
reduce and apply, wgrad split reduce) for each dtype. Each build prints the shared memory it
needs against the architecture's per-block opt-in maximum, the registers per thread and the
spill traffic, and for CUDA the floating-point max/min instructions of its PTX that drop NaN
(``max.f32`` returns the operand that is not NaN; PyTorch's ``relu`` propagates NaN, as
``max.NaN.f32`` does); a build over the shared-memory limit, one with a NaN-dropping max/min,
or one that does not compile, fails the run (exit status 1). With ``--amd`` the kernels are also
built for gfx942, where a build that does not compile is reported as "skipped" rather than as an
error (the NaN check reads PTX: it is not made for gfx942).

What gets compiled is exactly what the launchers would launch. Each launcher of
:mod:`fusedres.ops.conv` and :mod:`fusedres.ops.bn` is called on empty CPU tensors with the
``launch`` hook swapped for a recorder, and the recorded arguments are specialised the way
Triton's JIT does it at launch time: tensors become typed pointers (16-byte aligned ones
marked as such), an integer equal to 1 becomes a constant, integers divisible by 16 are
marked as such. The tensors are channels_last with 64 channels on a 16x16 image, so every
channel stride is 1 and every other stride and size is a multiple of 16 -- the layout of every
ResNet layer after the stem. That specialisation matters: it is what lets Triton vectorise the
loads and software-pipeline them through shared memory, so an unspecialised build would
understate shared memory several-fold (and overstate registers).

Registers and spills come from the cubin itself (``cuobjdump`` shipped with Triton): the
resource usage gives registers, stack frame and static shared memory; the SASS gives the
bytes of spill stores and loads per thread (the sizes of its STL and LDL instructions, which
is what ``ptxas -v`` reports). For gfx942 they come from the AMDGCN assembly's metadata.

``--sass`` adds, per CUDA build, what the disassembly says about the main loop (the backward
branch around the most matrix instructions): which matrix instruction it issues (``HGMMA`` =
Hopper wgmma, ``HMMA`` = mma.sync) and how many per iteration, how many instructions one
iteration takes per matrix instruction, its CTA barriers, wgmma waits that drain the tensor
cores (``WARPGROUP.DEPBAR.LE gsb0, 0x0``), shared-memory stores of operands, and over the whole
kernel the widths of the global loads (``LDG``) and asynchronous copies (``LDGSTS`` = cp.async)
and the bulk tensor copies (``UTMALDG``). ``--plain`` also builds each conv role with no fusion
(what the layer benchmarks' plain fprop/dgrad rows time), ``--ksize 1`` builds 1x1 convolutions
(padding 0) instead of 3x3, and ``--only`` keeps the builds whose label ("role dtype tile",
e.g. "fprop bfloat16 M128 N64 K64 w8 s3") matches a regular expression.

``--lean`` is the set CI builds (:data:`LEAN_DTYPES`, :data:`LEAN_LARGEST_ONLY`): sm_86 and sm_89
only in bf16 and each pointer conv role in its largest config only, sm_80's fp16 conv roles in
their largest config only, sm_90's pointer kernels without fp16 (the Hopper engine's kernels in
every dtype), gfx942 without fp16 and each pointer conv role in its largest config only (see
:data:`LEAN_LARGEST_ONLY` for why that bounds its shared memory); CI also leaves sm_89 out
(``--arch 80,86,90``). sm_80, sm_86
and sm_89 take the same TritonGPU IR (the mma.sync path, cp.async pipelining), so a config's
shared memory is the same on all three — equal in all 158 builds of each on 2026-12-01 (Triton
3.8), and ``tests/test_offline_compile.py`` checks it again on every sm_86 build — and sm_80's rows
of every config and dtype answer for sm_86/89 against their smaller limit (the same number for
both); fp16 and bf16 have the same configs and element size (shared memory), and fp16 differs
from bf16 only in the conversions and the MMA's type (the test checks that sm_80's fp16 and bf16
builds of a config take the same shared memory). What the lean set does not see: ptxas registers
and spills of fp32/fp16 on sm_86/89, of sm_86's smaller bf16 configs, of sm_80's smaller fp16
configs and of fp16 in sm_90's pointer kernels, sm_89's own builds, gfx942's fp16 builds and
whether its smaller configs compile.

For sm_90 the Hopper engine (:mod:`fusedres.ops.hopper`) is built too: "fprop-hopper" for every
config of :func:`fusedres.ops.configs.all_hopper_configs`, and "dgrad-hopper" (the stride-1
dgrad with the BatchNorm-backward epilogue, the added gradient and the sums' ticket; bf16) for
each layer of :data:`HOPPER_DGRAD_SHAPES` at its own kernel size, whatever ``--ksize`` says; its
label ends in the number of Cout slices and the kernel size ("x2 3x3"); and "wgrad-hopper" (the
BN-ReLU recomputed, the splits merged by the ticket; bf16) for the same layers, labelled with
the taps per program and the kernel size ("t9 3x3"). A tile's register cap ends its label in
"r128" (ptxas ``.maxnreg``). ``--layer 512,512,7`` builds the fprop engine at that one
convolution instead (Cin, Cout, images of 7x7) with each dtype's default tile
(:func:`fusedres.ops.configs.hopper_fprop_config`): fused, with the statistics ticket (bf16),
and plain with ``--plain`` -- the per-shape rows of benchmarks/NOTES.md section 3.

The Triton interpreter (``TRITON_INTERPRET=1``) must be off: under it ``@triton.jit`` gives
functions that cannot be compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import _runtime
from . import bn, conv, hopper
from .configs import (
    TWO_LEVEL_TILES,
    ConvConfig,
    HopperConfig,
    HopperWgradConfig,
    all_conv_configs,
    all_hopper_configs,
    dgrad_config,
    fprop_config,
    hopper_block_k,
    hopper_dgrad_config,
    hopper_fprop_config,
    hopper_wgrad_config,
    wgrad_config,
)

#: Largest shared memory one block may use (the opt-in maximum), in bytes.
SMEM_LIMITS: dict[str, int] = {
    "sm_80": 166912,
    "sm_86": 101376,
    "sm_89": 101376,
    "sm_90": 232448,
    "gfx942": 65536,
}
CUDA_ARCHS = (80, 86, 89, 90)
AMD_ARCH = "gfx942"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# --lean: the dtypes built per architecture (others: all of DTYPES; the sm_90 engine's own kernels
# in all of them); see the module docstring
LEAN_DTYPES = {"sm_86": ("bfloat16",), "sm_89": ("bfloat16",), "sm_90": ("float32", "bfloat16"),
               AMD_ARCH: ("float32", "bfloat16")}
# --lean: where (architecture, dtype) is listed here, each pointer conv role (fprop, dgrad, wgrad,
# per stride) is built in its largest configs only (:func:`largest_conv_configs`). On sm_86/89 and
# in sm_80's fp16 these builds only check a premise against sm_80's bf16 builds of the same
# configs (sm_86/89: the same shared memory as sm_80; sm_80 fp16: the same as bf16), whose limits
# sm_80's own rows of every config are checked against. gfx942's rows are checked against its 64 KB
# only (a build that fails there is "skipped", registers are not checked): a config's shared
# memory there is its pipelined operand buffers (stages x (BM*BK + BK*BN) elements) or the
# epilogue's accumulator exchange (BM*BN), each growing with its measure, and the largest configs
# maximize both — every role's largest shared memory was one of them in all 80 gfx942 builds of
# 2026-12-02 (Triton 3.8; dgrad bf16: 65536 bytes, the limit, at 128x128x64). None: every dtype.
LEAN_LARGEST_ONLY: dict[str, tuple[str, ...] | None] = {"sm_86": None, "sm_89": None, "sm_80": ("float16",),
                                                        AMD_ARCH: None}


def largest_conv_config(role: str, dtype: torch.dtype) -> ConvConfig:
    """Of the configs :func:`fusedres.ops.configs.all_conv_configs` gives ``role`` in ``dtype``, the
    one with the most operand tile per stage times stages (stages x (BM*BK + BK*BN))."""
    configs = [cfg for cfg, dt in all_conv_configs()[role] if dt == dtype]
    return max(configs, key=lambda c: (c.num_stages * (c.block_m * c.block_k + c.block_k * c.block_n),
                                       dataclasses.astuple(c)))


def largest_conv_configs(role: str, dtype: torch.dtype) -> set[ConvConfig]:
    """:func:`largest_conv_config` and the config with the largest accumulator tile (BM*BN; ties
    broken by the operand measure): one config for every role today."""
    configs = [cfg for cfg, dt in all_conv_configs()[role] if dt == dtype]
    widest = max(configs, key=lambda c: (c.block_m * c.block_n, c.num_stages * (c.block_m * c.block_k +
                                                                                  c.block_k * c.block_n),
                                         dataclasses.astuple(c)))
    return {largest_conv_config(role, dtype), widest}


def in_lean_set(role: str, cfg: ConvConfig, dtype: torch.dtype, arch: str) -> bool:
    """Whether ``--lean`` builds pointer conv ``role`` in ``cfg`` and ``dtype`` for ``arch``."""
    name = str(dtype).removeprefix("torch.")
    if name not in LEAN_DTYPES.get(arch, (name,)):
        return False
    if arch in LEAN_LARGEST_ONLY:
        only = LEAN_LARGEST_ONLY[arch]
        if only is None or name in only:
            return cfg in largest_conv_configs(role, dtype)
    return True
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.int64: "i64"}
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

# The representative launch: channels_last, every channel stride 1, every other stride and size
# a multiple of 16 (see the module docstring). The weight gradient is split in _SPLITS parts as
# on a GPU (splits = 1 would turn the reduce kernel's loop count into a constant).
_N, _C, _HW, _SPLITS = 2, 64, 16, 4


class InterpreterActiveError(RuntimeError):
    """Raised when the Triton interpreter is on, so that nothing can be compiled."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One kernel build: what to compile, for which architecture, and how to label it."""

    kernel: str  # "module:name" of the @triton.jit function
    role: str  # "fprop", "dgrad", "wgrad", or the kernel's name for the per-channel kernels
    dtype: str  # torch dtype name of the activations ("bfloat16", ...)
    config: dict[str, int] | None  # the ConvConfig of a conv role, as a dict
    stride: int | None  # the conv stride of a conv role
    tile: str  # block sizes, warps and stages, for printing
    arch: str  # "sm_90", "gfx942", ...
    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[tuple[int, ...], list[list[Any]]]
    options: dict[str, int]


@dataclasses.dataclass
class Row:
    """The outcome of one build. Byte counts; registers, spills and local memory are per thread."""

    kernel: str
    role: str
    dtype: str
    config: dict[str, int] | None
    stride: int | None
    tile: str
    arch: str
    limit: int
    status: str  # "ok", "FAIL" (over the shared-memory limit), "ERROR" (no build) or "skipped" (AMD, no build)
    shared: int | None = None  # dynamic shared memory Triton requests at launch
    static_shared: int | None = None
    regs: int | None = None  # NVIDIA: registers; AMD: VGPRs
    spill_stores: int | None = None  # NVIDIA only
    spill_loads: int | None = None  # NVIDIA only
    local: int | None = None  # stack frame (NVIDIA) or scratch (AMD)
    seconds: float = 0.0  # build and measurement time (near 0 when Triton's cache had the build)
    error: str | None = None
    sass: dict[str, Any] | None = None  # --sass: see sass_profile
    # NVIDIA only: floating-point max/min instructions in the PTX that return the other operand
    # for a NaN (see nan_dropping_ops); PyTorch propagates NaN, so any is an error
    nan_dropping: int | None = None
    nan_dropping_ops: dict[str, int] | None = None
    # NVIDIA only: how the PTX orders an atomic ticket (see ticket_ordering), None without one
    ticket: dict[str, int] | None = None


# --------------------------------------------------------------------------- what to compile


@contextlib.contextmanager
def _recorded_launches() -> Iterator[list[tuple[Any, tuple[Any, ...], dict[str, Any]]]]:
    """Inside the block the launchers record ``(kernel, args, kwargs)`` instead of launching."""
    calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def record(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        calls.append((kernel, args, kwargs))

    with contextlib.ExitStack() as stack:
        for module in (_runtime, conv, bn, hopper):
            stack.enter_context(mock.patch.object(module, "launch", record))
        yield calls


def _act(c: int, hw: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty((_N, c, hw, hw), dtype=dtype).to(memory_format=torch.channels_last)


def _vec(channels: int = _C) -> torch.Tensor:
    return torch.empty(channels, dtype=torch.float32)


def _conv_launchers(
    dtype: torch.dtype, cfg: ConvConfig, stride: int, ksize: int = 3, fused: bool = True
) -> dict[str, Callable[[], object]]:
    """Per conv role, a call of its launcher with every fusion on (or, with ``fused=False``, none)."""
    pad = ksize // 2
    ohw = conv.conv_out_size(_HW, ksize, stride, pad)
    x, dy, res = _act(_C, _HW, dtype), _act(_C, ohw, dtype), _act(_C, ohw, dtype)
    res_in = _act(_C, _HW, dtype)  # the projection shortcut's gradient, added in dgrad's epilogue
    w = torch.empty((_C, _C, ksize, ksize), dtype=dtype).to(memory_format=torch.channels_last)
    scale, shift, mean, invstd = _vec(), _vec(), _vec(), _vec()
    geom: dict[str, Any] = {"stride": stride, "padding": pad, "config": cfg}
    if not fused:
        return {
            "fprop": lambda: conv.conv_fprop(x, w, **geom),
            "dgrad": lambda: conv.conv_dgrad(dy, w, tuple(x.shape), **geom),
            "wgrad": lambda: conv.conv_wgrad(dy, x, w, splits=_SPLITS, **geom),
        }
    return {
        "fprop": lambda: conv.conv_fprop(
            x, w, scale=scale, shift=shift, residual=res, stats=True, out_shift=mean, out_relu=True, **geom
        ),
        "dgrad": lambda: conv.conv_dgrad(
            dy, w, tuple(x.shape), bn=(x, scale, shift, mean, invstd), add=res_in, **geom
        ),
        "wgrad": lambda: conv.conv_wgrad(dy, x, w, scale=scale, shift=shift, splits=_SPLITS, **geom),
    }


def _hopper_launchers(
    dtype: torch.dtype, cfg: HopperConfig, stride: int, ksize: int = 3, fused: bool = True, slices: int = 1,
    ticket: bool = False, layer: tuple[int, int, int] | None = None,
) -> dict[str, Callable[[], object]]:
    """The sm_90 engine's fprop called like :func:`_conv_launchers`' ("fprop-hopper"), with
    ``slices`` channel slices of the config's block_k in the input (the kernel is built per
    count: one slice loads the prologue's vectors once, more load them per tap and slice); with
    ``ticket``, fused, its statistics finalized by the launch's last programs. ``layer`` =
    (Cin, Cout, H=W): that convolution instead of ``slices`` slices into _C channels on _HW²
    images (an image of one rectangle specializes its tile counts to the constant 1)."""
    cin, cout, hw = layer or (slices * cfg.block_k, _C, _HW)
    pad = 0 if stride > 1 else ksize // 2  # its strided convolutions: 1x1 without padding
    ohw = conv.conv_out_size(hw, ksize, stride, pad)
    x, res = _act(cin, hw, dtype), _act(cout, ohw, dtype)
    w = torch.empty((cout, cin, ksize, ksize), dtype=dtype).to(memory_format=torch.channels_last)
    geom: dict[str, Any] = {"stride": stride, "padding": pad, "config": cfg}
    if not fused:
        return {"fprop-hopper": lambda: hopper.conv_fprop(x, w, **geom)}
    return {
        "fprop-hopper": lambda: hopper.conv_fprop(
            x, w, scale=_vec(cin), shift=_vec(cin), residual=res, stats=True, out_shift=_vec(cout), out_relu=True,
            finalize=_finalize(dtype, cout) if ticket else None, **geom
        ),
    }


#: The sm_90 dgrad's builds (role "dgrad-hopper", sm_90 only, bf16): (Cin, Cout, ksize) of the
#: DESIGN section 5 layers (3x3 64, 128 and 512 channels) and of the three convolutions of a CIFAR
#: bottleneck (1x1 64->16, 3x3 16->16, 1x1 16->64), each with its default tile
#: (:func:`fusedres.ops.configs.hopper_dgrad_config`).
HOPPER_DGRAD_SHAPES = ((64, 64, 3), (128, 128, 3), (512, 512, 3), (64, 16, 1), (16, 16, 3), (16, 64, 1))

#: sm_90 fprop layers whose default tile only a 1x1 takes (``hopper_fprop_config``'s one-K-step
#: rule), which :func:`fusedres.ops.configs.all_hopper_configs` (3x3) does not list: built at
#: their own kernel size in fp16 and bf16, and bf16 with the statistics ticket.
HOPPER_FPROP_1X1_SHAPES = ((32, 128, 1),)


def _hopper_dgrad_launcher(
    dtype: torch.dtype, cin: int, cout: int, ksize: int, fused: bool = True
) -> tuple[HopperConfig, Callable[[], object]]:
    """The stride-1 Hopper dgrad of a (cin -> cout, ksize) convolution with its default tile: with
    ``fused``, as a training step's backward runs it (BatchNorm-ReLU backward, the sums reduced
    by the launch's ticket) plus the projection's added gradient; else plain."""
    cfg = hopper_dgrad_config(cin, cout, ksize, 1, dtype)
    pad = ksize // 2
    x, dy = _act(cin, _HW, dtype), _act(cout, _HW, dtype)
    w = torch.empty((cout, cin, ksize, ksize), dtype=dtype).to(memory_format=torch.channels_last)
    vec = lambda: torch.empty(cin, dtype=torch.float32)  # noqa: E731
    geom: dict[str, Any] = {"stride": 1, "padding": pad, "config": cfg}
    if not fused:
        return cfg, lambda: hopper.conv_dgrad(dy, w, tuple(x.shape), **geom)
    return cfg, lambda: hopper.conv_dgrad(dy, w, tuple(x.shape), bn=(x, vec(), vec(), vec(), vec()),
                                          add=_act(cin, _HW, dtype), reduce_sums=True, **geom)


def _hopper_wgrad_launcher(
    dtype: torch.dtype, cin: int, cout: int, ksize: int
) -> tuple[HopperWgradConfig, Callable[[], object]]:
    """The Hopper wgrad of a (cin -> cout, ksize) convolution (stride 1) with its default tile, as a
    training step's backward runs it: the BN-ReLU recomputed, the splits merged by the ticket."""
    cfg = hopper_wgrad_config(cin, cout, ksize, 1, dtype)
    x, dy = _act(cin, _HW, dtype), _act(cout, _HW, dtype)
    w = torch.empty((cout, cin, ksize, ksize), dtype=dtype).to(memory_format=torch.channels_last)
    vec = lambda: torch.empty(cin, dtype=torch.float32)  # noqa: E731
    # One split: it loops over all the image's rectangles (4 of them at 1x1's 8x16 box). With a
    # split per rectangle the count would be 1, which Triton specializes as a constant: the loop
    # over rectangles would vanish from the build, and what the SASS profile reads with it.
    return cfg, lambda: hopper.conv_wgrad(dy, x, w, stride=1, padding=ksize // 2, scale=vec(), shift=vec(),
                                          splits=1, config=cfg)


#: The 16- and 32-channel convolutions of the CIFAR bottlenecks, (Cin, Cout, ksize): the layers of
#: issue #12's criterion "main-loop instructions per output element at most half of today's".
NARROW_SHAPES = ((64, 16, 1), (16, 16, 3), (16, 64, 1), (128, 32, 1), (32, 32, 3), (32, 128, 1))


@dataclasses.dataclass(frozen=True)
class ElementJob:
    """One build of :func:`element_jobs`: a conv role of one layer on one engine, and what one
    program's main loop covers. ``elements`` output elements per program over ``iterations``
    loop iterations (fprop: output pixels x real Cout; dgrad: input pixels x real Cin; wgrad:
    output pixels x real Cout in units of Cin*R*S multiply-adds, per loop iteration:
    ``iterations`` is 1 and the pixel loop's length, a split's, is left out)."""

    shape: tuple[int, int, int]
    role: str  # "fprop", "dgrad", "wgrad"
    engine: str  # "pointer" (fusedres.ops.conv) or "hopper"
    elements: float
    iterations: int
    threads: int
    job: Job


def _element_call(role: str, engine: str, cin: int, cout: int, k: int) -> tuple[Any, Callable[[], object]]:
    """A launch of ``role`` on ``engine`` for a (cin -> cout, k x k) convolution, stride 1, bf16, the
    default tile, with the fusions a training step runs (fprop: BN-ReLU prologue, residual,
    statistics, out_shift, ReLU; dgrad: BN-ReLU backward and the added gradient, its partial sums
    not reduced in the launch, whose last-program reduction would swamp a static count; wgrad:
    BN-ReLU recomputed, splits merged by the ticket)."""
    dtype, pad = torch.bfloat16, k // 2
    x, out = _act(cin, _HW, dtype), _act(cout, _HW, dtype)
    w = torch.empty((cout, cin, k, k), dtype=dtype).to(memory_format=torch.channels_last)

    def vec(c: int) -> torch.Tensor:
        return torch.empty(c, dtype=torch.float32)

    mod = hopper if engine == "hopper" else conv
    if role == "fprop":
        cfg = (hopper_fprop_config if engine == "hopper" else fprop_config)(cin, cout, k, 1, dtype)
        return cfg, lambda: mod.conv_fprop(x, w, stride=1, padding=pad, scale=vec(cin), shift=vec(cin), residual=out,
                                           stats=True, out_shift=vec(cout), out_relu=True, config=cfg)
    if role == "dgrad":
        cfg = (hopper_dgrad_config if engine == "hopper" else dgrad_config)(cin, cout, k, 1, dtype)
        bn_args = (x, vec(cin), vec(cin), vec(cin), vec(cin))
        return cfg, lambda: mod.conv_dgrad(out, w, tuple(x.shape), stride=1, padding=pad, bn=bn_args,
                                           add=_act(cin, _HW, dtype), config=cfg)
    if engine == "hopper":
        return _hopper_wgrad_launcher(dtype, cin, cout, k)
    cfg = wgrad_config(cin, cout, k, 1, dtype)
    return cfg, lambda: conv.conv_wgrad(out, x, w, stride=1, padding=pad, scale=vec(cin), shift=vec(cin),
                                        splits=_SPLITS, config=cfg)


def _element_counts(role: str, cfg: Any, cin: int, cout: int, k: int) -> tuple[float, int]:
    """(output elements, loop iterations) of one program of ``cfg`` (see :class:`ElementJob`)."""
    if isinstance(cfg, HopperWgradConfig):
        macs = cfg.block_h * cfg.block_w * cfg.taps * min(cfg.block_m, cout) * min(cfg.block_n, cin)
        return macs / (cin * k * k), 1
    if isinstance(cfg, HopperConfig):
        pixels_, rows = cfg.block_h * cfg.block_w, cfg.block_n
    else:
        pixels_, rows = cfg.block_m, cfg.block_n
    if role == "wgrad":  # the pointer wgrad: Cout (block_m) x Cin (block_n) of one tap over block_k pixels
        return cfg.block_k * min(cfg.block_m, cout) * min(cfg.block_n, cin) / (cin * k * k), 1
    real, reduced = (cout, cin) if role == "fprop" else (cin, cout)
    return pixels_ * min(rows, real), k * k * -(-reduced // cfg.block_k)


def element_jobs(shapes: tuple[tuple[int, int, int], ...] = NARROW_SHAPES,
                 roles: tuple[str, ...] = ("fprop", "dgrad", "wgrad")) -> list[ElementJob]:
    """The sm_90 builds behind ``--per-element``: each role of each layer of ``shapes`` on both
    engines (the pointer kernels of :mod:`fusedres.ops.conv` and the TMA + wgmma engine)."""
    out = []
    for (cin, cout, k), role, engine in itertools.product(shapes, roles, ("pointer", "hopper")):
        cfg, call = _element_call(role, engine, cin, cout, k)
        with _recorded_launches() as calls:
            call()
        kernel, args, kwargs = calls[0]
        sig, constexprs, attrs, options = _specialize(kernel, args, kwargs, _target("sm_90"))
        job = Job(kernel=f"{kernel.fn.__module__}:{kernel.fn.__name__}", role=f"{role}-{engine}", dtype="bfloat16",
                  config=dataclasses.asdict(cfg), stride=1, tile=_tile(constexprs, options), arch="sm_90",
                  signature=sig, constexprs=constexprs, attrs=attrs, options=options)
        elements, iterations = _element_counts(role, cfg, cin, cout, k)
        out.append(ElementJob((cin, cout, k), role, engine, elements, iterations, 32 * options["num_warps"], job))
    return out


def per_element(ej: ElementJob, row: Row) -> dict[str, Any]:
    """Instructions per output element of one build: ``loop`` = the main loop's (static count per
    iteration x threads x iterations / elements; None without a loop), ``kernel`` = the whole
    kernel's, the loop counted ``iterations`` times and everything else once (static: branches
    not taken count too; None for wgrad, whose loop length is a split's), ``mainloop`` = the same up
    to the last matrix instruction (the kernel without its epilogue: what stands for the main loop
    of a kernel with one K step and no loop)."""
    p = row.sass or {}
    loop = p.get("loop_insns", 0) if p.get("mma_per_iter") else 0
    scale = ej.threads / ej.elements
    kernel = mainloop = None
    if ej.role != "wgrad":
        kernel = round((p["kernel_insns"] + (ej.iterations - 1) * loop) * scale, 1)
        mainloop = round((p["to_last_mma"] + (ej.iterations - 1) * loop) * scale, 1)
    return {"mma": p.get("mma"), "loop": round(loop * ej.iterations * scale, 1) if loop else None, "kernel": kernel,
            "mainloop": mainloop, "loop_insns": loop, "kernel_insns": p.get("kernel_insns"), "regs": row.regs,
            "spill": row.spill_stores}


def run_per_element(jobs: int, only: str | None = None) -> list[tuple[ElementJob, Row]]:
    """Build :func:`element_jobs` (those whose "role-engine CinxCout kxk" label matches ``only``) and
    print one line per build: the matrix instruction and instructions per output element."""
    planned = [ej for ej in element_jobs()
               if only is None or re.search(only, f"{ej.role}-{ej.engine} {ej.shape[0]}x{ej.shape[1]} "
                                                  f"{ej.shape[2]}x{ej.shape[2]}")]
    out = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for ej, row in zip(planned, pool.map(functools.partial(compile_job, sass=True), [e.job for e in planned])):
            cin, cout, k = ej.shape
            if row.status != "ok":
                print(f"{k}x{k} {cin}->{cout} {ej.role}-{ej.engine}: {row.status} {row.error or ''}", flush=True)
            else:
                m = per_element(ej, row)
                print(f"{k}x{k} {cin}->{cout:<4} {ej.role:<5} {ej.engine:<7} {row.tile:<28} {m['mma']:<26} "
                      f"loop {m['loop_insns']:>4} x{ej.iterations} -> {m['loop']} /elem, kernel {m['kernel_insns']} "
                      f"-> {m['kernel']} /elem, to last mma {m['mainloop']} /elem, regs {m['regs']}, "
                      f"spill {m['spill']}, smem {row.shared}", flush=True)
            out.append((ej, row))
    return out


_TWO_LEVEL_ROWS = 128 * (TWO_LEVEL_TILES + 1)


def _finalize(dtype: torch.dtype, channels: int = _C) -> bn.Finalize:
    """What a producer that finalizes the next BatchNorm's statistics is given."""
    weight, bias, rmean, rvar = (torch.empty(channels, dtype=dtype) for _ in range(4))
    return bn.Finalize(torch.empty((4, channels)), weight, bias, rmean, rvar, None, 0.1, 1e-5)


def _ticket_launchers(dtype: torch.dtype, cfg: ConvConfig, ksize: int = 3) -> dict[str, Callable[[], object]]:
    """fprop and dgrad with every fusion and their reductions done by the launch's last programs
    (the atomic ticket of :func:`fusedres.ops.bn.stats_ticket` / ``sums_ticket``); wgrad's ticket
    (the split merge) is in its ordinary build."""
    pad = ksize // 2
    x, res = _act(_C, _HW, dtype), _act(_C, _HW, dtype)
    w = torch.empty((_C, _C, ksize, ksize), dtype=dtype).to(memory_format=torch.channels_last)
    scale, shift, mean, invstd = _vec(), _vec(), _vec(), _vec()
    geom: dict[str, Any] = {"stride": 1, "padding": pad, "config": cfg}
    return {
        "fprop-ticket": lambda: conv.conv_fprop(x, w, scale=scale, shift=shift, residual=res, stats=True,
                                                finalize=_finalize(dtype), **geom),
        "dgrad-ticket": lambda: conv.conv_dgrad(x, w, tuple(x.shape), bn=(x, scale, shift, mean, invstd),
                                                add=res, reduce_sums=True, **geom),
    }


#: (Cin, Cout, k, stride) of the convolutions whose backward pair :func:`_bwd_launchers` builds as
#: one :func:`fusedres.ops.conv.conv_bwd_kernel`: the CIFAR bottleneck and basic-block layers and
#: the §5 widths (where the two configs' warps differ, no merged kernel exists).
BWD_SHAPES = ((16, 16, 3, 1), (16, 64, 1, 1), (64, 16, 1, 1), (32, 32, 3, 2), (32, 32, 3, 1), (128, 32, 1, 1),
              (32, 128, 1, 1), (64, 64, 3, 1), (128, 128, 3, 2), (256, 256, 3, 1), (512, 512, 3, 1))


def _bwd_launchers(dtype: torch.dtype) -> list[tuple[ConvConfig, int, Callable[[], object]]]:
    """(dgrad config, stride, call) of each merged backward of :data:`BWD_SHAPES` in ``dtype``:
    the dgrad with its BatchNorm epilogue and ticket, the wgrad recomputing the activation."""
    out = []
    for cin, cout, k, stride in BWD_SHAPES:
        pad = k // 2
        x = _act(cin, _HW, dtype)
        dy = _act(cout, conv.conv_out_size(_HW, k, stride, pad), dtype)
        w = torch.empty((cout, cin, k, k), dtype=dtype).to(memory_format=torch.channels_last)
        scale, shift, mean, invstd = _vec(cin), _vec(cin), _vec(cin), _vec(cin)
        bn_args = (x, scale, shift, mean, invstd)
        dplan = conv.dgrad_plan(dy, w, tuple(x.shape), stride=stride, padding=pad, bn=bn_args, reduce_sums=True)
        wplan = conv.wgrad_plan(dy, x, w, stride=stride, padding=pad, scale=scale)
        plan = conv.bwd_plan(dplan, wplan, x.device)
        if plan is None:
            continue
        cfg = dgrad_config(cin, cout, k, stride, dtype)
        out.append((cfg, stride, functools.partial(conv.conv_bwd, plan, dy, w, bn=bn_args, add=None, x=x,
                                                   weight_like=w, scale=scale, shift=shift)))
    return out


def _bn_ticket_launchers(dtype: torch.dtype) -> list[Callable[[], object]]:
    """The statistics pass finalizing in its last programs, with one and two merge levels."""
    big = torch.empty((_N, _C, 2 * _TWO_LEVEL_ROWS // (_N * _HW), _HW), dtype=dtype)
    big = big.to(memory_format=torch.channels_last)  # more tiles than TWO_LEVEL_TILES
    return [
        lambda: bn.bn_stats(_act(_C, _HW, dtype), finalize=_finalize(dtype)),
        lambda: bn.bn_stats(big, finalize=_finalize(dtype)),
    ]


def _bn_launchers(dtype: torch.dtype) -> list[Callable[[], object]]:
    """Calls of the per-channel launchers with every option on; BN parameters in ``dtype``."""
    x, dz, add = _act(_C, _HW, dtype), _act(_C, _HW, dtype), _act(_C, _HW, dtype)
    tiles = _N * _HW * _HW // 128
    partials = (torch.empty((tiles, _C)), torch.empty((tiles, _C)), 128)
    weight, bias, rmean, rvar = (torch.empty(_C, dtype=dtype) for _ in range(4))
    mean, invstd, s, sx = _vec(), _vec(), _vec(), _vec()
    big = torch.empty((2 * _TWO_LEVEL_ROWS // 128, _C))  # more tiles than TWO_LEVEL_TILES
    return [
        lambda: bn.bn_stats(x),
        lambda: bn.bn_stats(x, add=add),
        lambda: bn.bn_finalize(
            partials,
            _N * _HW * _HW,
            weight,
            bias,
            rmean,
            rvar,
            training=True,
            momentum=0.1,
            eps=1e-5,
            channels=_C,
            device=x.device,
        ),
        lambda: bn.bn_bwd_reduce(partials[0], partials[1]),
        lambda: bn.bn_bwd_apply(dz, x, mean, invstd, weight, s, sx, training=True, add=add),
        lambda: bn.bn_relu_pool(x, mean, invstd),
        lambda: bn.bn_add_relu(x, add, mean, invstd, s, sx),
        lambda: bn.bn_add_relu_bwd(dz, x, add, mean, invstd, s, sx, (mean, invstd, s, sx)),
        lambda: bn.bn_relu_pool_bwd(torch.empty((_N, _C), dtype=dtype), x, s, sx, mean, invstd),
        lambda: bn.bn_finalize(  # many tiles: the two-level merge
            (big, big, 128), 2 * _TWO_LEVEL_ROWS, weight, bias, rmean, rvar, training=True, momentum=0.1, eps=1e-5,
            channels=_C, device=x.device,
        ),
        lambda: bn.bn_bwd_reduce(big, big),
        lambda: bn.bn_relu_apply(x, mean, invstd),  # the cuDNN route's elementwise passes
        lambda: bn.relu_bn_bwd_partials(dz, x, mean, invstd, s, sx),
        lambda: bn.relu_bn_bwd_partials(dz, x, mean, invstd, s, sx, add=add, in_place=True),
        # a stage's weight-gradient split sums and backward sums in one launch
        lambda: conv.reduce_wgrad_and_bn_sums(_pending_wgrad(dtype), partials[0], partials[1]),
        # the two-launch path (SyncBatchNorm, and the reference of the ticket): the weight
        # gradient's splits merged by their own kernel
        lambda: _two_launch_wgrad(dtype),
    ]


def _two_launch_wgrad(dtype: torch.dtype) -> None:
    x = _act(_C, _HW, dtype)
    w = torch.empty((_C, _C, 3, 3), dtype=dtype).to(memory_format=torch.channels_last)
    with bn.producer_reductions(False):
        conv.conv_wgrad(x, x, w, stride=1, padding=1, splits=_SPLITS)


def _pending_wgrad(dtype: torch.dtype) -> conv.PendingWgrad:
    """A 3x3 _C->_C weight gradient of two splits, not reduced yet."""
    return conv.PendingWgrad(torch.empty((2, _C, 3, 3, _C)), torch.empty((_C, _C, 3, 3), dtype=dtype), 2, 3)


def _specialize(
    kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any], target: GPUTarget
) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], list[list[Any]]], dict[str, int]]:
    """Signature, constants, attributes and options of a launch, as Triton's JIT would derive them."""
    backend = make_backend(target)
    values = dict(zip(kernel.arg_names, args))
    values.update((k, v) for k, v in kwargs.items() if k in kernel.arg_names)
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr or (type(value) is int and value == 1):
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        if isinstance(value, TensorDescriptor):
            signature[param.name] = mangle_type(value)  # "tensordesc<bf16[1, 8, 16, 64]>", as the JIT names it
            continue
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TRITON_TYPES[value.dtype]
            desc = backend.get_tensor_specialization(value, align=True)
        elif type(value) is int:
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            desc = backend.get_int_specialization(value, align=True)
        elif type(value) is float:
            signature[param.name] = "fp32"
            desc = ""
        else:
            raise TypeError(f"{kernel.fn.__name__}: no Triton type for argument {param.name}={value!r}")
        if desc:
            attrs[(i,)] = backend.parse_attr(desc)
    return signature, constexprs, attrs, options


def _tile(constexprs: dict[str, Any], options: dict[str, int]) -> str:
    """Block sizes and the launch options given, e.g. "M128 N64 K32 w4 s3" (BLOCK_M=128, ...); "x2" is
    a Hopper fprop over two channel slices."""
    blocks = [f"{k[len('BLOCK') :].lstrip('_') or 'B'}{v}" for k, v in constexprs.items() if k.startswith("BLOCK")]
    given = [f"{k[len('num_') :][0]}{v}" for k, v in options.items() if k in ("num_warps", "num_stages")]
    given += [f"r{options['maxnreg']}" for _ in range("maxnreg" in options)]  # a Hopper tile's register cap
    slices = [f"x{constexprs['NUM_C']}" for _ in range("NUM_C" in constexprs)]  # the Hopper fprop's channel slices
    if "NUM_K" in constexprs:  # the Hopper dgrad: its Cout slices and kernel size
        slices = [f"x{constexprs['NUM_K']} {constexprs['R']}x{constexprs['S']}"]
    if "TAPS" in constexprs:  # the Hopper wgrad: taps per program and kernel size
        slices = [f"t{constexprs['TAPS']} {constexprs['R']}x{constexprs['S']}"]
    return " ".join(blocks + slices + given)


def _target(arch: str) -> GPUTarget:
    if arch.startswith("sm_"):
        return GPUTarget("cuda", int(arch[3:]), 32)
    return GPUTarget("hip", arch, 64)


def plan_jobs(
    archs: list[str], *, plain: bool = False, ksize: int = 3, only: str | None = None, lean: bool = False,
    layer: tuple[int, int, int] | None = None,
) -> list[Job]:
    """Every build, for each of ``archs`` ("sm_90", "gfx942", ...), without duplicates.

    ``plain`` adds the conv roles without fusion (labelled "fprop-plain", ...); ``ksize`` is the
    conv kernel size (padding ksize // 2); ``only`` keeps the builds whose "role dtype tile"
    label matches this regular expression; ``lean`` builds only :data:`LEAN_DTYPES` where it
    names the architecture; ``layer`` = (Cin, Cout, H=W) builds the sm_90 fprop engine at that
    convolution (stride 1) with its default tile per dtype instead of every Hopper config.
    """
    if _runtime.INTERPRET:
        raise InterpreterActiveError(
            "fusedres.ops.offline: TRITON_INTERPRET=1 is set, so @triton.jit gives interpreter "
            "functions that cannot be compiled. Run it again with TRITON_INTERPRET unset."
        )
    # (conv role, dtype, config, stride, launcher call); the per-channel kernels are named after themselves.
    launches: list[
        tuple[
            str | None, torch.dtype, ConvConfig | HopperConfig | HopperWgradConfig | None, int | None,
            Callable[[], object],
        ]
    ] = []
    # Builds made for sm_90 only: the Hopper engine (it runs nowhere else), and the launches whose
    # reductions take the atomic ticket (same kernels as the ordinary builds plus the ticket
    # epilogue: one architecture shows its registers, spills and PTX at a fraction of the time).
    sm90_only: set[int] = set()
    for role, items in sorted(all_conv_configs().items()):
        for cfg, dtype in sorted(items, key=lambda item: (str(item[1]), dataclasses.astuple(item[0]))):
            strides = (1, 2) if dtype == torch.bfloat16 and role in ("fprop", "dgrad") else (1,)
            for stride in strides:
                launches.append((role, dtype, cfg, stride, _conv_launchers(dtype, cfg, stride, ksize)[role]))
                if plain:
                    call = _conv_launchers(dtype, cfg, stride, ksize, fused=False)[role]
                    launches.append((f"{role}-plain", dtype, cfg, stride, call))
    if "sm_90" in archs:
        for role, items in sorted(all_conv_configs().items()):
            for cfg, dtype in sorted(items, key=lambda item: (str(item[1]), dataclasses.astuple(item[0]))):
                if role in ("fprop", "dgrad"):
                    sm90_only.add(len(launches))
                    call = _ticket_launchers(dtype, cfg, ksize)[f"{role}-ticket"]
                    launches.append((f"{role}-ticket", dtype, cfg, 1, call))
        for dtype in DTYPES:
            for call in _bn_ticket_launchers(dtype):
                sm90_only.add(len(launches))
                launches.append((None, dtype, None, None, call))
            for cfg, stride, call in _bwd_launchers(dtype):  # the two roles' bodies, built apart everywhere
                sm90_only.add(len(launches))
                launches.append(("bwd", dtype, cfg, stride, call))
    if "sm_90" in archs and layer is not None:  # one layer's fprop, each dtype's default tile
        cin, cout, _ = layer
        for dtype in DTYPES:
            if not hopper_block_k(cin, dtype):
                continue
            cfg = hopper_fprop_config(cin, cout, ksize, 1, dtype)
            for fused in (True, False) if plain else (True,):
                call = _hopper_launchers(dtype, cfg, 1, ksize, fused, layer=layer)["fprop-hopper"]
                launches.append(("fprop-hopper" if fused else "fprop-hopper-plain", dtype, cfg, 1, call))
            if dtype == torch.bfloat16:
                call = _hopper_launchers(dtype, cfg, 1, ksize, True, ticket=True, layer=layer)["fprop-hopper"]
                launches.append(("fprop-hopper-ticket", dtype, cfg, 1, call))
    elif "sm_90" in archs:  # the TMA + wgmma engine exists for sm_90 only
        for cfg, dtype in sorted(all_hopper_configs(), key=lambda item: (str(item[1]), dataclasses.astuple(item[0]))):
            strides = (1, 2) if ksize == 1 and dtype == torch.bfloat16 else (1,)
            for stride, slices in itertools.product(strides, (1, 2)):
                for fused in (True, False) if plain else (True,):
                    role = "fprop-hopper" if fused else "fprop-hopper-plain"
                    call = _hopper_launchers(dtype, cfg, stride, ksize, fused, slices)["fprop-hopper"]
                    launches.append((role, dtype, cfg, stride, call))
            if dtype == torch.bfloat16:  # with the statistics finalized by the launch (one dtype)
                call = _hopper_launchers(dtype, cfg, 1, ksize, True, 1, ticket=True)["fprop-hopper"]
                launches.append(("fprop-hopper-ticket", dtype, cfg, 1, call))
        for cin, cout, k in HOPPER_FPROP_1X1_SHAPES:
            for dtype in (torch.float16, torch.bfloat16):
                cfg = hopper_fprop_config(cin, cout, k, 1, dtype)
                launches.append(("fprop-hopper", dtype, cfg, 1,
                                 _hopper_launchers(dtype, cfg, 1, k, True, layer=(cin, cout, _HW))["fprop-hopper"]))
            cfg = hopper_fprop_config(cin, cout, k, 1, torch.bfloat16)
            launches.append(("fprop-hopper-ticket", torch.bfloat16, cfg, 1, _hopper_launchers(
                torch.bfloat16, cfg, 1, k, True, ticket=True, layer=(cin, cout, _HW))["fprop-hopper"]))
        for cin, cout, k in HOPPER_DGRAD_SHAPES:
            for fused in (True, False) if plain else (True,):
                cfg, call = _hopper_dgrad_launcher(torch.bfloat16, cin, cout, k, fused)
                launches.append(("dgrad-hopper" if fused else "dgrad-hopper-plain", torch.bfloat16, cfg, 1, call))
        for cin, cout, k in HOPPER_DGRAD_SHAPES:
            wcfg, call = _hopper_wgrad_launcher(torch.bfloat16, cin, cout, k)
            launches.append(("wgrad-hopper", torch.bfloat16, wcfg, 1, call))
    for dtype in DTYPES:
        launches.extend((None, dtype, None, None, call) for call in _bn_launchers(dtype))

    jobs: list[Job] = []
    seen: set[str] = set()
    for index, (role, dtype, cfg, stride, call) in enumerate(launches):
        with _recorded_launches() as calls:
            call()
        for n, (kernel, args, kwargs) in enumerate(calls):
            # The first launch is the role's own kernel; later ones (wgrad's split reduce) are helpers.
            own = n == 0 and role is not None
            for arch in archs:
                sm90_kernel = kernel in (hopper.hopper_fprop_kernel, hopper.hopper_dgrad_kernel,
                                          hopper.hopper_wgrad_kernel)
                if (sm90_kernel or index in sm90_only) and arch != "sm_90":
                    continue
                sig, constexprs, attrs, options = _specialize(kernel, args, kwargs, _target(arch))
                job = Job(
                    kernel=f"{kernel.fn.__module__}:{kernel.fn.__name__}",
                    role=role if own else kernel.fn.__name__,
                    dtype=str(dtype).removeprefix("torch."),
                    config=dataclasses.asdict(cfg) if own else None,
                    stride=stride if own else None,
                    tile=_tile(constexprs, options),
                    arch=arch,
                    signature=sig,
                    constexprs=constexprs,
                    attrs=attrs,
                    options=options,
                )
                # Identical builds (the reduce kernels of equal dtypes, dtype-free kernels) are done once.
                key = repr((job.kernel, arch, sorted(sig.items()), sorted(constexprs.items()), attrs, options))
                label = f"{job.role} {job.dtype} {job.tile}"
                if only is not None and not re.search(only, label):
                    continue
                if lean and job.dtype not in LEAN_DTYPES.get(arch, (job.dtype,)) and not sm90_kernel:
                    continue
                if lean and own and role in ("fprop", "dgrad", "wgrad") and not in_lean_set(role, cfg, dtype, arch):
                    continue
                if key not in seen:
                    seen.add(key)
                    jobs.append(job)
    return jobs


# --------------------------------------------------------------------------- compiling


def _cuda_usage(cubin: bytes, sass: bool = False, ttgir: str = "") -> dict[str, Any]:
    """Registers, stack, static shared memory and spill bytes of the one function in ``cubin``;
    with ``sass``, also its :func:`sass_profile` (``ttgir``: the kernel's TritonGPU IR)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()

        def cuobjdump(option: str) -> str:
            return subprocess.run([_CUOBJDUMP, option, f.name], check=True, capture_output=True, text=True).stdout

        resources = cuobjdump("--dump-resource-usage")
        usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", resources)}
        spill = {"STL": 0, "LDL": 0}
        # Spills live in the stack frame; without one there are none, and the SASS dump is the slow part.
        text = cuobjdump("--dump-sass") if usage["STACK"] or sass else ""
        if usage["STACK"]:
            for op, modifiers in re.findall(r"\b(STL|LDL)((?:\.\w+)*)\s", text):
                spill[op] += _access_bytes(modifiers)
    out: dict[str, Any] = {
        "regs": usage["REG"],
        "local": usage["STACK"] + usage["LOCAL"],
        "static_shared": usage["SHARED"],
        "spill_stores": spill["STL"],
        "spill_loads": spill["LDL"],
    }
    if sass:
        out["sass"] = sass_profile(text, ttgir)
    return out


# One SASS instruction as cuobjdump prints it, e.g. "/*1cd0*/  @!P4 LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64], P0 ;"
# (opcodes are upper case but for the "x" of matrix shapes: HGMMA.64x64x16.F32.BF16).
_SASS_INSN = re.compile(r"/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.x]*)([^;]*);")
_MMA_OPS = ("HGMMA", "HMMA")


def sass_profile(sass: str, ttgir: str = "") -> dict[str, Any]:
    """What the disassembly of one kernel says about its main loop and its memory instructions.

    The main loop is the backward branch whose body holds the most matrix instructions
    (``HGMMA``: Hopper warpgroup MMA, operands from shared memory or registers; ``HMMA``:
    warp-level mma.sync). Keys: ``mma`` (the matrix instruction shapes, "+"-joined, or "none"),
    ``mma_per_iter``, ``kernel_insns`` (the kernel's static instruction count, NOPs left out),
    ``to_last_mma`` (those up to the last matrix instruction: all but the epilogue),
    ``loop_insns`` (instructions in one iteration of one thread),
    ``insns_per_mma``, ``loop_bar`` (CTA barriers per iteration), ``loop_wgmma_drain``
    (``WARPGROUP.DEPBAR.LE gsb0, 0x0``: waits until no wgmma is in flight), ``loop_sts``
    (shared-memory stores from registers, STS/STSM: operands staged by the threads rather than
    copied asynchronously), and over the whole kernel ``ldgsts`` / ``ldg`` (asynchronous copies
    and global loads, as {bytes per thread: count}) and ``tma`` (UTMALDG bulk tensor loads).
    Instructions predicated on ``!PT`` (never executed) are left out, and so is a backward branch
    whose span holds an unpredicated ``EXIT`` (the return of an out-of-line block into the main
    code, not a loop). From ``ttgir``, ``buffers``
    lists the shared-memory buffers the software pipeliner allocated (leading dimension = stages,
    e.g. "3x128x64xbf16").
    """
    insns = []
    exits = []  # unpredicated EXITs: the kernel's end
    for pc, pred, op, operands in _SASS_INSN.findall(sass):
        if pred.strip() == "@!PT":
            continue
        insns.append((int(pc, 16), op, operands))
        if op == "EXIT" and not pred.strip():
            exits.append(int(pc, 16))
    loops = []
    for pc, op, operands in insns:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if op.startswith("BRA") and target and int(target.group(1), 16) <= pc:
            lo = int(target.group(1), 16)
            # A branch back from a block placed after the kernel's EXIT (an out-of-line wait that
            # returns into the main code) spans that EXIT: no loop body.
            if not any(lo <= e < pc for e in exits):
                loops.append((lo, pc))

    def mma_count(lo: int, hi: int) -> int:
        return sum(lo <= pc <= hi and op.startswith(_MMA_OPS) for pc, op, _ in insns)

    body: list[tuple[int, str, str]] = []
    if loops:
        lo, hi = max(loops, key=lambda span: (mma_count(*span), -(span[1] - span[0])))
        if mma_count(lo, hi):
            body = [i for i in insns if lo <= i[0] <= hi and i[1] != "NOP"]

    def widths(prefix: str) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, op, _ in insns:
            if op.split(".")[0] == prefix:
                size = _access_bytes(op[len(prefix) :])
                out[size] = out.get(size, 0) + 1
        return dict(sorted(out.items(), reverse=True))

    shapes = sorted({".".join(op.split(".")[:2]) for _, op, _ in insns if op.startswith(_MMA_OPS)})
    mmas = sum(op.startswith(_MMA_OPS) for _, op, _ in body)
    last_mma = max((pc for pc, op, _ in insns if op.startswith(_MMA_OPS)), default=-1)
    return {
        "kernel_insns": sum(op != "NOP" for _, op, _ in insns),
        "to_last_mma": sum(op != "NOP" and pc <= last_mma for pc, op, _ in insns),
        "mma": "+".join(shapes) or "none",
        "mma_per_iter": mmas,
        "loop_insns": len(body),
        "insns_per_mma": round(len(body) / mmas, 1) if mmas else None,
        "loop_bar": sum(op.startswith("BAR.SYNC") for _, op, _ in body),
        "loop_wgmma_drain": sum(
            op == "WARPGROUP.DEPBAR.LE" and re.fullmatch(r"\s*gsb0,\s*0x0\s*", ops) is not None for _, op, ops in body
        ),
        "loop_sts": sum(op.split(".")[0] in ("STS", "STSM") for _, op, _ in body),
        "ldgsts": widths("LDGSTS"),
        "ldg": widths("LDG"),
        "tma": sum(op.startswith("UTMALDG") for _, op, _ in insns),
        "buffers": re.findall(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+(?:x\d+)+x\w+)", ttgir),
    }


# A PTX max/min instruction, e.g. "max.NaN.f32 %f3, %f1, %f2;" or "@%p1 min.ftz.bf16x2 %r4, ...": the
# opcode and its modifiers (the last one is the operand type).
_PTX_MINMAX = re.compile(r"(?<![\w.%$])((?:max|min)(?:\.\w+)+)\s")
_PTX_FLOAT_TYPES = ("f16", "f16x2", "bf16", "bf16x2", "f32", "f64")


def nan_dropping_ops(ptx: str) -> dict[str, int]:
    """The floating-point max/min instructions of ``ptx`` that drop NaN, as {opcode: count}.

    PTX ``max``/``min`` on floats return the operand that is not NaN unless the ``.NaN``
    modifier is given (``max.NaN.f32``, what ``tl.maximum(..., propagate_nan=tl.PropagateNan.ALL)``
    compiles to); PyTorch's ``relu``/``maximum``/``clamp`` propagate NaN. ``max.f64`` has no
    ``.NaN`` form and counts too. Integer max/min (``.s32``, ``.u64``, ...) are not floats and
    do not count.
    """
    found: dict[str, int] = {}
    for op in _PTX_MINMAX.findall(re.sub(r"//[^\n]*", "", ptx)):
        mods = op.split(".")[1:]
        if mods[-1] in _PTX_FLOAT_TYPES and "NaN" not in mods:
            found[op] = found.get(op, 0) + 1
    return dict(sorted(found.items()))


def ticket_ordering(ptx: str) -> dict[str, int] | None:
    """How the PTX orders an atomic ticket (:func:`fusedres.ops.bn._last_ticket`), or None
    without an ``acq_rel`` atomic: ``acq_rel`` atomics; ``barrier_before``: 1 if every such atomic
    has a ``bar.sync`` between the last global store before it and it (every thread's partials —
    or, at a second level, merged rows — are stored before the one thread releases them);
    ``barrier_after``: one after the first (the other threads wait for the acquire);
    ``cg_loads_after``: L2 loads (``ld.global.cg``, no stale L1 line) after the first atomic,
    ``plain_loads_after`` the other global loads there (data no program of the launch writes, e.g.
    the BatchNorm weights)."""
    lines = [ln.strip() for ln in re.sub(r"//[^\n]*", "", ptx).splitlines() if ln.strip()]
    atoms = [i for i, ln in enumerate(lines) if re.search(r"\batom(?:\.\w+)*\.acq_rel\b", ln)]
    if not atoms:
        return None
    first = atoms[0]
    stores = [i for i, ln in enumerate(lines) if re.search(r"\bst\.global\b", ln)]

    def fenced(atom: int) -> bool:  # a bar.sync between the last global store before it and it
        last_store = max([i for i in stores if i < atom], default=-1)
        return any("bar.sync" in ln for ln in lines[last_store + 1 : atom])

    after = lines[first + 1 :]
    loads = [ln for ln in after if re.search(r"\bld\.global\b", ln)]
    cg = sum(bool(re.search(r"\bld\.global\.cg\b", ln)) for ln in loads)
    return {
        "acq_rel": len(atoms),
        "barrier_before": int(all(fenced(a) for a in atoms)),
        "barrier_after": int(any("bar.sync" in ln for ln in after)),
        "cg_loads_after": cg,
        "plain_loads_after": len(loads) - cg,
    }


def _access_bytes(modifiers: str) -> int:
    """Bytes one thread moves with an LDL/STL carrying ``modifiers`` (e.g. ".64", ".LU.128", ".U8")."""
    sizes = {".U8": 1, ".S8": 1, ".U16": 2, ".S16": 2, ".64": 8, ".128": 16}
    return max([sizes[m] for m in re.findall(r"\.\w+", modifiers) if m in sizes], default=4)


def _amd_usage(amdgcn: str) -> dict[str, int]:
    """VGPRs and scratch bytes from the AMDGCN assembly's metadata."""

    def field(pattern: str) -> int:
        found = re.search(pattern, amdgcn)
        return int(found.group(1)) if found else 0

    return {"regs": field(r"\.vgpr_count:\s+(\d+)"), "local": field(r"; ScratchSize: (\d+)")}


def compile_job(job: Job, sass: bool = False) -> Row:
    """Build one kernel and measure it (with ``sass``, also profile its disassembly); a failed
    build comes back as a row, not an exception."""
    module, name = job.kernel.split(":")
    kernel = getattr(importlib.import_module(module), name)
    labels = {f.name: getattr(job, f.name) for f in dataclasses.fields(Row) if hasattr(job, f.name)}
    row = Row(**labels, limit=SMEM_LIMITS[job.arch], status="ok")
    start = time.perf_counter()
    try:
        src = ASTSource(fn=kernel, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
        compiled = triton.compile(src, target=_target(job.arch), options=job.options)
        row.shared = int(compiled.metadata.shared)
        if "cubin" in compiled.asm:
            usage = _cuda_usage(compiled.asm["cubin"], sass, compiled.asm.get("ttgir", ""))
            usage["nan_dropping_ops"] = nan_dropping_ops(compiled.asm["ptx"])
            usage["nan_dropping"] = sum(usage["nan_dropping_ops"].values())
            usage["ticket"] = ticket_ordering(compiled.asm["ptx"])
        else:
            usage = _amd_usage(compiled.asm["amdgcn"])
    except Exception as e:  # every failure becomes a reported row
        row.status = "skipped" if job.arch == AMD_ARCH else "ERROR"
        row.error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        return row
    finally:
        row.seconds = round(time.perf_counter() - start, 2)
    for key, value in usage.items():
        setattr(row, key, value)
    if row.shared > row.limit:
        row.status = "FAIL"
    return row


def _fmt(v: int | None) -> str:
    return "-" if v is None else str(v)


def format_row(row: Row) -> str:
    stride = f" s{row.stride}" if row.stride not in (None, 1) else ""
    spills = f"{_fmt(row.spill_stores)}/{_fmt(row.spill_loads)}"
    line = (
        f"{row.role + stride:<22} {row.dtype:<9} {row.tile:<22} {row.arch:<7} "
        f"shared {_fmt(row.shared):>6}/{row.limit:<6} regs {_fmt(row.regs):>3} "
        f"spill st/ld {spills:>9} local {_fmt(row.local):>5}  {row.status}"
    )
    if row.nan_dropping:
        ops = " ".join(f"{n}x{op}" for op, n in (row.nan_dropping_ops or {}).items())
        line += f"  NaN-dropping {row.nan_dropping} ({ops})"
    line += f"  {row.error}" if row.error else ""
    if row.sass is not None:
        line += "\n" + format_sass(row.sass)
    return line


def format_sass(p: dict[str, Any]) -> str:
    """One indented line of a :func:`sass_profile`."""

    def sizes(d: dict[int, int]) -> str:
        return " ".join(f"{n}x{b * 8}b" for b, n in d.items()) or "-"

    loop = (
        f"loop {p['loop_insns']} insns = {p['insns_per_mma']}/mma, bar {p['loop_bar']}, "
        f"wgmma drains {p['loop_wgmma_drain']}, sts {p['loop_sts']}"
        if p["mma_per_iter"]
        else "no mma loop"
    )
    return (
        f"    sass: {p['mma']} {p['mma_per_iter']}/iter; {loop}; "
        f"ldgsts {sizes(p['ldgsts'])}; ldg {sizes(p['ldg'])}; tma {p['tma']}; "
        f"smem buffers {' '.join(p['buffers']) or '-'}"
    )


def run(
    archs: list[str],
    jobs: int,
    *,
    sass: bool = False,
    plain: bool = False,
    ksize: int = 3,
    only: str | None = None,
    lean: bool = False,
    layer: tuple[int, int, int] | None = None,
) -> list[Row]:
    """Compile everything for ``archs`` with ``jobs`` processes, printing each row as it arrives
    (the other arguments: see :func:`plan_jobs` and :func:`sass_profile`)."""
    planned = plan_jobs(archs, plain=plain, ksize=ksize, only=only, lean=lean, layer=layer)
    # Spawned workers: forking a process that has imported torch can deadlock.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = []
        for row in pool.map(functools.partial(compile_job, sass=sass), planned):
            print(format_row(row), flush=True)
            rows.append(row)
    return rows


def summarize(rows: list[Row]) -> str:
    lines = [
        f"{len(rows)} builds: "
        + ", ".join(f"{sum(r.status == s for r in rows)} {s}" for s in ("ok", "FAIL", "ERROR", "skipped"))
    ]
    for arch in sorted({r.arch for r in rows}):
        done = [r for r in rows if r.arch == arch and r.shared is not None]
        if done:
            top = max(done, key=lambda r: r.shared or 0)
            spilling = sum(bool(r.spill_stores or r.local) for r in done)
            line = (
                f"  {arch}: max shared {top.shared}/{top.limit} ({top.role} {top.dtype} {top.tile}), "
                f"max regs {max(r.regs or 0 for r in done)}, {spilling} builds spill"
            )
            if arch.startswith("sm_"):
                dropping = [r for r in done if r.nan_dropping]
                line += f", {len(dropping)} builds drop NaN in a float max/min"
                if dropping:
                    line += f" ({', '.join(sorted({r.role for r in dropping}))})"
            lines.append(line)
    return "\n".join(lines)


def _parse_archs(text: str) -> list[str]:
    archs = [f"sm_{a.strip()}" for a in text.split(",") if a.strip()]
    unknown = [a for a in archs if a not in SMEM_LIMITS]
    if not archs or unknown:
        raise argparse.ArgumentTypeError(f"choose among {','.join(map(str, CUDA_ARCHS))}, got {text!r}")
    return archs


def _parse_layer(text: str) -> tuple[int, int, int]:
    try:
        cin, cout, hw = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CIN,COUT,HW (three integers), got {text!r}") from None
    return cin, cout, hw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedres.ops.offline", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        type=_parse_archs,
        default=[f"sm_{a}" for a in CUDA_ARCHS],
        help="comma-separated CUDA compute capabilities (default: 80,86,89,90)",
    )
    parser.add_argument("--amd", action="store_true", help=f"also build for {AMD_ARCH}; a failed build is skipped")
    parser.add_argument("--json", metavar="PATH", help="write every row to PATH as JSON")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all CPUs)")
    parser.add_argument("--sass", action="store_true", help="profile each CUDA build's disassembly (main loop, loads)")
    parser.add_argument("--plain", action="store_true", help="also build the conv roles without fusion")
    parser.add_argument("--ksize", type=int, choices=(1, 3), default=3, help="conv kernel size (default: 3)")
    parser.add_argument("--only", metavar="REGEX", help='keep builds whose "role dtype tile" label matches')
    parser.add_argument("--per-element", action="store_true",
                        help="sm_90 only: instructions per output element of each role of NARROW_SHAPES on both "
                             "engines (--only filters 'role-engine CinxCout kxk')")
    parser.add_argument("--lean", action="store_true",
                        help="the CI set: sm_86/89 in bf16 only, sm_90's pointer kernels and gfx942 without fp16 "
                             "(see LEAN_DTYPES)")
    parser.add_argument("--layer", type=_parse_layer, metavar="CIN,COUT,HW",
                        help="build the sm_90 fprop engine at this convolution (HW x HW images) with its default "
                             "tiles, instead of every Hopper config")
    args = parser.parse_args(argv)
    archs = args.arch + ([AMD_ARCH] if args.amd else [])
    start = time.perf_counter()
    if args.per_element:
        built = run_per_element(max(1, args.jobs), args.only)
        print(f"wall time {time.perf_counter() - start:.1f} s with {args.jobs} processes")
        return 1 if any(row.status != "ok" for _, row in built) else 0
    try:
        rows = run(archs, max(1, args.jobs), sass=args.sass, plain=args.plain, ksize=args.ksize, only=args.only,
                   lean=args.lean, layer=args.layer)
    except InterpreterActiveError as e:
        print(e, file=sys.stderr)
        return 2
    print(summarize(rows))
    print(f"wall time {time.perf_counter() - start:.1f} s with {args.jobs} processes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    return 1 if any(r.status in ("FAIL", "ERROR") or r.nan_dropping for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
