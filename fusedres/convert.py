"""``fusedres.convert``: swap the residual blocks of an existing model for fused ones.

Recognised blocks:

- torchvision ``BasicBlock`` / ``Bottleneck`` → :class:`fusedres.BasicBlock` / :class:`fusedres.Bottleneck`;
- plain-PyTorch pre-activation blocks in the common style (``bn1, conv1, bn2, conv2[, bn3, conv3]``
  and an optional ``shortcut = Sequential(Conv2d 1x1)``) → :class:`fusedres.PreActBasicBlock` /
  :class:`fusedres.PreActBottleneck`;
- timm's ResNetV2 ``PreActBasic`` / ``PreActBottleneck`` (BatchNormAct2d with ReLU, plain
  convolutions, ``DownsampleConv`` projection, no stochastic depth) → a fused block that keeps
  timm's names and uses timm's own forward as its eager path.

Pre-activation candidates are recognised by structure and then verified: the candidate's own
forward must equal the pre-activation unit on a random input (float64, eval, on a CPU copy)
before it is replaced. The new blocks reuse the very submodules — the same parameter and buffer
tensors, the same ``state_dict`` keys.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .blocks import PreActBasicBlock, PreActBottleneck, _PreActBlock
from .resnet import BasicBlock, Bottleneck


class TimmPreActBlock(_PreActBlock):
    """timm's ResNetV2 pre-activation block (its names, its state_dict) on the fused chain.

    Made by :func:`convert` only; the eager path is timm's own forward.
    """

    _timm_cls: type[nn.Module]

    def _projection(self) -> nn.Conv2d | None:
        return self.downsample.conv if self.downsample is not None else None

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        return self._timm_cls.forward(self, x)


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


def _torchvision_types() -> tuple[type, type] | None:
    try:
        from torchvision.models.resnet import BasicBlock as TVBasic
        from torchvision.models.resnet import Bottleneck as TVBottleneck
    except ImportError:
        return None
    return TVBasic, TVBottleneck


def _adopt(cls: type[nn.Module], old: nn.Module, names: list[str]) -> nn.Module:
    """An instance of ``cls`` that holds ``old``'s submodules (the same tensors) under the same
    names, registered in ``old``'s order so that the ``state_dict`` keys come out identical."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    order = [n for n, _ in old.named_children() if n in names] + [n for n in names if n not in old._modules]
    for n in order:
        setattr(new, n, getattr(old, n))
    new.train(old.training)
    return new


def _from_torchvision(old: nn.Module, bottleneck: bool) -> nn.Module:
    cls = Bottleneck if bottleneck else BasicBlock
    names = ["conv1", "bn1", "conv2", "bn2", "relu", "downsample"] + (["conv3", "bn3"] if bottleneck else [])
    new = _adopt(cls, old, names)
    new.stride = old.stride
    conv2 = new.conv2
    why_not = None
    if conv2.groups != 1 or conv2.dilation != (1, 1):
        why_not = f"groups={conv2.groups}, dilation={conv2.dilation[0]} (the fused kernels take groups=1, dilation=1)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convert() names every block it leaves in its one warning
        new._init_fusion(why_not)
    return new


def _conv_ok(conv: object, k: int, stride: int | None = None) -> bool:
    return (type(conv) is nn.Conv2d and conv.bias is None and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2)
            and conv.stride[0] == conv.stride[1] and (stride is None or conv.stride[0] == stride)
            and conv.padding_mode == "zeros")


def _preact_candidate(m: nn.Module) -> nn.Module | None:
    """A fused pre-activation block holding ``m``'s submodules if ``m`` has the common layout."""
    bottleneck = hasattr(m, "bn3") and hasattr(m, "conv3")
    pairs = [("bn1", "conv1"), ("bn2", "conv2")] + ([("bn3", "conv3")] if bottleneck else [])
    if not all(type(getattr(m, b, None)) is nn.BatchNorm2d for b, _ in pairs):
        return None
    convs = [getattr(m, c, None) for _, c in pairs]
    kernels = (1, 3, 1) if bottleneck else (3, 3)
    stride_at = 1 if bottleneck else 0
    if not all(_conv_ok(c, k) for c, k in zip(convs, kernels)):
        return None
    stride = convs[stride_at].stride[0]
    if any(c.stride[0] != 1 for i, c in enumerate(convs) if i != stride_at):
        return None
    bns = [getattr(m, b) for b, _ in pairs]
    chain_ok = all(bn.num_features == c.in_channels for bn, c in zip(bns, convs)) and all(
        a.out_channels == b.in_channels for a, b in zip(convs, convs[1:]))
    cin, cout = convs[0].in_channels, convs[-1].out_channels
    shortcut = getattr(m, "shortcut", None)
    if shortcut is not None:
        if not (isinstance(shortcut, nn.Sequential) and len(shortcut) == 1 and _conv_ok(shortcut[0], 1, stride)
                and shortcut[0].in_channels == cin and shortcut[0].out_channels == cout):
            return None
    elif stride != 1 or cin != cout:
        return None
    if not chain_ok:
        return None
    cls = PreActBottleneck if bottleneck else PreActBasicBlock
    names = [n for pair in pairs for n in pair] + (["shortcut"] if shortcut is not None else [])
    new = _adopt(cls, m, names)
    new.in_channels, new.out_channels, new.fused = cin, cout, True
    return new


