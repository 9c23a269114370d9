"""What the suite measures, and the tiny stand-ins that interpreter smoke mode runs instead.

- Layers: the convolution layers of DESIGN.md §5 (plus one stride-2 layer), each kernel role and
  the fused op, bf16.
- Blocks: :class:`~fusedres.PreActBasicBlock` at the four ImageNet stage shapes and
  :class:`~fusedres.PreActBottleneck` at the three CIFAR-164 stage shapes, bf16, fp16 and
  fp32 (TF32), one training step and one eval forward.
- Networks: a CIFAR pre-activation ResNet-164, an ImageNet pre-activation ResNet-50, and
  torchvision's ResNet-50 and timm's pre-activation ``resnetv2_50`` after ``fusedres.convert``
  against the originals: one training step and one eval forward, bf16.

- CUDA graphs: the bf16 block training steps and the ResNet-164 step once more, each captured in
  a CUDA graph (fused and eager) and replayed, so that the CPU's launch overhead is left out;
  the compile column is the eager code under ``torch.compile(mode="reduce-overhead")``. Set
  against the plain rows they show how launch-bound the small CIFAR shapes are.

Cases marked ``quick`` make the ``--quick`` subset: bf16, the seven block training steps, the
five kernel roles at the five §5 layers, the ResNet-164 step, and the CUDA-graph training steps
of the three CIFAR bottleneck blocks (in that order: see ``conftest.ORDER``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fusedres
from fusedres import PreActBasicBlock, PreActBottleneck, models
from fusedres.testing import set_fused

QUICK = pytest.mark.quick


@dataclass(frozen=True)
class LayerShape:
    """One convolution layer: input (n, cin, hw, hw), a (cout, cin, ksize, ksize) kernel, padding ksize // 2."""

    name: str
    n: int
    cin: int
    cout: int
    hw: int
    ksize: int
    stride: int
    quick: bool = True


LAYER_SHAPES = [
    LayerShape("3x3 64->64 56^2 N256", 256, 64, 64, 56, 3, 1),
    LayerShape("3x3 128->128 28^2 N256", 256, 128, 128, 28, 3, 1),
    LayerShape("3x3 512->512 7^2 N256", 256, 512, 512, 7, 3, 1),
    LayerShape("1x1 64->16 32^2 N128", 128, 64, 16, 32, 1, 1),
    LayerShape("3x3 16->16 32^2 N128", 128, 16, 16, 32, 3, 1),
    LayerShape("3x3 64->128 s2 56^2 N256", 256, 64, 128, 56, 3, 2, quick=False),
]
SMOKE_LAYER_SHAPES = [
    LayerShape("smoke 3x3 8->8 6^2 N2", 2, 8, 8, 6, 3, 1),
    LayerShape("smoke 1x1 8->4 s2 6^2 N2", 2, 8, 4, 6, 1, 2),
]

#: Kernel roles (fusedres.ops.conv launchers) and the fused op; all but the op are in --quick.
ROLES = ["fprop", "fprop+bnrelu", "dgrad", "dgrad+bnbwd", "wgrad+bnrelu", "op fwd+bwd"]
QUICK_ROLES = ROLES[:5]


