"""fusedres: Triton-fused residual blocks for PyTorch."""

from . import functional
from ._runtime import launch_counts
from .functional import bn_relu_conv2d

__all__ = ["bn_relu_conv2d", "functional", "launch_counts"]
__version__ = "0.1.0"