def _timm_candidate(m: nn.Module) -> nn.Module | None:
    """A fused block holding a timm ResNetV2 pre-activation block's submodules, if it is one we fuse."""
    try:
        from timm.layers import BatchNormAct2d
        from timm.models.resnetv2 import DownsampleConv
        from timm.models.resnetv2 import PreActBasic as TimmBasic
        from timm.models.resnetv2 import PreActBottleneck as TimmBottleneck
    except ImportError:
        return None
    if type(m) not in (TimmBasic, TimmBottleneck):
        return None
    bottleneck = type(m) is TimmBottleneck
    pairs = [("norm1", "conv1"), ("norm2", "conv2")] + ([("norm3", "conv3")] if bottleneck else [])
    norms_ok = all(type(getattr(m, n)) is BatchNormAct2d and type(getattr(m, n).act) is nn.ReLU
                   and isinstance(getattr(m, n).drop, nn.Identity) for n, _ in pairs)
    ds = m.downsample
    ds_ok = ds is None or (type(ds) is DownsampleConv and isinstance(ds.norm, nn.Identity) and _conv_ok(ds.conv, 1))
    kernels = (1, 3, 1) if bottleneck else (3, 3)
    convs_ok = all(_conv_ok(getattr(m, c), k) for (_, c), k in zip(pairs, kernels))
    if not (norms_ok and ds_ok and convs_ok and isinstance(m.drop_path, nn.Identity)):
        return None
    new = _adopt(TimmPreActBlock, m, [n for n, _ in m.named_children()])
    new._timm_cls = type(m)
    new._stage_names = tuple(pairs)
    new.in_channels = m.conv1.in_channels
    new.out_channels = getattr(m, pairs[-1][1]).out_channels
    new.fused = True
    return new


def _same_function(old: nn.Module, new: nn.Module) -> bool:
    """Does ``old``'s forward compute ``new``'s pre-activation unit? Checked in float64 on CPU
    copies in eval mode with random statistics, so the model itself is not touched."""
    a, b = copy.deepcopy(old).cpu().double().eval(), copy.deepcopy(new).cpu().double().eval()
    gen = torch.Generator().manual_seed(0)
    for m in list(a.modules()):
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
    if list(a.state_dict()) != list(b.state_dict()):
        return False  # extra parameters or buffers: not the plain unit, and keys would change
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, new.in_channels, 8, 8, generator=gen, dtype=torch.float64)
    try:
        with torch.no_grad():
            ya, yb = a(x), b.unit_reference(x)
    except Exception:  # a forward that does not run on this input is not the unit we fuse
        return False
    return ya.shape == yb.shape and torch.allclose(ya, yb, rtol=1e-9, atol=1e-9)


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every recognised residual block of ``model`` by its fused equivalent.

    Args:
        model: any ``nn.Module`` (torchvision ResNets, hand-written pre-activation ResNets, ...),
            on CPU or CUDA, in train or eval mode.
        inplace: modify ``model`` itself (True) or a deep copy of it (False, the default).

    Returns:
        The converted model: the same parameters, buffers and ``state_dict`` keys, the same
        function, fused blocks where recognised. Blocks that look residual but cannot be fused
        (and the case of nothing to convert) are named in one warning.

    Raises:
        ValueError: a block's tensors disagree with the shapes its layers declare.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    tv = _torchvision_types()
    converted, skipped = [], []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            new = None
            if tv is not None and type(child) in tv:
                _check_declared_shapes(path, child)
                new = _from_torchvision(child, bottleneck=type(child) is tv[1])
                if not new.fused:
                    skipped.append(f"{path} ({type(child).__name__}: groups/dilation/norm not fused)")
                    new = None
            elif (hasattr(child, "bn1") and hasattr(child, "conv1") and hasattr(child, "bn2")) or (
                    hasattr(child, "norm1") and hasattr(child, "conv1") and hasattr(child, "norm2")):
                _check_declared_shapes(path, child)
                candidate = _preact_candidate(child) or _timm_candidate(child)
                if candidate is not None and _same_function(child, candidate):
                    new = candidate
                else:
                    skipped.append(f"{path} ({type(child).__name__}: not the pre-activation unit fusedres fuses)")
            if new is not None:
                setattr(parent, name, new)
                converted.append(path)
            else:
                visit(child, path)

    visit(model, "")
    if not converted:
        warnings.warn(f"fusedres.convert: nothing to convert in {type(model).__name__}; returned unchanged"
                      + (f" (not convertible: {', '.join(skipped)})" if skipped else ""), stacklevel=2)
    elif skipped:
        warnings.warn(f"fusedres.convert: left {len(skipped)} block(s) as they are: {', '.join(skipped)}",
                      stacklevel=2)
    return model
