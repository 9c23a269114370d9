"""``fusedres.convert`` swaps the residual blocks of an existing model for fused ones;
``fusedres.inspect`` says, before anything is changed, which blocks it would fuse and why not.

Recognised blocks:

- torchvision ``BasicBlock`` / ``Bottleneck`` (wide ones included) → :class:`fusedres.BasicBlock` /
  :class:`fusedres.Bottleneck`;
- timm's ResNet ``BasicBlock`` / ``Bottleneck`` (``timm.models.resnet``: resnet18…152, the -d
  variants, wide_resnet) → :class:`fusedres.adapters.TimmPostActBlock`, with timm's names;
- timm's ResNetV2 ``PreActBasic`` / ``PreActBottleneck`` (BatchNormAct2d with ReLU, plain
  convolutions, a 1x1 ``DownsampleConv`` projection or none) → :class:`fusedres.adapters.TimmPreActBlock`;
- plain-PyTorch pre-activation blocks in the common style (``bn1, conv1, bn2, conv2[, bn3, conv3]``
  and an optional ``shortcut = Sequential(Conv2d 1x1)``) → :class:`fusedres.PreActBasicBlock` /
  :class:`fusedres.PreActBottleneck`.

Each candidate is recognised by structure and then verified (:func:`_verify`): with random
float32 CPU tensors of its tensors' shapes swapped in, its own forward must equal what the fused
block computes, in eval mode and in training mode (output and BatchNorm running statistics,
from the same random-number state; a training forward that draws random numbers — dropout — is
refused). The new blocks reuse the very submodules: the same parameter and buffer tensors, the
same ``state_dict`` keys. Blocks that are residual but cannot be fused are named, with the
reason, in the report and in convert's one warning.

A plain ``nn.Sequential`` that holds two fused pre-activation blocks one after the other (a stage
of a hand-written pre-activation ResNet, a ResNetV2 stage's ``blocks``) becomes a
:class:`fusedres.PreActSequential` (its class swapped: the same object, children, hooks and
``state_dict``): in training each such block's last convolution then finalizes the next block's
first BatchNorm, a launch less per block, with the same results (:func:`fusedres.blocks.run_linked`).
The report lists those containers (``linked``).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .adapters import TimmPostActBlock, TimmPreActBlock
from .blocks import PreActBasicBlock, PreActBottleneck, PreActSequential, _PreActBlock
from .resnet import _BATCHNORMS, BasicBlock, Bottleneck, _PostActBlock

__all__ = ["BlockReport", "ConversionReport", "TimmPostActBlock", "TimmPreActBlock", "convert", "inspect"]


@dataclass(frozen=True)
class BlockReport:
    """One residual block of a model: fused into ``into``, or left as it is for ``reason``."""

    path: str  #: the block's name in the model (``layer1.0``)
    kind: str  #: its class name
    into: str | None = None  #: the fused block's class, None when the block is left
    reason: str | None = None  #: why the block is left, None when it is fused
    note: str | None = None  #: what of a fused block still runs in PyTorch (a shortcut module)

    @property
    def fused(self) -> bool:
        return self.into is not None

    def line(self, path_width: int = 0, kind_width: int = 0) -> str:
        """``path  kind  fused -> into`` or ``path  kind  not fused: reason``, columns padded."""
        head = f"{self.path:<{path_width}}  {self.kind:<{kind_width}}  "
        if self.fused:
            return head + f"fused -> {self.into}" + (f" ({self.note})" if self.note else "")
        return head + f"not fused: {self.reason}"

    def __str__(self) -> str:
        return self.line()


@dataclass
class ConversionReport:
    """What :func:`convert` does to a model: every residual block, fused or not and why."""

    model: str
    blocks: list[BlockReport] = field(default_factory=list)
    #: the containers (paths; ``""``: the model itself) whose consecutive fused pre-activation
    #: blocks run linked: :class:`fusedres.PreActSequential` ones, and the plain ``nn.Sequential``
    #: ones that ``convert`` makes PreActSequential
    linked: list[str] = field(default_factory=list)

    @property
    def fused(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.fused]

    @property
    def left(self) -> list[BlockReport]:
        return [b for b in self.blocks if not b.fused]

    def summary(self) -> str:
        """One line: ``NAME: F of T residual blocks fused`` (and how many are left)."""
        if not self.blocks:
            return f"{self.model}: no residual block fusedres recognises"
        line = f"{self.model}: {len(self.fused)} of {len(self.blocks)} residual blocks fused"
        return line + (f", {len(self.left)} left as they are" if self.left else "")

    def __str__(self) -> str:
        pw = max((len(b.path) for b in self.blocks), default=0)
        kw = max((len(b.kind) for b in self.blocks), default=0)
        linked = []
        if self.linked:
            names = ", ".join(p or f"({self.model})" for p in self.linked)
            linked = [f"linked (each block's last convolution finalizes the next block's first BatchNorm): {names}"]
        return "\n".join([*(b.line(pw, kw) for b in self.blocks), *linked, self.summary()])


# --------------------------------------------------------------------------------------------
# Structure: what each recognised kind of block must look like to be fused


def _check_declared_shapes(name: str, module: nn.Module) -> None:
    """A ValueError naming the block when a layer's tensors disagree with its declared shape."""
    for sub_name, sub in module.named_modules():
        where = f"{name}.{sub_name}" if sub_name else name
        if isinstance(sub, nn.Conv2d):
            want = (sub.out_channels, sub.in_channels // sub.groups, *sub.kernel_size)
            if tuple(sub.weight.shape) != want:
                raise ValueError(f"convert: {where}.weight has shape {tuple(sub.weight.shape)} but the layer "
                                 f"declares {want} (in_channels={sub.in_channels}, out_channels={sub.out_channels})")
        elif isinstance(sub, nn.modules.batchnorm._BatchNorm):
            for t_name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(sub, t_name)
                if t is not None and tuple(t.shape) != (sub.num_features,):
                    raise ValueError(f"convert: {where}.{t_name} has shape {tuple(t.shape)} but the layer "
                                     f"declares num_features={sub.num_features}")


def _conv_issues(name: str, conv: object, kernel: int | None = None) -> list[str]:
    """Why ``conv`` is not a convolution the fused kernels compute (empty: it is)."""
    if type(conv) is not nn.Conv2d:
        kind = type(conv).__name__
        why = " (weight standardisation is not fused)" if "Std" in kind else ""
        return [f"{name} is {kind}, not a plain nn.Conv2d{why}"]
    issues = []
    if conv.groups != 1:
        issues.append(f"{name} has groups={conv.groups} (the fused kernels take groups=1)")
    if conv.dilation != (1, 1):
        issues.append(f"{name} has dilation={conv.dilation[0]} (the fused kernels take dilation=1)")
    if conv.bias is not None:
        issues.append(f"{name} has a bias")
    k = conv.kernel_size
    if kernel is not None and k != (kernel, kernel):
        issues.append(f"{name} is {k[0]}x{k[1]}, not {kernel}x{kernel}")
    elif k[0] != k[1] or k[0] % 2 == 0:
        issues.append(f"{name} has a {k[0]}x{k[1]} kernel (square, odd sizes only)")
    if isinstance(conv.padding, str) or conv.padding != (k[0] // 2, k[1] // 2) or conv.padding_mode != "zeros":
        issues.append(f"{name} has padding={conv.padding} ({conv.padding_mode}), not zero padding {k[0] // 2}")
    if conv.stride[0] != conv.stride[1]:
        issues.append(f"{name} has stride={conv.stride}")
    return issues


def _norm_issues(name: str, norm: object, kinds: tuple[type, ...] = _BATCHNORMS) -> list[str]:
    if type(norm) in kinds:
        return []
    kind = type(norm).__name__
    why = "group norm" if "Group" in kind else "another norm layer"
    return [f"{name} is {kind} ({why}; only BatchNorm is fused)"]


def _act_issues(name: str, act: object) -> list[str]:
    return [] if type(act) is nn.ReLU else [f"{name} is {type(act).__name__} (only ReLU is fused)"]


def _drop_issues(name: str, drop: object) -> list[str]:
    """Stochastic depth / drop-block that is active (a zero probability is an identity)."""
    if drop is None or isinstance(drop, nn.Identity) or getattr(drop, "drop_prob", None) == 0:
        return []
    p = getattr(drop, "drop_prob", None)
    what = f"{type(drop).__name__}(drop_prob={p})" if p is not None else type(drop).__name__
    return [f"{name} is {what} (random dropping in training is not fused)"]


def _hook_issues(m: nn.Module) -> list[str]:
    """The fused forward does not call the submodules: hooks on them would silently stop."""
    hooked = [n or "the block" for n, sub in m.named_modules() if sub._forward_hooks or sub._forward_pre_hooks]
    return [f"forward hooks on {', '.join(hooked)} would not run"] if hooked else []


def _adopt(cls: type[nn.Module], old: nn.Module, names: list[str]) -> nn.Module:
    """An instance of ``cls`` that holds ``old``'s submodules (the same tensors) under the same
    names, registered in ``old``'s order so that the ``state_dict`` keys come out identical, and
    ``old``'s plain attributes (a timm forward reads ``se``, ``drop_path``, ``downsample``)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    order = [n for n, _ in old.named_children() if n in names] + [n for n in names if n not in old._modules]
    for n in order:
        setattr(new, n, getattr(old, n))
    for k, v in vars(old).items():
        if not k.startswith("_") and k != "training" and k not in new._modules:
            new.__dict__[k] = v
    new.training = old.training  # the flag alone: the shared submodules keep their own modes
    return new


def _torchvision_types() -> tuple[type, type] | None:
    try:
        from torchvision.models.resnet import BasicBlock as TVBasic
        from torchvision.models.resnet import Bottleneck as TVBottleneck
    except ImportError:
        return None
    return TVBasic, TVBottleneck


def _postact_issues(m: nn.Module, pairs: tuple[tuple[str, str], ...], acts: tuple[str, ...]) -> list[str]:
    issues = []
    for c, b in pairs:
        issues += _conv_issues(c, getattr(m, c)) + _norm_issues(b, getattr(m, b))
    for a in acts:
        issues += _act_issues(a, getattr(m, a))
    return issues


def _plan_torchvision(m: nn.Module) -> nn.Module | str | None:
    tv = _torchvision_types()
    if tv is None or type(m) not in tv:
        return None
    bottleneck = type(m) is tv[1]
    pairs = (("conv1", "bn1"), ("conv2", "bn2")) + ((("conv3", "bn3"),) if bottleneck else ())
    issues = _postact_issues(m, pairs, ("relu",))
    if issues:
        return "; ".join(issues)
    cls = Bottleneck if bottleneck else BasicBlock
    names = ["conv1", "bn1", "conv2", "bn2", "relu", "downsample"] + (["conv3", "bn3"] if bottleneck else [])
    new = _adopt(cls, m, names)
    new._init_fusion(None)
    return new


def _plan_timm_resnet(m: nn.Module) -> nn.Module | str | None:
    try:
        from timm.models import resnet as timm_resnet
    except ImportError:
        return None
    if type(m) not in (timm_resnet.BasicBlock, timm_resnet.Bottleneck):
        return None
    bottleneck = type(m) is timm_resnet.Bottleneck
    pairs = (("conv1", "bn1"), ("conv2", "bn2")) + ((("conv3", "bn3"),) if bottleneck else ())
    acts = ("act1", "act2") + (("act3",) if bottleneck else ())
    issues = _postact_issues(m, pairs, acts)
    se = getattr(m, "se", None)
    if se is not None:
        issues.append(f"se is {type(se).__name__} (attention / squeeze-excitation is not fused)")
    aa = getattr(m, "aa", None)
    if aa is not None and not isinstance(aa, nn.Identity):
        issues.append(f"aa is {type(aa).__name__} (anti-aliased downsampling is not fused)")
    issues += _drop_issues("drop_block", getattr(m, "drop_block", None))
    issues += _drop_issues("drop_path", getattr(m, "drop_path", None))
    if issues:
        return "; ".join(issues)
    new = _adopt(TimmPostActBlock, m, [n for n, _ in m.named_children()])
    new._timm_cls, new._pair_names = type(m), pairs
    new._init_fusion(None)
    return new


def _preact_issues(m: nn.Module, pairs: tuple[tuple[str, str], ...], norm_kinds: tuple[type, ...],
                   proj: object, proj_name: str, other_shortcut: bool = False) -> list[str]:
    """Why the stages and projection of a pre-activation block are not the fused unit
    (``other_shortcut``: the block has a shortcut module already named as not fused)."""
    bottleneck = len(pairs) == 3
    kernels = (1, 3, 1) if bottleneck else (3, 3)
    stride_at = 1 if bottleneck else 0
    issues = []
    for (b, c), k in zip(pairs, kernels):
        issues += _norm_issues(b, getattr(m, b), norm_kinds) + _conv_issues(c, getattr(m, c), k)
    if issues:
        return issues
    convs = [getattr(m, c) for _, c in pairs]
    stride = convs[stride_at].stride[0]
    if any(c.stride[0] != 1 for i, c in enumerate(convs) if i != stride_at):
        issues.append(f"a stride on another convolution than {pairs[stride_at][1]}")
    cin, cout = convs[0].in_channels, convs[-1].out_channels
    if proj is not None:
        p_issues = _conv_issues(proj_name, proj, 1)
        if not p_issues and proj.stride[0] != stride:
            p_issues.append(f"{proj_name} has stride {proj.stride[0]}, the block {stride}")
        issues += p_issues
    elif (stride != 1 or cin != cout) and not other_shortcut:
        issues.append(f"no projection shortcut for stride {stride}, {cin} -> {cout} channels")
    return issues


def _plan_timm_resnetv2(m: nn.Module) -> nn.Module | str | None:
    try:
        from timm.layers import BatchNormAct2d
        from timm.models import resnetv2
    except ImportError:
        return None
    if type(m) is resnetv2.Bottleneck:
        return "a post-activation ResNetV2 Bottleneck (fusedres fuses ResNetV2's pre-activation blocks)"
    if type(m) not in (resnetv2.PreActBasic, resnetv2.PreActBottleneck):
        return None
    bottleneck = type(m) is resnetv2.PreActBottleneck
    pairs = (("norm1", "conv1"), ("norm2", "conv2")) + ((("norm3", "conv3"),) if bottleneck else ())
    issues = []
    for n, _ in pairs:
        norm = getattr(m, n)
        if type(norm) is BatchNormAct2d:
            issues += _act_issues(f"{n}.act", norm.act) + _drop_issues(f"{n}.drop", norm.drop)
    ds, proj = m.downsample, None
    if ds is not None:
        if type(ds) is resnetv2.DownsampleConv and isinstance(ds.norm, nn.Identity):
            proj = ds.conv
        else:
            issues.append(f"downsample is {type(ds).__name__} (only a 1x1 convolution of the pre-activation, "
                          f"DownsampleConv, is fused)")
    issues += _preact_issues(m, pairs, (BatchNormAct2d,), proj, "downsample.conv",
                             other_shortcut=ds is not None and proj is None)
    issues += _drop_issues("drop_path", m.drop_path)
    if issues:
        return "; ".join(issues)
    new = _adopt(TimmPreActBlock, m, [n for n, _ in m.named_children()])
    new._timm_cls, new._stage_names = type(m), pairs
    new.in_channels, new.out_channels = m.conv1.in_channels, getattr(m, pairs[-1][1]).out_channels
    new.fused = True
    return new


def _plan_preact(m: nn.Module) -> nn.Module | str | None:
    """A plain pre-activation block in the common layout (``bn1, conv1, bn2, conv2[, bn3, conv3]``,
    optional ``shortcut = Sequential(Conv2d 1x1)``)."""
    if not (hasattr(m, "conv1") and hasattr(m, "bn1") and hasattr(m, "bn2")):
        return None
    bottleneck = hasattr(m, "bn3") and hasattr(m, "conv3")
    pairs = (("bn1", "conv1"), ("bn2", "conv2")) + ((("bn3", "conv3"),) if bottleneck else ())
    shortcut, proj = getattr(m, "shortcut", None), None
    issues = []
    if shortcut is not None:
        if isinstance(shortcut, nn.Sequential) and len(shortcut) == 1:
            proj = shortcut[0]
        else:
            issues.append(f"shortcut is {type(shortcut).__name__}, not Sequential(Conv2d 1x1)")
    issues += _preact_issues(m, pairs, (nn.BatchNorm2d,), proj, "shortcut.0",
                             other_shortcut=shortcut is not None and proj is None)
    if issues:
        return "not the pre-activation unit fusedres fuses: " + "; ".join(issues)
    convs = [getattr(m, c) for _, c in pairs]
    new = _adopt(PreActBottleneck if bottleneck else PreActBasicBlock, m,
                 [n for pair in pairs for n in pair] + (["shortcut"] if shortcut is not None else []))
    new.in_channels, new.out_channels, new.fused = convs[0].in_channels, convs[-1].out_channels, True
    return new


_PLANS = (_plan_torchvision, _plan_timm_resnet, _plan_timm_resnetv2, _plan_preact)


# --------------------------------------------------------------------------------------------
# Verification: the candidate's own forward against what the fused block computes


def _bn(bn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """BatchNorm as ``nn.BatchNorm2d`` computes it in the module's mode (running statistics,
    momentum, ``momentum=None``, ``track_running_stats``) — what the fused path mirrors — and
    nothing a subclass's forward adds (BatchNormAct2d's activation is applied by the caller)."""
    return nn.modules.batchnorm._BatchNorm.forward(bn, h)


def _conv(conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """The convolution as the fused path computes it: weight, square stride and padding, nothing else."""
    return F.conv2d(h, conv.weight, None, conv.stride[0], conv.padding[0])


def _preact_unit(block: _PreActBlock, x: torch.Tensor) -> torch.Tensor:
    stages = block._stages()
    a = F.relu(_bn(stages[0][0], x))
    proj = block._projection()
    shortcut = F.conv2d(a, proj.weight, None, proj.stride[0]) if proj is not None else x
    h = _conv(stages[0][1], a)
    for bn, conv in stages[1:]:
        h = _conv(conv, F.relu(_bn(bn, h)))
    return h + shortcut


def _postact_unit(block: _PostActBlock, x: torch.Tensor) -> torch.Tensor:
    pairs = block._pairs()
    h = x
    for i, (conv, bn) in enumerate(pairs):
        h = _bn(bn, _conv(conv, h))
        if i < len(pairs) - 1:
            h = F.relu(h)
    ds = block._fused_downsample()
    if ds is not None:
        shortcut = _bn(ds[1], F.conv2d(x, ds[0].weight, None, ds[0].stride[0]))
    else:  # computed by the module, on the fused path too
        shortcut = block.downsample(x) if block.downsample is not None else x
    return F.relu(h + shortcut)


class _Unit(nn.Module):
    """What the fused block computes, from its parameters: under ``functional_call`` with the
    block's tensors prefixed ``block.``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.block, _PreActBlock):
            return _preact_unit(self.block, x)
        return _postact_unit(self.block, x)


