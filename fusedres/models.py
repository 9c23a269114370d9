"""Pre-activation ResNets (He et al. 2016) built from the fused blocks.

``fused=False`` builds the identical network (same modules, same ``state_dict``) computing in
eager PyTorch: the baseline for tests and benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _runtime
from ._fused import autocast_dtype, with_bn_modes
from .blocks import PreActBasicBlock, PreActBottleneck, PreActSequential, run_stages
from .functional import bn_relu_avgpool

_Block = type[PreActBasicBlock] | type[PreActBottleneck]


class PreActResNet(nn.Module):
    """Stem → stages of pre-activation blocks → BN-ReLU → global average pool → linear.

    Args:
        block: :class:`PreActBasicBlock` or :class:`PreActBottleneck`.
        num_blocks: blocks per stage.
        widths: inner channels of each stage (the first stage has stride 1, the others 2).
        num_classes: outputs of the final linear layer.
        stem: ``"cifar"`` (3x3 conv to ``stem_channels``) or ``"imagenet"`` (7x7 stride-2 conv
            and 3x3 stride-2 max pool).
        stem_channels: channels out of the stem.
        fused: use the fused kernels (True) or eager PyTorch (False) in every block and the head.
    """

    def __init__(
        self,
        block: _Block,
        num_blocks: list[int],
        widths: list[int],
        *,
        num_classes: int,
        stem: str,
        stem_channels: int,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.fused = fused
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, stem_channels, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_channels, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            raise ValueError(f"PreActResNet: stem must be 'cifar' or 'imagenet', got {stem!r}")
        channels = stem_channels
        self.layers = nn.ModuleList()
        for i, (n, width) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(channels, width, stride, fused=fused))
                channels = width * block.expansion
            self.layers.append(PreActSequential(*blocks))
        self.bn = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.maxpool(self.conv1(x))
        h = run_stages(list(self.layers), h)  # (the head's BatchNorm is not linked: it counts its batch itself)
        amp = autocast_dtype(h.device)
        fused = self.fused and _runtime.triton_enabled(h.device) and (amp is None or h.dtype == amp)
        pooled = None
        if fused:
            bn = self.bn
            pooled = with_bn_modes([bn], lambda modes: bn_relu_avgpool(
                modes[0].stage(bn), h, bn.weight, bn.bias, modes[0].running_mean, modes[0].running_var))
        if pooled is None:
            pooled = F.relu(self.bn(h)).mean((2, 3))
        return self.linear(pooled)


def preact_resnet(depth: int, num_classes: int = 10, *, block: str = "auto", fused: bool = True) -> PreActResNet:
    """The CIFAR pre-activation ResNets of He et al. 2016.

    A 3x3 stem to 16 channels, three stages 16/32/64 wide (×4 out for bottlenecks), a final
    BN-ReLU, global average pooling and a linear layer. Basic blocks need depth = 6n+2,
    bottlenecks 9n+2; ``block="auto"`` picks bottlenecks for depth >= 164 (ResNet-164 and
    ResNet-1001 are bottleneck nets with 1.7M and 10.2M parameters; ResNet-110 is basic).
    """
    if block == "auto":
        block = "bottleneck" if depth >= 164 else "basic"
    if block == "basic":
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"preact_resnet: basic-block depth must be 6n+2 (8, 14, 20, ..., 110), got {depth}")
        cls, n = PreActBasicBlock, (depth - 2) // 6
    elif block == "bottleneck":
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"preact_resnet: bottleneck depth must be 9n+2 (11, 20, ..., 164, 1001), got {depth}")
        cls, n = PreActBottleneck, (depth - 2) // 9
    else:
        raise ValueError(f"preact_resnet: block must be 'auto', 'basic' or 'bottleneck', got {block!r}")
    return PreActResNet(cls, [n, n, n], [16, 32, 64], num_classes=num_classes, stem="cifar",
                        stem_channels=16, fused=fused)


def _imagenet(block: _Block, num_blocks: list[int], num_classes: int, fused: bool) -> PreActResNet:
    return PreActResNet(block, num_blocks, [64, 128, 256, 512], num_classes=num_classes, stem="imagenet",
                        stem_channels=64, fused=fused)


def preact_resnet18(num_classes: int = 1000, fused: bool = True) -> PreActResNet:
    """ImageNet pre-activation ResNet-18 (basic blocks, [2, 2, 2, 2])."""
    return _imagenet(PreActBasicBlock, [2, 2, 2, 2], num_classes, fused)


def preact_resnet34(num_classes: int = 1000, fused: bool = True) -> PreActResNet:
    """ImageNet pre-activation ResNet-34 (basic blocks, [3, 4, 6, 3])."""
    return _imagenet(PreActBasicBlock, [3, 4, 6, 3], num_classes, fused)


def preact_resnet50(num_classes: int = 1000, fused: bool = True) -> PreActResNet:
    """ImageNet pre-activation ResNet-50 (bottlenecks, [3, 4, 6, 3])."""
    return _imagenet(PreActBottleneck, [3, 4, 6, 3], num_classes, fused)


def preact_resnet101(num_classes: int = 1000, fused: bool = True) -> PreActResNet:
    """ImageNet pre-activation ResNet-101 (bottlenecks, [3, 4, 23, 3])."""
    return _imagenet(PreActBottleneck, [3, 4, 23, 3], num_classes, fused)


def preact_resnet152(num_classes: int = 1000, fused: bool = True) -> PreActResNet:
    """ImageNet pre-activation ResNet-152 (bottlenecks, [3, 8, 36, 3])."""
    return _imagenet(PreActBottleneck, [3, 8, 36, 3], num_classes, fused)
