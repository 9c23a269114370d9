"""Fused blocks that keep another library's module names, ``state_dict`` keys and eager forward.

:func:`fusedres.convert` makes them from timm's blocks: the adapter holds the very submodules of
the block it replaces (timm's names, registered in timm's order) and runs the fused kernels of
:mod:`fusedres.blocks` / :mod:`fusedres.resnet`; its eager path (``fused=False``, or a device
the kernels don't run on) is timm's own ``forward`` on those submodules.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .blocks import _PreActBlock
from .resnet import _PostActBlock


class TimmPreActBlock(_PreActBlock):
    """timm's ResNetV2 ``PreActBasic`` / ``PreActBottleneck`` on the fused pre-activation chain.

    ``norm1/conv1/norm2/conv2[/norm3/conv3]`` are the stages (``BatchNormAct2d`` with ReLU), and
    ``downsample.conv`` the 1x1 projection of the pre-activated input. Made by :func:`convert` only.
    """

    _timm_cls: type[nn.Module]

    @property
    def _planned_bns(self) -> tuple[type[nn.Module], ...]:
        # BatchNormAct2d: a BatchNorm2d whose own forward also applies the activation (ReLU,
        # checked by convert), which the fused chain applies itself: its per-call state is
        # nn.BatchNorm2d's, what the planned path reads
        return _timm_planned_bns()

    def _projection(self) -> nn.Conv2d | None:
        return self.downsample.conv if self.downsample is not None else None

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        return self._timm_cls.forward(self, x)


@functools.cache
def _timm_planned_bns() -> tuple[type[nn.Module], ...]:
    from timm.layers import BatchNormAct2d  # (timm is there: this block is made from its modules)

    return nn.BatchNorm2d, BatchNormAct2d


class TimmPostActBlock(_PostActBlock):
    """timm's ResNet ``BasicBlock`` / ``Bottleneck`` on the fused post-activation path.

    The ``conv*/bn*`` pairs run as the torchvision blocks do (one fused Function in training,
    BatchNorm folded into the convolutions in eval under ``no_grad``); a ``downsample`` that is
    ``Sequential(Conv2d 1x1, BatchNorm2d)`` is fused too, any other (the -d variants'
    ``Sequential(AvgPool2d, Conv2d, BatchNorm2d)``) runs as a module and its output is added in
    the fused closing pass. ``act*``, ``aa`` and ``drop_block`` stay registered (for timm's
    forward and names); :func:`convert` makes this block only where they are ReLU and identities.
    """

    _timm_cls: type[nn.Module]

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        return self._timm_cls.forward(self, x)