@dataclass(frozen=True)
class BlockCase:
    """A block (built on the CPU in fp32) and its input shape."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int, int]


# The headline cases first (the CIFAR bottlenecks, then the 56^2 basic block): a stage
# cut at its time limit on a lent GPU has measured those.
BLOCK_CASES = [
    BlockCase("PreActBottleneck 64/16ch 32^2 N128", lambda: PreActBottleneck(64, 16), (128, 64, 32, 32)),
    BlockCase("PreActBottleneck 128/32ch 16^2 N128", lambda: PreActBottleneck(128, 32), (128, 128, 16, 16)),
    BlockCase("PreActBottleneck 256/64ch 8^2 N128", lambda: PreActBottleneck(256, 64), (128, 256, 8, 8)),
    BlockCase("PreActBasicBlock 64ch 56^2 N256", lambda: PreActBasicBlock(64, 64), (256, 64, 56, 56)),
    BlockCase("PreActBasicBlock 128ch 28^2 N256", lambda: PreActBasicBlock(128, 128), (256, 128, 28, 28)),
    BlockCase("PreActBasicBlock 256ch 14^2 N256", lambda: PreActBasicBlock(256, 256), (256, 256, 14, 14)),
    BlockCase("PreActBasicBlock 512ch 7^2 N256", lambda: PreActBasicBlock(512, 512), (256, 512, 7, 7)),
]
SMOKE_BLOCK_CASES = [
    BlockCase("smoke PreActBasicBlock 8ch 6^2 N2", lambda: PreActBasicBlock(8, 8), (2, 8, 6, 6)),
    BlockCase("smoke PreActBottleneck 16/4ch 6^2 N2", lambda: PreActBottleneck(16, 4), (2, 16, 6, 6)),
]

#: test id -> (row label, dtype, TF32 allowed)
DTYPES = {
    "bf16": ("bfloat16", torch.bfloat16, False),
    "fp16": ("float16", torch.float16, False),
    "tf32": ("float32/tf32", torch.float32, True),
}
TRAIN, EVAL = "train step (fwd+bwd)", "eval forward"
#: The training step replayed from a CUDA graph (see the module docstring).
GRAPH = "train step, CUDA graph"


def _fusedres_twins(build: Callable[[], nn.Module]) -> Callable[[], tuple[nn.Module, nn.Module]]:
    def make() -> tuple[nn.Module, nn.Module]:
        fused = build()
        return fused, set_fused(copy.deepcopy(fused), False)

    return make


def _torchvision_converted(build: Callable[[], nn.Module]) -> Callable[[], tuple[nn.Module, nn.Module]]:
    """(``convert`` of ``build()``, the original): torchvision's or timm's."""

    def make() -> tuple[nn.Module, nn.Module]:
        original = build()
        return fusedres.convert(original), original  # convert works on a deep copy

    return make


def _torchvision_resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50()


def _torchvision_tiny_blocks() -> nn.Module:
    """torchvision's BasicBlock and Bottleneck at 8 channels in a small classifier: what
    ``convert`` replaces in a ResNet, small enough for the interpreter."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BasicBlock(8, 8), Bottleneck(8, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def convert_skip_reason() -> str | None:
    """Why the converted-torchvision case cannot run here, or None."""
    if not hasattr(fusedres, "convert"):
        return "fusedres.convert does not exist yet: no converted-vs-original torchvision row"
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return "torchvision is not installed (pip install -e '.[test]')"
    return None


def _timm_resnetv2_50() -> nn.Module:
    import timm

    return timm.create_model("resnetv2_50", pretrained=False)


def _timm_tiny_resnetv2() -> nn.Module:
    """timm's ResNetV2 at 8/16 channels, three blocks in its first stage (linked once converted)."""
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=[3, 1], channels=(8, 16), num_classes=10, stem_chs=8, conv_layer=create_conv2d,
                    norm_layer=BatchNormAct2d)


