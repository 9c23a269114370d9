"""fusedres: Triton-fused residual blocks for PyTorch."""

from . import functional, models
from ._runtime import launch_counts
from .blocks import PreActBasicBlock, PreActBottleneck
from .functional import bn_relu_conv2d

__all__ = ["PreActBasicBlock", "PreActBottleneck", "bn_relu_conv2d", "functional", "launch_counts", "models"]
__version__ = "0.1.0"
