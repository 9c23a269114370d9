"""The fused computations behind the modules, and how they reach autograd and ``torch.compile``.

- :mod:`.specs` — what a call is asked to do (``ChainSpec``, ``PostActSpec``, ``StageSpec``) and
  where each tensor sits in the flat tensor list an impl takes (named accessors);
- :mod:`.batchnorm` — BatchNorm statistics and backward sums (SyncBatchNorm reductions
  included), the statistics one block hands to the next, and the module-side BatchNorm sequence
  (:func:`with_bn_modes`);
- :mod:`.memory` — the weight layout cache (bypassed under CUDA-graph capture) and empty outputs;
- :mod:`.preact` — the pre-activation chain and the BN-ReLU-pool head (``Chain``, ``Pool``);
- :mod:`.postact` — the post-activation (torchvision / timm) block (``PostAct``);
- :mod:`.dispatch` — an eager ``autograd.Function`` around each impl, or ``torch.library``
  custom ops under ``torch.compile`` (:func:`run`).
"""

from __future__ import annotations

from .batchnorm import BnMode, bn_mode, bn_modes, cumulative_update, sync_group, with_bn_modes
from .dispatch import Impl, autocast_dtype, define_ops, run
from .memory import capturing, kernel_weight
from .postact import PostAct
from .preact import Chain, Pool
from .specs import ChainInputs, ChainSpec, PostActInputs, PostActSpec, StageSpec

for _impl in (Chain, Pool, PostAct):
    define_ops(_impl)

__all__ = [
    "BnMode", "Chain", "ChainInputs", "ChainSpec", "Impl", "Pool", "PostAct", "PostActInputs", "PostActSpec",
    "StageSpec", "autocast_dtype", "bn_mode", "bn_modes", "capturing", "cumulative_update", "kernel_weight", "run",
    "sync_group", "with_bn_modes",
]