def timm_skip_reason() -> str | None:
    """Why the converted-timm case cannot run here, or None."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return "timm is not installed (pip install -e '.[test]')"
    return None


@dataclass(frozen=True)
class NetworkCase:
    """A network pair (fused, eager baseline), its input shape and class count."""

    name: str
    make: Callable[[], tuple[nn.Module, nn.Module]]
    input_shape: tuple[int, int, int, int]
    num_classes: int
    quick: bool = False
    skip_reason: Callable[[], str | None] = lambda: None
    graph: bool = False  # also a CUDA-graph training step row


NETWORK_CASES = [
    NetworkCase("preact_resnet(164) CIFAR 32^2 N128", _fusedres_twins(lambda: models.preact_resnet(164)),
                (128, 3, 32, 32), 10, quick=True, graph=True),
    NetworkCase("preact_resnet50 ImageNet 224^2 N64", _fusedres_twins(models.preact_resnet50),
                (64, 3, 224, 224), 1000),
    NetworkCase("torchvision resnet50 converted vs original 224^2 N64",
                _torchvision_converted(_torchvision_resnet50), (64, 3, 224, 224), 1000,
                skip_reason=convert_skip_reason),
    NetworkCase("timm resnetv2_50 converted vs original 224^2 N64", _torchvision_converted(_timm_resnetv2_50),
                (64, 3, 224, 224), 1000, skip_reason=timm_skip_reason),
]
# The real networks take minutes per step under the interpreter; these keep each code path.
SMOKE_NETWORK_CASES = [
    NetworkCase("smoke preact_resnet(11) CIFAR 8^2 N2",
                _fusedres_twins(lambda: models.preact_resnet(11, block="bottleneck")), (2, 3, 8, 8), 10,
                quick=True, graph=True),
    NetworkCase("smoke PreActResNet bottleneck [1,1,1,1] width 4 ImageNet-stem 32^2 N2",
                _fusedres_twins(lambda: models.PreActResNet(PreActBottleneck, [1, 1, 1, 1], [4, 4, 4, 4],
                                                            num_classes=10, stem="imagenet", stem_channels=8)),
                (2, 3, 32, 32), 10),
    NetworkCase("smoke torchvision BasicBlock+Bottleneck 8ch converted vs original 8^2 N2",
                _torchvision_converted(_torchvision_tiny_blocks), (2, 3, 8, 8), 10,
                skip_reason=convert_skip_reason),
    NetworkCase("smoke timm ResNetV2 [3,1] 8ch converted vs original 16^2 N2",
                _torchvision_converted(_timm_tiny_resnetv2), (2, 3, 16, 16), 10, skip_reason=timm_skip_reason),
]


def layer_params(smoke: bool) -> list:
    """pytest params (LayerShape, role) for this mode, quick-marked where both are quick."""
    return [
        pytest.param(shape, role, id=f"{shape.name}-{role}",
                     marks=[QUICK] if shape.quick and role in QUICK_ROLES else [])
        for shape in (SMOKE_LAYER_SHAPES if smoke else LAYER_SHAPES)
        for role in ROLES
    ]


def block_params(smoke: bool) -> list:
    """pytest params (BlockCase, dtype id, pass) for this mode; the bf16 training steps are quick."""
    return [
        pytest.param(case, dt, pass_name, id=f"{case.name}-{dt}-{'train' if pass_name == TRAIN else 'eval'}",
                     marks=[QUICK] if dt == "bf16" and pass_name == TRAIN else [])
        for case in (SMOKE_BLOCK_CASES if smoke else BLOCK_CASES)
        for dt in DTYPES
        for pass_name in (TRAIN, EVAL)
    ]


def network_params(smoke: bool) -> list:
    """pytest params (NetworkCase, pass) for this mode; the quick cases' training steps are quick."""
    return [pytest.param(case, pass_name, id=f"{case.name}-{'train' if pass_name == TRAIN else 'eval'}",
                         marks=[QUICK] if case.quick and pass_name == TRAIN else [])
            for case in (SMOKE_NETWORK_CASES if smoke else NETWORK_CASES)
            for pass_name in (TRAIN, EVAL)]


def block_graph_params(smoke: bool) -> list:
    """pytest params (BlockCase) of the bf16 CUDA-graph training steps; quick for the CIFAR
    bottleneck blocks (the launch-bound candidates)."""
    return [pytest.param(case, id=f"{case.name}-bf16-graph",
                         marks=[QUICK] if "Bottleneck" in case.name else [])
            for case in (SMOKE_BLOCK_CASES if smoke else BLOCK_CASES)]


def network_graph_params(smoke: bool) -> list:
    """pytest params (NetworkCase) of the CUDA-graph training steps (bf16); none is quick."""
    return [pytest.param(case, id=f"{case.name}-graph")
            for case in (SMOKE_NETWORK_CASES if smoke else NETWORK_CASES) if case.graph]
