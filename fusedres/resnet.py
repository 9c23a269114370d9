"""Fused drop-ins for torchvision's post-activation ``BasicBlock`` and ``Bottleneck``.

Same constructor signature and attribute names as torchvision's, so
``torchvision.models.resnet.ResNet(fusedres.Bottleneck, [3, 4, 6, 3])`` builds a ResNet-50
whose ``state_dict`` is torchvision's. Training (and eval with gradients) runs one fused
autograd Function per block; eval under ``torch.no_grad()`` folds each BatchNorm into its
convolution (folded weights cached against the parameters' and buffers' versions), so a block
is two or three convolution launches and nothing else.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import _runtime
from ._fused import BnMode, PostActSpec, autocast_dtype, capturing, kernel_weight, with_bn_modes
from .functional import (
    _check_block_convs,
    _check_block_devices,
    _check_single_values,
    _misplaced,
    _wants_channels_last,
    post_act_block,
)
from .ops import conv as conv_ops
from .ops import route

#: Norm layers the fused path computes (SyncBatchNorm: statistics reduced over its process group).
_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    pad = dilation if k == 3 else 0
    return nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False, dilation=dilation)


class _PostActBlock(nn.Module):
    """Shared forward of the torchvision-style blocks: (conv, bn) pairs, then relu(... + shortcut)."""

    expansion = 1
    _pair_names: tuple[tuple[str, str], ...] = ()

    def _pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        return [(getattr(self, c), getattr(self, b)) for c, b in self._pair_names]

    def _init_fusion(self, why_not: str | None) -> None:
        self.fused = True
        self._fold_cache: tuple[tuple, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        if why_not is None and any(type(bn) not in _BATCHNORMS for _, bn in self._pairs()):
            why_not = f"norm layer {type(self._pairs()[0][1]).__name__} (only nn.BatchNorm2d is fused)"
        if why_not is not None:
            self.fused = False
            warnings.warn(f"fusedres.{type(self).__name__}: {why_not}; this block runs plain PyTorch",
                          stacklevel=3)

    def _fused_downsample(self) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
        ds = self.downsample
        if (isinstance(ds, nn.Sequential) and len(ds) == 2 and type(ds[0]) is nn.Conv2d
                and type(ds[1]) in _BATCHNORMS and ds[0].kernel_size == (1, 1) and ds[0].bias is None
                and ds[0].groups == 1 and ds[0].padding == (0, 0) and ds[0].dilation == (1, 1)
                and ds[0].stride[0] == ds[0].stride[1]):
            return ds[0], ds[1]
        return None

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's forward, with the same submodules."""
        pairs = self._pairs()
        h = x
        for i, (conv, bn) in enumerate(pairs):
            h = bn(conv(h))
            if i < len(pairs) - 1:
                h = self.relu(h)
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(h + identity)

    def _check(self, x: torch.Tensor, amp: torch.dtype | None = None) -> None:
        name = f"fusedres.{type(self).__name__}"
        pairs = self._pairs()
        cin = pairs[0][0].in_channels
        if x.dim() != 4 or x.shape[1] != cin:
            raise ValueError(f"{name}: expected a 4-D input with {cin} channels, got {tuple(x.shape)}")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{name}: empty images are not supported, got input size {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name}: the fused kernels compute in float32, float16 or bfloat16, "
                            f"got {x.dtype} (set block.fused = False to run it in eager PyTorch)")
        for conv, _ in pairs:
            if amp is None and conv.weight.dtype != x.dtype:
                raise TypeError(f"{name}: input dtype {x.dtype} differs from the weights' {conv.weight.dtype}")
        modules = [m for pair in pairs for m in pair]
        if self.downsample is not None:  # (a downsample nested deeper runs as a module: PyTorch checks it)
            modules += [self.downsample, *self.downsample.children()]
        if _misplaced(modules, x.device):
            _check_block_devices(name, self, x)
        _check_block_convs(name, [(c, self._modules[c]) for c, _ in self._pair_names])
        if x.shape[0] != 1:  # a batch of two or more always gives a BatchNorm two values
            return
        h, w = x.shape[2], x.shape[3]
        sizes = []  # the (H, W) each BatchNorm normalises over
        for conv, bn in pairs:
            h = conv_ops.conv_out_size(h, conv.kernel_size[0], conv.stride[0], conv.padding[0])
            w = conv_ops.conv_out_size(w, conv.kernel_size[0], conv.stride[0], conv.padding[0])
            sizes.append((bn, (h, w)))
        _check_single_values(name, x, sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"fusedres.{type(self).__name__}: input must be a tensor, got {type(x).__name__}")
        amp = autocast_dtype(x.device)
        if not self.fused or not _runtime.triton_enabled(x.device) or (amp is not None and x.dtype != amp):
            # Under autocast an input in another dtype (fp32 into the first block) is promoted by
            # eager PyTorch's final add: the modules' own forward gives exactly that.
            return self.forward_eager(x)
        self._check(x, amp)
        if x.shape[0] == 0:  # an empty batch: eager PyTorch's result and buffer updates
            return self.forward_eager(x)
        pairs = self._pairs()
        ds = self._fused_downsample()
        all_bns = [bn for _, bn in pairs] + ([ds[1]] if ds else [])
        out_cl = _wants_channels_last(x, *(conv.weight for conv, _ in pairs))
        foldable = not self.training and all(bn.running_mean is not None for bn in all_bns)
        if foldable and not torch.is_grad_enabled() and amp is None and not torch.compiler.is_compiling():
            out = self._forward_folded(x, pairs, ds)
            return out if out_cl else out.contiguous()

        def weight(conv: nn.Conv2d) -> torch.Tensor:
            w = conv.weight
            return w if amp is None else w.to(dtype=amp, memory_format=torch.channels_last)

        def compute(modes: list[BnMode]) -> torch.Tensor:
            tensors: list[torch.Tensor | None] = []
            for m, (_, bn) in zip(modes, pairs):
                tensors += [bn.weight, bn.bias, m.running_mean, m.running_var]
            ds_spec = None
            if ds is not None:
                m = modes[-1]
                ds_spec = (ds[0].stride[0], m.stage(ds[1]))
                tensors += [weight(ds[0]), ds[1].weight, ds[1].bias, m.running_mean, m.running_var]
            shortcut = self.downsample(x) if (self.downsample is not None and ds is None) else None
            spec = PostActSpec(tuple((c.stride[0], c.padding[0]) for c, _ in pairs),
                               tuple(m.stage(bn) for m, (_, bn) in zip(modes, pairs)), ds_spec,
                               out_channels_last=out_cl)
            return post_act_block(spec, x, [weight(c) for c, _ in pairs] + tensors, shortcut=shortcut)

        out = with_bn_modes(all_bns, compute)
        if out is None:  # SyncBatchNorm under torch.compile: the modules' own forward
            return self.forward_eager(x)
        return out

    def _folded(self, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(conv weight * bn scale in channels_last, bn shift in fp32) per pair, cached by version."""
        tensors = [t for conv, bn in pairs for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
                   if t is not None]
        key = tuple((t._version, t.data_ptr(), t.dtype) for t in tensors)
        in_graph = capturing(tensors[0])  # a CUDA graph folds on every replay: no cache
        if in_graph or self._fold_cache is None or self._fold_cache[0] != key:
            folded = []
            for conv, bn in pairs:
                scale = torch.rsqrt(bn.running_var.float() + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight.float()
                shift = -bn.running_mean.float() * scale
                if bn.bias is not None:
                    shift = shift + bn.bias.float()
                w = (conv.weight.float() * scale[:, None, None, None]).to(conv.weight.dtype)
                folded.append((kernel_weight(w.detach()), shift.detach()))
            if in_graph:
                return folded
            self._fold_cache = (key, folded)
        return self._fold_cache[1]

    def _forward_folded(self, x: torch.Tensor, pairs: list, ds: tuple | None) -> torch.Tensor:
        """Eval: BatchNorm folded into each convolution; the shift, the shortcut and the ReLUs
        ride in the convolution epilogues."""
        folded = self._folded(pairs + ([ds] if ds else []))
        h = x
        for (conv, _), (w, shift) in zip(pairs[:-1], folded):
            h, _ = route.conv_fprop(h, w, stride=conv.stride[0], padding=conv.padding[0],
                                       out_shift=shift, out_relu=True)
        if ds is not None:
            w, shift = folded[-1]
            identity, _ = route.conv_fprop(x, w, stride=ds[0].stride[0], padding=0, out_shift=shift)
        else:
            identity = self.downsample(x) if self.downsample is not None else x
        conv = pairs[-1][0]
        w, shift = folded[len(pairs) - 1]
        out, _ = route.conv_fprop(h, w, stride=conv.stride[0], padding=conv.padding[0], residual=identity,
                                     out_shift=shift, out_relu=True)
        return out


class BasicBlock(_PostActBlock):
    """torchvision's ``BasicBlock`` (conv3x3-bn-relu-conv3x3-bn, + identity, relu), fused.

    Same arguments and errors as ``torchvision.models.resnet.BasicBlock``.
    """

    expansion = 1
    _pair_names = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")  # torchvision's own error
        self.conv1 = _conv(inplanes, planes, 3, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_fusion(None)


class Bottleneck(_PostActBlock):
    """torchvision's ``Bottleneck`` (1x1, 3x3(stride), 1x1 ×4, each with bn; + identity, relu), fused.

    Same arguments as ``torchvision.models.resnet.Bottleneck``; ``groups > 1`` (ResNeXt) and
    ``dilation > 1`` build and run in plain PyTorch, with a warning.
    """

    expansion = 4
    _pair_names = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv(inplanes, width, 1)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv(width, width, 3, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv(width, planes * self.expansion, 1)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        why_not = None
        if groups != 1 or dilation != 1:
            why_not = f"groups={groups}, dilation={dilation} (the fused kernels take groups=1, dilation=1)"
        self._init_fusion(why_not)
