"""What a fused computation is asked to do (the specs), and where each tensor sits in the flat
tensor list it takes (the layouts): the custom ops of :mod:`.dispatch` pass tensors as one
``Tensor[]``, so every impl reads its inputs by position — through the named accessors here, never
by index arithmetic at the call site."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

Tensors = Sequence[Optional[torch.Tensor]]


@dataclass(frozen=True)
class StageSpec:
    """One ``conv(relu(bn(h)))`` stage of a chain: its convolution geometry and BatchNorm mode.

    ``group``: a ``torch.distributed`` process group over which the batch statistics are
    synchronised (SyncBatchNorm in training), or None.
    """

    stride: int
    padding: int
    eps: float
    momentum: float
    batch_stats: bool  # normalise with batch statistics (training, or no running statistics)
    group: Any = None


@dataclass(frozen=True)
class ChainSpec:
    """A chain of stages plus how the last stage's output is shortcut-added.

    ``shortcut``: ``"none"``; ``"residual"`` (a tensor argument, as in ``bn_relu_conv2d``);
    ``"identity"`` (the chain's input x); ``"projection"`` (a 1x1 convolution with stride
    ``proj_stride`` of the first stage's activation relu(bn1(x)), as in He et al. 2016).
    ``out_channels_last``: return the output channels_last (else contiguous), as
    ``F.conv2d`` would for the caller's operands.
    """

    stages: tuple[StageSpec, ...]
    shortcut: str = "none"
    proj_stride: int = 1
    out_channels_last: bool = True


@dataclass(frozen=True)
class PostActSpec:
    """A post-activation (torchvision) residual block:
    ``relu(bn_L(conv_L(... relu(bn_1(conv_1(x))) ...)) + shortcut)``.

    ``convs`` holds each convolution's (stride, padding); ``bns`` each BatchNorm's mode, in
    order (one per convolution); ``downsample`` the (stride, BatchNorm mode) of a
    conv1x1 + BatchNorm shortcut, or None for the identity or an externally computed shortcut.
    """

    convs: tuple[tuple[int, int], ...]
    bns: tuple[StageSpec, ...]
    downsample: tuple[int, StageSpec] | None = None
    out_channels_last: bool = True


SHORTCUTS = ("none", "residual", "identity", "projection")


def stage_ints(st: StageSpec) -> list[int]:
    return [st.stride, st.padding, int(st.batch_stats)]


def stage_from(ints: Sequence[int], floats: Sequence[float]) -> StageSpec:
    return StageSpec(int(ints[0]), int(ints[1]), float(floats[0]), float(floats[1]), bool(ints[2]))


# --------------------------------------------------------------------------------------------
# Layouts of the flat tensor lists

#: Offsets of a BatchNorm's four tensors from its first (the weight).
BN_WEIGHT, BN_BIAS, BN_RUNNING_MEAN, BN_RUNNING_VAR = range(4)


class ChainInputs:
    """Chain's tensors: x, residual, proj_weight, then per stage (conv weight, then its
    BatchNorm's weight, bias, running mean, running var)."""

    X, RESIDUAL, PROJ_WEIGHT = 0, 1, 2
    _FIRST, _PER_STAGE = 3, 5

    @staticmethod
    def weight(stage: int) -> int:
        """Index of the stage's convolution weight."""
        return ChainInputs._FIRST + ChainInputs._PER_STAGE * stage

    @staticmethod
    def bn(stage: int) -> int:
        """Index of the stage's BatchNorm weight; its bias, running mean and running var follow
        (offsets ``BN_*``)."""
        return ChainInputs.weight(stage) + 1

    @staticmethod
    def stage(t: Sequence[Any], stage: int) -> Sequence[Any]:
        """The stage's (conv weight, bn weight, bn bias, running mean, running var) entries of
        ``t`` (tensors, or the matching ``needs_input_grad`` flags)."""
        first = ChainInputs.weight(stage)
        return t[first : first + ChainInputs._PER_STAGE]

    @staticmethod
    def stages(t: Sequence[Any]) -> int:
        """How many stages a tensor list of this layout holds."""
        return (len(t) - ChainInputs._FIRST) // ChainInputs._PER_STAGE


class PoolInputs:
    """Pool's tensors: x, then its BatchNorm's weight, bias, running mean, running var."""

    X, BN = 0, 1


@dataclass(frozen=True)
class PostActInputs:
    """PostAct's tensors for ``convs`` convolutions: x, an external shortcut (or None), the conv
    weights, each conv's BatchNorm (weight, bias, running mean, running var), then — with a
    downsample — its conv weight and its BatchNorm's four."""

    convs: int
    downsample: bool

    X, SHORTCUT = 0, 1

    def weight(self, i: int) -> int:
        """Index of convolution i's weight (``i == convs``: the downsample's)."""
        return 2 + i if i < self.convs else 2 + self.convs + 4 * self.convs

    def bn(self, i: int) -> int:
        """Index of BatchNorm i's weight (``i == convs``: the downsample's); its bias, running mean
        and running var follow (offsets ``BN_*``)."""
        return 2 + self.convs + 4 * i if i < self.convs else self.weight(self.convs) + 1

    @property
    def bns(self) -> int:
        """How many BatchNorms: one per convolution, plus the downsample's."""
        return self.convs + int(self.downsample)

    @staticmethod
    def of(spec: PostActSpec) -> PostActInputs:
        return PostActInputs(len(spec.convs), spec.downsample is not None)
