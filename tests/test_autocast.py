"""Autocast: the fused blocks compute in the autocast dtype as nn.Conv2d would, the output dtype
is what eager PyTorch gives for the same block, and BatchNorm parameters and statistics stay
fp32.

A torchvision block given an input in another dtype than the autocast dtype (fp32 into the first
block) runs its modules' own forward, as the README says: there eager PyTorch rounds bn2's output
to the autocast dtype and adds the fp32 identity in fp32, which the fused closing pass (one
rounding of relu(bn(y) + shortcut)) does not reproduce. The test asserts that no kernel runs in
that case and that every other case launches its kernels, forward and backward.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from _helpers import CHAIN_KERNELS, HEAD_KERNELS, POSTACT_KERNELS, launched, nothing_launched
from torch import nn

import fusedres
from fusedres.models import PreActResNet
from fusedres.testing import rel_error, set_fused


def _cases() -> dict[str, tuple]:
    from torchvision.models.resnet import BasicBlock as TvBasic
    from torchvision.models.resnet import Bottleneck as TvBottleneck

    def tv_downsample() -> nn.Module:
        ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        return fusedres.convert(nn.Sequential(TvBottleneck(8, 4, 2, downsample=ds)))

    return {
        # (fp16 autocast behaves the same; bf16 is what both cpu and cuda autocast support)
        # name: (build, input shape, kernels the fused training step launches)
        "PreActBasicBlock identity": (lambda: fusedres.PreActBasicBlock(8, 8), (2, 8, 6, 6), CHAIN_KERNELS),
        "PreActBasicBlock projection s2": (lambda: fusedres.PreActBasicBlock(8, 12, 2), (2, 8, 6, 6),
                                           CHAIN_KERNELS),
        "PreActBottleneck": (lambda: fusedres.PreActBottleneck(16, 4), (2, 16, 5, 5), CHAIN_KERNELS),
        # the stem, stages and head under autocast (preact_resnet(11)'s at a quarter of its widths)
        "bottleneck network": (lambda: PreActResNet(fusedres.PreActBottleneck, [1, 1, 1], [4, 8, 16], num_classes=10,
                                                    stem="cifar", stem_channels=16), (2, 3, 8, 8),
                               CHAIN_KERNELS + HEAD_KERNELS),
        "torchvision BasicBlock converted": (lambda: fusedres.convert(nn.Sequential(TvBasic(8, 8))), (2, 8, 6, 6),
                                             POSTACT_KERNELS),
        "torchvision Bottleneck downsample converted": (tv_downsample, (2, 8, 6, 6), POSTACT_KERNELS),
    }


def _twin(model: nn.Module) -> nn.Module:
    return set_fused(copy.deepcopy(model), False)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["fp32-input", "bf16-input"])
@pytest.mark.parametrize("name", list(_cases()))
def test_autocast_bf16(name: str, input_dtype: torch.dtype, device: torch.device) -> None:
    """cpu autocast under the interpreter; cuda autocast on a GPU."""
    build, shape, kernels = _cases()[name]
    torch.manual_seed(0)
    model = build().to(device)
    eager = _twin(model)
    x = torch.randn(*shape, device=device).to(input_dtype)
    # the documented eager path of a torchvision block given an input not in the autocast dtype
    own_forward = name.startswith("torchvision") and input_dtype != torch.bfloat16
    runs = {}
    for label, m in (("fused", model), ("eager", eager)):
        xi = x.clone().requires_grad_(True)
        if label == "eager":
            guard = contextlib.nullcontext()
        else:
            guard = nothing_launched() if own_forward else launched(*kernels)
        with guard:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = m(xi)
            out.float().square().mean().backward()
        runs[label] = (out, xi.grad, {n: p.grad for n, p in m.named_parameters()})
    (out, dx, grads), (e_out, e_dx, _) = runs["fused"], runs["eager"]
    assert out.dtype == e_out.dtype, f"output dtype {out.dtype}, eager PyTorch gives {e_out.dtype}"
    assert dx.dtype == e_dx.dtype == input_dtype
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and grads[n].dtype == torch.float32, n
    for n, b in model.named_buffers():
        if "running" in n:
            assert b.dtype == torch.float32, n
    # Same computation in bf16: errors of the order of bf16 rounding, compared with eager's own.
    assert rel_error(out, e_out) < 0.05, rel_error(out, e_out)
    # Input gradients through two or three bf16 BatchNorm backwards differ from eager's by ReLU
    # masks flipping on bf16 rounding (heavy-tailed); only their dtype and finiteness are checked.
    assert torch.isfinite(dx.float()).all()
    for (n, b), (_, eb) in zip(model.named_buffers(), eager.named_buffers()):
        if "running" in n:
            assert rel_error(b, eb) < 0.05, n


def test_autocast_disabled_region_runs_full_precision(device: torch.device) -> None:
    """Inside ``autocast(enabled=False)`` nothing is cast: an fp32 block stays fp32."""
    block = fusedres.PreActBasicBlock(8, 8).to(device)
    x = torch.randn(2, 8, 5, 5, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16), torch.autocast(device.type, enabled=False):
        assert block(x).dtype == torch.float32
