"""Pre-activation residual blocks (He et al. 2016, "Identity Mappings in Deep Residual Networks").

The modules only hold parameters (real ``nn.BatchNorm2d`` / ``nn.Conv2d`` submodules, named
as in the most widely used PyTorch pre-activation code, so checkpoints load both ways) and
call the fused chain of :mod:`fusedres.functional`. With ``fused=False``, or on a device the
Triton kernels don't run on, they compute the same function with those submodules in eager
PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from . import _runtime
from ._fused import BnMode, ChainSpec, StageSpec, bn_mode, with_bn_modes
from ._fused import autocast_dtype as _autocast_dtype
from ._fused.batchnorm import Link, _counter, set_link
from .functional import (
    _check_block_convs,
    _check_block_devices,
    _check_single_values,
    _misplaced,
    _wants_channels_last,
    bn_relu_conv_chain,
)
from .ops import conv as conv_ops

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _PreActBlock(nn.Module):
    """Common forward of the pre-activation blocks: a chain of bn-relu-conv stages and a shortcut."""

    expansion = 1
    in_channels: int
    out_channels: int
    #: (bn, conv) submodule names of each stage, in order.
    _stage_names: tuple[tuple[str, str], ...] = ()
    #: The BatchNorm types with which a call may take the planned path (see :meth:`_plan_key`):
    #: those whose per-call state is what the plan key reads — not SyncBatchNorm (its process group).
    _planned_bns: tuple[type[nn.Module], ...] = (nn.BatchNorm2d,)

    # Submodules, parameters and buffers are read from the modules' dicts in the code that runs
    # every call: nn.Module.__getattr__ costs ~1 µs per read, dozens of reads per call.

    def _stages(self) -> list[tuple[nn.BatchNorm2d, nn.Conv2d]]:
        m = self._modules
        return [(m[b], m[c]) for b, c in self._stage_names]

    def _projection(self) -> nn.Conv2d | None:
        """The 1x1 projection shortcut's convolution, or None for an identity shortcut."""
        shortcut = self._modules.get("shortcut")
        return shortcut[0] if shortcut is not None else None

    def _make_shortcut(self, in_channels: int, out_channels: int, stride: int) -> None:
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False))

    def _check(self, x: torch.Tensor, amp: torch.dtype | None = None,
               stages: list[tuple[nn.BatchNorm2d, nn.Conv2d]] | None = None) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: input must be a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}: expected {self.in_channels} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        stages = self._stages() if stages is None else stages
        proj = self._projection()
        dev, dtype = x.device, x.dtype
        for bn, conv in stages:  # every tensor of the block, without walking the module tree
            w, g = conv._parameters["weight"], bn._parameters.get("weight")
            if _misplaced([bn, conv], dev):
                _check_block_devices(name, self, x)
            if amp is None and w.dtype != dtype:
                raise TypeError(f"{name}: input dtype {dtype} differs from the convolution weights' "
                                f"dtype {w.dtype}")
            if g is not None and g.dtype != torch.float32 and g.dtype != (amp or dtype):
                raise TypeError(f"{name}: BatchNorm parameters must be float32 or the input's dtype "
                                f"{amp or dtype}, got {g.dtype}")
        if proj is not None and proj._parameters["weight"].device != dev:
            _check_block_devices(name, self, x)

    def _check_fused(self, x: torch.Tensor, stages: list[tuple[nn.BatchNorm2d, nn.Conv2d]]) -> None:
        """What only the fused path refuses (eager PyTorch raises its own errors or computes it)."""
        name = type(self).__name__
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{name}: empty images are not supported, got input size {tuple(x.shape)}")
        proj = self._projection()
        convs = [(c, self._modules[c]) for _, c in self._stage_names]
        _check_block_convs(name, convs + ([("the projection shortcut", proj)] if proj is not None else []))
        if proj is not None and (proj.kernel_size != (1, 1) or proj.padding != (0, 0)):
            raise ValueError(f"{name}: the projection shortcut must be a 1x1 convolution without padding, got "
                             f"kernel_size={proj.kernel_size}, padding={proj.padding}")
        if x.shape[0] != 1:  # a batch of two or more always gives a BatchNorm two values
            return
        h, w = x.shape[2], x.shape[3]
        sizes = []  # the (H, W) each BatchNorm normalises over
        for bn, conv in stages:
            sizes.append((bn, (h, w)))
            h = conv_ops.conv_out_size(h, conv.kernel_size[0], conv.stride[0], conv.padding[0])
            w = conv_ops.conv_out_size(w, conv.kernel_size[0], conv.stride[0], conv.padding[0])
        _check_single_values(name, x, sizes)

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The same function with the submodules in plain PyTorch (the ``fused=False`` path)."""
        stages = self._stages()
        bn, conv = stages[0]
        a = F.relu(bn(x))
        shortcut = self.shortcut(a) if hasattr(self, "shortcut") else x
        h = conv(a)
        for bn, conv in stages[1:]:
            h = conv(F.relu(bn(h)))
        return h + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amp = _autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
        if amp is None and not torch.compiler.is_compiling() and self.fused and isinstance(x, torch.Tensor) \
                and x.dim() == 4 and x.shape[0] != 0 and _runtime.triton_enabled(x.device):
            key = self._plan_key(x)
            if key is not None:
                plan = self.__dict__.get("_fused_plan")
                if plan is None or plan.key != key:
                    plan = self._build_plan(x, key)
                return self._forward_planned(x, plan)
        stages = self._stages()
        self._check(x, amp, stages)
        # an empty batch: eager PyTorch's result and buffer updates (nothing to compute)
        if not self.fused or not _runtime.triton_enabled(x.device) or x.shape[0] == 0:
            return self.forward_eager(x)
        if x.dtype not in _FUSED_DTYPES:
            raise TypeError(f"{type(self).__name__}: the fused kernels compute in float32, float16 or bfloat16, "
                            f"got {x.dtype} (fused=False runs the block in eager PyTorch)")
        self._check_fused(x, stages)
        proj = self._projection()
        weights = [conv._parameters["weight"] for _, conv in stages]
        proj_weight = proj._parameters["weight"] if proj is not None else None
        out_cl = _wants_channels_last(x, *weights)
        add_outside = False
        if amp is not None:
            # As nn.Conv2d under autocast: convolutions in the autocast dtype; BatchNorm parameters
            # and statistics stay as they are (fp32). An fp32 input is added to the fp32 output
            # of eager PyTorch's promotion, so the identity shortcut is added outside then.
            add_outside = proj is None and x.dtype != amp
            x_in = x.to(amp)
            weights = [w.to(dtype=amp, memory_format=torch.channels_last) for w in weights]
            if proj_weight is not None:
                proj_weight = proj_weight.to(dtype=amp, memory_format=torch.channels_last)
        else:
            x_in = x

        def compute(modes: list[BnMode]) -> torch.Tensor:
            spec = ChainSpec(
                tuple(m.stage(bn, conv.stride[0], conv.padding[0]) for m, (bn, conv) in zip(modes, stages)),
                shortcut="projection" if proj is not None else ("none" if add_outside else "identity"),
                proj_stride=proj.stride[0] if proj is not None else 1,
                out_channels_last=out_cl,
            )
            tensors = []
            for m, w, (bn, _) in zip(modes, weights, stages):
                p = bn._parameters
                tensors += [w, p.get("weight"), p.get("bias"), m.running_mean, m.running_var]
            return bn_relu_conv_chain(spec, x_in, tensors, proj_weight=proj_weight)

        out = with_bn_modes([bn for bn, _ in stages], compute)
        if out is None:  # SyncBatchNorm under torch.compile: the modules' own forward
            return self.forward_eager(x)
        return out + x if add_outside else out


    # ----------------------------------------------------------------------------------------
    # The planned path: what forward derives from the modules' configuration and the input's layout
    # (the checks passed, the spec, the output layout), kept between calls in a _BlockPlan under a
    # key that holds everything it was derived from. Taken outside autocast and torch.compile, and
    # only for plain nn.BatchNorm2d (no SyncBatchNorm: its process group is read per call) with a
    # float momentum (momentum=None averages with a per-call factor) and plain nn.Conv2d.

    def _plannable(self) -> bool:
        """Whether a call can take the planned path by its modules' types and momenta (where
        :meth:`_plan_key` would not return None whatever the input)."""
        m, bns = self._modules, self._planned_bns
        for bn_name, conv_name in self._stage_names:
            bn, conv = m[bn_name], m[conv_name]
            if type(bn) not in bns or type(conv) is not nn.Conv2d or bn.momentum is None:
                return False
        proj = self._projection()
        return proj is None or type(proj) is nn.Conv2d

    def _plan_key(self, x: torch.Tensor) -> tuple | None:
        """Everything a :class:`_BlockPlan` depends on, or None where no plan is used. Tensors
        enter by what the checks and the output layout read — every parameter's and buffer's
        (dtype, device), the convolution weights' shapes and strides — never by identity: a
        parameter may be swapped for another of the same kind (``load_state_dict(assign=True)``,
        ``.data =``) and the plan stays right, while ``.to()`` changing a parameter's dtype or
        device in place changes the key."""
        parts: list = [x.shape, x.stride(), x.dtype, x.device, self.in_channels]
        m, bns = self._modules, self._planned_bns
        for bn_name, conv_name in self._stage_names:
            bn, conv = m[bn_name], m[conv_name]
            if type(bn) not in bns or type(conv) is not nn.Conv2d or bn.momentum is None:
                return None
            parts += (bn.training, bn.track_running_stats, bn.momentum, bn.eps, conv.kernel_size, conv.stride,
                      conv.padding, conv.groups, conv.dilation, conv.padding_mode)
            w = conv._parameters["weight"]
            parts += (w.shape, w.stride())  # (the output's layout follows the weights')
            parts += [None if t is None else (t.dtype, t.device)
                      for d in (conv._parameters, bn._parameters, bn._buffers) for t in d.values()]
        proj = self._projection()
        if proj is not None:
            if type(proj) is not nn.Conv2d:
                return None
            parts += (proj.kernel_size, proj.stride, proj.padding, proj.groups, proj.dilation, proj.padding_mode)
            parts += [None if t is None else (t.dtype, t.device)
                      for d in (proj._parameters, proj._buffers) for t in d.values()]
        else:
            parts.append(None)
        return tuple(parts)

    def _build_plan(self, x: torch.Tensor, key: tuple) -> _BlockPlan:
        """Run the checks of the full path (raising what it raises) and keep what they derived."""
        stages = self._stages()
        self._check(x, None, stages)
        if x.dtype not in _FUSED_DTYPES:
            raise TypeError(f"{type(self).__name__}: the fused kernels compute in float32, float16 or bfloat16, "
                            f"got {x.dtype} (fused=False runs the block in eager PyTorch)")
        self._check_fused(x, stages)
        proj = self._projection()
        modes = [bn_mode(bn) for bn, _ in stages]  # (read-only: the counters are not touched here)
        plan = _BlockPlan(
            key,
            ChainSpec(
                tuple(m.stage(bn, conv.stride[0], conv.padding[0]) for m, (bn, conv) in zip(modes, stages)),
                shortcut="projection" if proj is not None else "identity",
                proj_stride=proj.stride[0] if proj is not None else 1,
                out_channels_last=_wants_channels_last(x, *[conv._parameters["weight"] for _, conv in stages]),
            ),
            tuple(_counter(bn) is not None for bn, _ in stages),
            tuple(m.running_mean is not None for m in modes),
        )
        self.__dict__["_fused_plan"] = plan  # (not nn.Module.__setattr__: a plain attribute, no state)
        return plan

    def _forward_planned(self, x: torch.Tensor, plan: _BlockPlan) -> torch.Tensor:
        """The full path's computation with the plan's checks and spec (see :meth:`forward`)."""
        m = self._modules
        names = self._stage_names
        # counted as the modules do in training (bn_modes), by the launches that finalize each
        # BatchNorm's statistics (no _foreach_add_ launch)
        batches = [m[b]._buffers.get("num_batches_tracked") if counts else None
                   for (b, _), counts in zip(names, plan.counts)] if plan.counting else None
        tensors: list[torch.Tensor | None] = []
        for (b, c), running in zip(names, plan.running):
            p, buf = m[b]._parameters, m[b]._buffers
            tensors += [m[c]._parameters["weight"], p.get("weight"), p.get("bias"),
                        buf.get("running_mean") if running else None, buf.get("running_var") if running else None]
        proj = self._projection()
        return bn_relu_conv_chain(plan.spec, x, tensors,
                                  proj_weight=proj._parameters["weight"] if proj is not None else None,
                                  batches=batches)


class _BlockPlan:
    """What a block's forward derived from its configuration and its input's layout (see
    :meth:`_PreActBlock._plan_key`): the chain's spec, which BatchNorms count batches, and which
    pass their running statistics to the chain."""

    __slots__ = ("key", "spec", "counts", "running", "counting")

    def __init__(self, key: tuple, spec: ChainSpec, counts: tuple[bool, ...], running: tuple[bool, ...]) -> None:
        self.key, self.spec, self.counts, self.running = key, spec, counts, running
        self.counting = any(counts)


# --------------------------------------------------------------------------------------------
# Blocks run one after another by fusedres: block k's last convolution finalizes block k+1's
# first BatchNorm (a launch less per block; fusedres._fused.batchnorm.Link)

# The hooks nn.Module.__call__ runs around a module's forward, per module and for every module,
# forbid a link: a forward hook may change an output in place between two blocks, a backward hook
# passes the output or the input on as another tensor object; with any of them the next block
# might not take what the previous one finalized for it.

def _hooked(m: nn.Module) -> bool:
    """Whether ``m``'s call runs a hook of its own (read from its dict: no __getattr__)."""
    d = m.__dict__
    return bool(d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"])


def _global_hooks() -> bool:
    """Whether every module's call runs a hook (torch.nn.modules.module.register_module_*_hook)."""
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
                or module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks)