class _RandomTensors:
    """Random float32 CPU tensors in place of a block's parameters and buffers; only shapes are
    read, so meta tensors work. Every weight is random: a zero-initialised last BatchNorm or
    convolution (timm's ``zero_init_last``) would hide the whole residual branch from the
    comparison. Tensors of one role and shape are drawn once per walk and shared by the blocks'
    verifications (each verification only needs its own tensors to be random)."""

    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(0)
        self.drawn: dict[tuple, torch.Tensor] = {}

    def like(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return torch.zeros(t.shape, dtype=t.dtype)  # num_batches_tracked: both sides count from 0
        role = "conv" if t.dim() >= 2 else "scale" if name.endswith(("running_var", "weight")) else "shift"
        key = (role, tuple(t.shape))
        if key not in self.drawn:
            # conv: He-scaled uniform (std sqrt(2 / fan_in)), so activations stay O(1)
            bound = (6.0 / max(1, t[0].numel())) ** 0.5 if role == "conv" else 0.5
            u = torch.empty(t.shape).uniform_(-bound, bound, generator=self.gen)
            self.drawn[key] = u + 1.0 if role == "scale" else u
        return self.drawn[key]

    def input(self, channels: int) -> torch.Tensor:
        # Odd sides (padding and ceil_mode edges); one sample of few pixels, because a full-size
        # block's convolutions cost in proportion to them (BatchNorm still sees >= 6 values).
        return torch.randn(1, channels, 5, 3, generator=self.gen)


def _signature(m: nn.Module) -> tuple[tuple, bool]:
    """What the verification of ``m`` depends on: its class and every submodule's class with
    the ``forward`` it runs (a patched one included), their settings and plain attributes
    (any other attribute by identity), and every tensor's shape. Blocks with equal signatures
    compute the same function of their tensors, so one verification serves them all. The flag
    says whether the signature holds no identity, so that it stays valid after the model is gone
    (an identity can be reused by another object)."""
    plain = (bool, int, float, str, tuple, type(None))
    parts, lasting = [], True
    for name, sub in m.named_modules():
        attrs = []
        for k, v in vars(sub).items():
            if not k.startswith("_") and k != "training":
                lasting = lasting and isinstance(v, plain)
                attrs.append((k, repr(v) if isinstance(v, plain) else id(v)))
        parts.append((name, type(sub), type(sub).forward, sub.extra_repr(), tuple(sorted(attrs))))
    shapes = tuple((n, tuple(t.shape)) for n, t in itertools.chain(m.named_parameters(), m.named_buffers()))
    return (tuple(parts), shapes), lasting


#: Verification results by lasting block signature, shared by every convert / inspect call of
#: the process (the layers of resnet50, resnet101 and resnet152 are verified once). Bounded.
_VERIFIED: dict[tuple, str | None] = {}
_VERIFIED_MAX = 1024


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Both sides run the same float32 operations, so they agree to a few roundings where the
    # functions are the same; any other function (dropout, another shortcut, another BatchNorm
    # update) differs by O(1) on these O(1) values.
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _verify(old: nn.Module, new: nn.Module, cin: int, rand: _RandomTensors) -> str | None:
    """None when ``old``'s forward computes the fused block ``new``'s function in eval and in
    training mode; else why not. Runs on random float32 CPU tensors swapped in with ``functional_call``:
    the model's own tensors are neither read nor touched (they may live on a GPU or the meta
    device)."""
    if list(old.state_dict()) != list(new.state_dict()):
        return "its state_dict holds other tensors than the fused block's"
    pool = {n: rand.like(n, t) for n, t in itertools.chain(old.named_parameters(), old.named_buffers())}
    new_names = [n for n, _ in itertools.chain(new.named_parameters(), new.named_buffers())]
    if any(n not in pool for n in new_names):
        return "the fused block would hold tensors the block does not"
    buffers = {n for n, _ in old.named_buffers()}
    x = rand.input(cin)
    unit = _Unit(new)
    modes = [(m, m.training) for m in itertools.chain(old.modules(), new.modules())]

    def tensors(names: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + n: pool[n].clone() if n in buffers else pool[n] for n in names}

    try:
        for training in (False, True):
            for m, _ in modes:
                m.training = training
            mode = "training" if training else "eval"
            t_old, t_new = tensors(list(pool)), tensors(new_names, "block.")
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                rng = torch.get_rng_state()
                try:
                    y_old = functional_call(old, t_old, (x.clone(),))
                except Exception as e:  # a forward that does not run on this input is not the unit we fuse
                    return f"its {mode} forward fails on a {tuple(x.shape)} input ({type(e).__name__}: {e})"
                drew = not torch.equal(rng, torch.get_rng_state())
                torch.manual_seed(0)
                try:
                    y_new = functional_call(unit, t_new, (x.clone(),))
                except Exception as e:
                    return f"its layers do not chain as the fused block's ({type(e).__name__}: {e})"
            if drew:
                return f"its {mode} forward draws random numbers (dropout?), which the fused block would not"
            if not (isinstance(y_old, torch.Tensor) and _same(y_old, y_new)):
                return f"its {mode} forward computes another function than the fused block"
            if any(not _same(t_old[n], t_new["block." + n]) for n in buffers if "block." + n in t_new):
                return f"its {mode} forward updates its buffers (BatchNorm statistics) otherwise"
    finally:
        for m, flag in modes:
            m.training = flag
    return None


def _in_channels(new: nn.Module) -> int:
    return new.in_channels if isinstance(new, _PreActBlock) else new._pairs()[0][0].in_channels


def _note(new: nn.Module) -> str | None:
    if isinstance(new, _PostActBlock) and new.downsample is not None and new._fused_downsample() is None:
        return "its downsample shortcut runs as a PyTorch module"
    return None


# --------------------------------------------------------------------------------------------
# The walk shared by convert and inspect


def _walk(model: nn.Module, replace: bool) -> ConversionReport:
    report = ConversionReport(type(model).__name__)
    rand = _RandomTensors()
    verified_here: dict[tuple, str | None] = {}  # signatures that hold identities of this model's objects

    def visit(parent: nn.Module, prefix: str) -> None:
        preact = []  # per child: whether it is (or becomes) a fused pre-activation block
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            preact.append(False)
            plan = None
            for recognise in _PLANS:
                plan = recognise(child)
                if plan is not None:
                    break
            if plan is None:
                visit(child, path)
                continue
            _check_declared_shapes(path, child)
            reason = plan if isinstance(plan, str) else "; ".join(_hook_issues(child)) or None
            if reason is None:
                key, lasting = _signature(child)
                verified = _VERIFIED if lasting else verified_here
                if key not in verified:
                    if len(verified) >= _VERIFIED_MAX:
                        verified.clear()
                    verified[key] = _verify(child, plan, _in_channels(plan), rand)
                reason = verified[key]
            if reason is not None:
                report.blocks.append(BlockReport(path, type(child).__name__, reason=reason))
                visit(child, path)
                continue
            module = type(plan).__module__
            into = f"{'fusedres' if module in ('fusedres.blocks', 'fusedres.resnet') else module}.{type(plan).__name__}"
            report.blocks.append(BlockReport(path, type(child).__name__, into=into, note=_note(plan)))
            # (a link goes into a block whose call takes the planned path: _PreActBlock._plannable)
            preact[-1] = isinstance(plan, _PreActBlock) and plan._plannable()
            if replace:
                setattr(parent, name, plan)
        if _linkable(parent) and any(a and b for a, b in itertools.pairwise(preact)):
            report.linked.append(prefix)
            if replace and type(parent) is nn.Sequential:
                parent.__class__ = PreActSequential

    visit(model, "")
    return report


def _linkable(parent: nn.Module) -> bool:
    """Whether ``parent`` runs its consecutive fused pre-activation blocks linked once converted:
    a :class:`fusedres.PreActSequential` already, or a plain ``nn.Sequential`` (its own forward,
    not a subclass's or an instance's), which :func:`convert` makes one — the same ``state_dict``,
    the same call."""
    return type(parent) in (nn.Sequential, PreActSequential) and "forward" not in parent.__dict__


def inspect(model: nn.Module, name: str | None = None) -> ConversionReport:
    """Which residual blocks of ``model`` :func:`convert` would fuse, and why it would leave the others.

    Nothing is changed; the blocks are verified exactly as :func:`convert` verifies them (with
    random CPU tensors of their tensors' shapes, so a model built on the meta device works).

    Args:
        model: any ``nn.Module``.
        name: how the report names the model (default: its class name).

    Returns:
        A :class:`ConversionReport`: ``str(report)`` is one line per residual block and a summary
        line; ``report.blocks`` holds :class:`BlockReport` entries (``path``, ``kind``, ``fused``,
        ``into``, ``reason``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inspect: expected an nn.Module, got {type(model).__name__}")
    report = _walk(model, replace=False)
    if name is not None:
        report.model = name
    return report


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every recognised residual block of ``model`` by its fused equivalent.

    Args:
        model: any ``nn.Module`` (torchvision and timm ResNets, hand-written pre-activation
            ResNets, ...), on CPU or CUDA, in train or eval mode.
        inplace: modify ``model`` itself (True) or a deep copy of it (False, the default).

    Returns:
        The converted model: the same parameters, buffers and ``state_dict`` keys, the same
        function in training and eval, fused blocks where recognised, and the plain
        ``nn.Sequential`` containers of consecutive fused pre-activation blocks made
        :class:`fusedres.PreActSequential` (linked; see the module's doc). Residual blocks that cannot
        be fused (and the case of nothing to convert) are named, each with its reason, in one
        warning; :func:`inspect` gives the same report without converting.

    Raises:
        ValueError: a block's tensors disagree with the shapes its layers declare.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = _walk(model, replace=True)
    left = [f"{b.path} ({b.kind}: {b.reason})" for b in report.left]
    if not report.fused:
        warnings.warn(f"fusedres.convert: nothing to convert in {type(model).__name__}; returned unchanged"
                      + (f" (not convertible: {', '.join(left)})" if left else ""), stacklevel=2)
    elif left:
        warnings.warn(f"fusedres.convert: left {len(left)} block(s) as they are: {', '.join(left)}", stacklevel=2)
    return model
