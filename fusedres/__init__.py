"""fusedres: Triton-fused residual blocks for PyTorch."""

from . import functional, models
from ._runtime import launch_counts
from .blocks import PreActBasicBlock, PreActBottleneck, PreActSequential
from .convert import ConversionReport, convert, inspect
from .functional import bn_relu_conv2d
from .resnet import BasicBlock, Bottleneck

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ConversionReport",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActSequential",
    "bn_relu_conv2d",
    "convert",
    "functional",
    "inspect",
    "launch_counts",
    "models",
]
__version__ = "0.1.0"