def _own_forward(m: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether calling ``m`` runs ``cls.forward`` (not a subclass's or an instance's replacement)."""
    return type(m).forward is cls.forward and "forward" not in m.__dict__


@functools.cache
def _link_stage(eps: float, momentum: float) -> StageSpec:
    """A link's stage (only its BatchNorm fields are read); cached: building the frozen dataclass
    costs about a microsecond, per block and call."""
    return StageSpec(1, 0, eps, momentum, True)


def _link(block: nn.Module, nxt: nn.Module, x: torch.Tensor) -> Link | None:
    """The link from ``block`` to ``nxt`` when ``nxt`` is called on ``block``'s output right after
    it, or None. Made only where both are fused pre-activation blocks running fusedres's own
    forward, with no module hook, and where ``nxt``'s call certainly takes the planned fused chain
    (:meth:`_PreActBlock._plannable`: plain BatchNorms with a float momentum and plain convolutions)
    whose first BatchNorm, in training, takes the link — its tensors on ``x``'s device and sized for
    ``block``'s output, its ``num_batches_tracked`` counted by the producing launch, as the planned
    call would have its own finalizing launch count it. (:func:`run_linked` checks what holds for the
    whole loop: no autocast, no torch.compile, the Triton kernels enabled, no global hook.)"""
    if not (_own_forward(block, _PreActBlock) and _own_forward(nxt, _PreActBlock)):
        return None
    if not (block.fused and nxt.fused) or nxt.in_channels != block.out_channels:
        return None
    if _hooked(block) or _hooked(nxt):
        return None
    bn = nxt._modules[nxt._stage_names[0][0]]
    # (the planned call, which leaves the counting of its first BatchNorm's batch to the launch
    # that finalizes it: the link's producer; the full path counts every batch itself)
    if not bn.training or not nxt._plannable():
        return None
    p, buf = bn._parameters, bn._buffers
    tensors = (p.get("weight"), p.get("bias"), *((buf.get("running_mean"), buf.get("running_var"))
                                                  if bn.track_running_stats else (None, None)))
    shape, dev = (block.out_channels,), x.device
    for t in tensors:
        if t is not None and (t.device != dev or t.shape != shape):
            return None
    return Link(_link_stage(float(bn.eps), float(bn.momentum)), tensors, _counter(bn))


def run_linked(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``modules`` one after another (as ``nn.Sequential``), with each fused
    pre-activation block that is followed by another linked to it (:func:`_link`): in training
    its last convolution finalizes the next block's first BatchNorm — batch statistics and running
    statistics update — and hands that off instead of its output's statistics partials.

    Never wasted or doubled: the next block is called on that very output right after, with no
    hook anywhere that could modify or replace it, so its chain finds the hand-off (the same
    tensor, unchanged version, this thread) and takes it (:meth:`Link.made`: the tensors it was
    made for are its own) instead of finalizing again; the results are the bits of the unlinked
    path (the producer's last program runs :func:`fusedres.ops.bn.bn_finalize`'s helpers in its
    order). Where block k+1's chain does not take it — the producing block ran no fused chain, or
    a Finalize made for another BatchNorm — nothing was finalized, or not for it, and it computes
    its own statistics as unlinked. The edge that remains: block k+1 raising after block k updated
    its running statistics (a check the loop does not repeat: its convolutions' weights and
    geometry, a BatchNorm parameter's dtype) leaves them updated once, as eager PyTorch's BatchNorm
    would have before its convolution raised; and another thread swapping block k+1's BatchNorm
    tensors meanwhile."""
    n = len(modules)
    if n < 2 or not _links_allowed(x):
        for m in modules:
            x = m(x)
        return x
    for k in range(n - 1):
        m = modules[k]
        link = _link(m, modules[k + 1], x)
        if link is None:
            x = m(x)
            continue
        set_link(x, link)
        try:
            x = m(x)
        finally:
            set_link(None)
    return modules[n - 1](x)


def _links_allowed(x: torch.Tensor) -> bool:
    """What :func:`_link` needs of the whole loop: no global hook, the blocks' fused chains run
    eagerly (not under torch.compile or autocast, Triton enabled for ``x``'s device)."""
    return (isinstance(x, torch.Tensor) and not _global_hooks() and not torch.compiler.is_compiling()
            and _runtime.triton_enabled(x.device) and _autocast_dtype(x.device) is None)


def run_stages(stages: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``stages`` one after another; where each is a :class:`PreActSequential`
    whose call runs no hook, all their blocks in one :func:`run_linked` loop, so that each stage's
    last block also finalizes the next stage's first BatchNorm."""
    if not _global_hooks() and all(_own_forward(s, PreActSequential) and not _hooked(s) for s in stages):
        return run_linked([block for s in stages for block in s._modules.values()], x)
    for s in stages:
        x = s(x)
    return x


class PreActSequential(nn.Sequential):
    """``nn.Sequential`` of pre-activation blocks (any modules): the same ``state_dict`` and call,
    and in training each fused block's last convolution also finalizes the next block's first
    BatchNorm (:func:`run_linked`: a launch less per block, the same results)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_linked(list(self._modules.values()), x)


class PreActBasicBlock(_PreActBlock):
    """bn-relu-conv3x3(stride) → bn-relu-conv3x3, plus x (or a 1x1 projection of relu(bn1(x))).

    Args:
        in_channels: channels of the input.
        channels: channels of both convolutions and of the output.
        stride: stride of the first convolution and of the projection shortcut.
        fused: compute with the fused Triton kernels (True) or the submodules in eager PyTorch.
    """

    expansion = 1
    _stage_names = (("bn1", "conv1"), ("bn2", "conv2"))

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, fused: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.fused = in_channels, channels, fused
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self._make_shortcut(in_channels, channels, stride)



class PreActBottleneck(_PreActBlock):
    """bn-relu-conv1x1 → bn-relu-conv3x3(stride) → bn-relu-conv1x1(×4), plus the shortcut.

    Args:
        in_channels: channels of the input.
        channels: channels of the inner convolutions; the output has ``4 * channels``.
        stride: stride of the 3x3 convolution and of the projection shortcut.
        fused: compute with the fused Triton kernels (True) or the submodules in eager PyTorch.
    """

    expansion = 4
    _stage_names = (("bn1", "conv1"), ("bn2", "conv2"), ("bn3", "conv3"))

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, fused: bool = True) -> None:
        super().__init__()
        out = self.expansion * channels
        self.in_channels, self.out_channels, self.fused = in_channels, out, fused
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out, 1, bias=False)
        self._make_shortcut(in_channels, out, stride)
