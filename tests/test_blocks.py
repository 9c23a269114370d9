"""Pre-activation blocks and networks against their eager twins (fused=False) in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import CHAIN_KERNELS, HEAD_KERNELS, assert_low_precision_block, launched
from torch import nn

from fusedres import PreActBasicBlock, PreActBottleneck
from fusedres.models import preact_resnet, preact_resnet18, preact_resnet50
from fusedres.testing import check_module, set_fused

#: A block fed a tensor no fused block wrote also computes its input's statistics.
FIRST_BLOCK_KERNELS = (*CHAIN_KERNELS, "bn_stats_kernel")


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so that every term is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if m.weight is not None:
                m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
                m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.3
            if m.running_mean is not None:
                m.running_mean.data = torch.randn(m.running_mean.shape, generator=g) * 0.2
                m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
    return model


# The fp32 tests below hold blocks and networks to full fp32 (no_tf32): with batches of two
# and 2x2 images in the last stage, BatchNorm's backward amplifies TF32's 10-bit products into
# 1e-2..1e-1 gradient errors (seen on an H200 for eager and fused alike). TF32 itself is
# checked per kernel and for the functional op.


def _assert_ok(result, dtype=torch.float32):
    bad = result.failures(dtype)
    assert not bad, "; ".join(bad)


BLOCK_CASES = [
    # (block, in_channels, channels, stride): identity and projection, stride 1 and 2
    (PreActBasicBlock, 12, 12, 1),
    (PreActBasicBlock, 6, 10, 1),
    (PreActBasicBlock, 6, 10, 2),
    (PreActBottleneck, 20, 5, 1),
    (PreActBottleneck, 8, 3, 1),
    (PreActBottleneck, 8, 3, 2),
]
BLOCK_IDS = ["basic-identity", "basic-proj-s1", "basic-proj-s2", "bottleneck-identity", "bottleneck-proj-s1",
             "bottleneck-proj-s2"]


@pytest.mark.parametrize("cls,cin,ch,stride", BLOCK_CASES, ids=BLOCK_IDS)
def test_block_matches_eager_twin(poison, device, no_tf32, cls, cin, ch, stride):
    block = _randomize_bn(cls(cin, ch, stride))
    assert hasattr(block, "shortcut") == (stride != 1 or cin != ch * cls.expansion)
    # Odd 9x7 image, three training steps (running statistics), then eval.
    with launched(*FIRST_BLOCK_KERNELS):
        r = check_module(block, (2, cin, 9, 7), dtype=torch.float32, device=device, steps=3)
    _assert_ok(r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cls", [PreActBasicBlock, PreActBottleneck], ids=["basic", "bottleneck"])
def test_block_low_precision(poison, device, dtype, cls):
    channels = 4 if cls is PreActBottleneck else 16
    assert_low_precision_block(_randomize_bn(cls(16, channels, 1)), (4, 16, 8, 8), dtype, device,
                               kernels=FIRST_BLOCK_KERNELS)


@pytest.mark.parametrize("variant", ["momentum=None", "no-running-stats", "affine=False", "nchw"])
def test_block_batchnorm_variants(poison, device, no_tf32, variant):
    if variant == "affine=False":
        block = PreActBasicBlock(6, 8, 2)
        for name in ("bn1", "bn2"):
            setattr(block, name, nn.BatchNorm2d(getattr(block, name).num_features, affine=False))
    elif variant == "no-running-stats":
        block = PreActBottleneck(8, 2, 1)
        for name in ("bn1", "bn2", "bn3"):
            setattr(block, name, nn.BatchNorm2d(getattr(block, name).num_features, track_running_stats=False))
    else:
        block = PreActBasicBlock(6, 6, 1)
        if variant == "momentum=None":
            block.bn1.momentum = block.bn2.momentum = None
    _randomize_bn(block)
    with launched(*CHAIN_KERNELS):
        r = check_module(block, (2, block.in_channels, 7, 5), dtype=torch.float32, device=device, steps=3,
                         channels_last=variant != "nchw")
    _assert_ok(r)


def test_train_eval_train(poison, device, no_tf32):
    """Switching modes keeps the twin's semantics: eval uses the running statistics and leaves them alone."""
    torch.manual_seed(0)
    fused = _randomize_bn(PreActBasicBlock(6, 6)).to(device)
    eager = set_fused(copy.deepcopy(fused), False)
    for mode in ("train", "eval", "train", "eval"):
        fused.train(mode == "train")
        eager.train(mode == "train")
        x = torch.randn(2, 6, 5, 5, device=device)
        # training: the statistics pass finalizes them (its last programs); eval: a finalize launch
        with launched("conv_fprop_kernel", "bn_stats_kernel" if mode == "train" else "bn_finalize_kernel"):
            y = fused(x)
        torch.testing.assert_close(y, eager(x), rtol=1e-4, atol=1e-4)
    for (k, a), b in zip(fused.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_state_dict_is_the_common_preact_layout():
    """Keys of the most widely used PyTorch pre-act code (bn1/conv1/bn2/conv2/shortcut.0)."""

    class CommonPreActBlock(nn.Module):  # the layout of the widely copied CIFAR pre-act code
        expansion = 1

        def __init__(self, in_planes, planes, stride=1):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(in_planes)
            self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
            if stride != 1 or in_planes != self.expansion * planes:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, self.expansion * planes, 1, stride, bias=False))

        def forward(self, x):
            out = F.relu(self.bn1(x))
            shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
            out = self.conv1(out)
            out = self.conv2(F.relu(self.bn2(out)))
            return out + shortcut

    theirs = _randomize_bn(CommonPreActBlock(4, 8, 2)).eval()
    ours = PreActBasicBlock(4, 8, 2).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(set_fused(ours, False)(x), theirs(x))


@pytest.mark.parametrize("cls,cin,ch", [(PreActBasicBlock, 16, 16), (PreActBasicBlock, 8, 16),
                                        (PreActBottleneck, 64, 16), (PreActBottleneck, 16, 16)],
                         ids=["basic-identity", "basic-proj", "bottleneck-identity", "bottleneck-proj"])
def test_saved_bytes_at_most_60_percent_of_eager(device, cls, cin, ch):
    """Everything kept for backward goes through save_for_backward, where saved_tensors_hooks see it
    when the forward saves it (the backward is not run: it saves nothing)."""

    def saved_bytes(block: nn.Module, x: torch.Tensor) -> int:
        seen: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.numel():
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                seen[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x)
        return sum(seen.values())

    torch.manual_seed(0)
    fused = cls(cin, ch).to(device).to(memory_format=torch.channels_last)
    eager = set_fused(copy.deepcopy(fused), False)
    x = torch.randn(8, cin, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    with launched("conv_fprop_kernel"):
        fused_bytes = saved_bytes(fused, x.clone().requires_grad_())
    ratio = fused_bytes / saved_bytes(eager, x.clone().requires_grad_())
    print(f"{cls.__name__}({cin}, {ch}): fused keeps {ratio:.3f}x the bytes eager keeps")
    assert ratio <= 0.6


def test_preact_resnet_matches_twin(poison, device, no_tf32):
    """preact_resnet(8): the CIFAR stem, an identity block, two stride-2 projection blocks and the
    head (ResNet-20's structure with one block per stage; the bottleneck network is
    tests/test_handoff.py::test_network_with_handoff_matches_eager)."""
    model = _randomize_bn(preact_resnet(8, num_classes=10))
    with launched(*HEAD_KERNELS, *FIRST_BLOCK_KERNELS):
        r = check_module(model, (2, 3, 8, 8), dtype=torch.float32, device=device, steps=2)
    _assert_ok(r)


def test_parameter_counts_match_the_paper():
    """He et al. 2016 count the convolution and linear weights: 1.7M (164) and 10.2M (1001)."""

    def weights(model: nn.Module) -> float:
        return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                   for p in m.parameters()) / 1e6

    m164, m1001, m110 = preact_resnet(164), preact_resnet(1001), preact_resnet(110)
    assert isinstance(m164.layers[0][0], PreActBottleneck) and isinstance(m110.layers[0][0], PreActBasicBlock)
    assert len(m164.layers[0]) == 18 and len(m1001.layers[0]) == 111 and len(m110.layers[0]) == 18
    assert round(weights(m164), 1) == 1.7
    assert round(weights(m1001), 1) == 10.2
    assert round(weights(m110), 1) == 1.7


def test_imagenet_models_build_and_run_eager():
    m = preact_resnet50(num_classes=7, fused=False)
    assert [len(layer) for layer in m.layers] == [3, 4, 6, 3] and m.linear.in_features == 2048
    y = preact_resnet18(num_classes=7, fused=False).eval()(torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 7)


@pytest.mark.parametrize("depth,block", [(21, "auto"), (21, "bottleneck"), (12, "basic"), (20, "wide")])
def test_bad_depth(depth, block):
    with pytest.raises(ValueError, match=str(depth) if block != "wide" else "'wide'"):
        preact_resnet(depth, block=block)


def test_block_bad_input(device):
    block = PreActBasicBlock(4, 8).to(device)
    with pytest.raises(ValueError, match=r"expected 4 input channels, got 3"):
        block(torch.randn(2, 3, 5, 5, device=device))
    with pytest.raises(ValueError, match=r"must be 4-D.*\(2, 4, 5\)"):
        block(torch.randn(2, 4, 5, device=device))
    with pytest.raises(TypeError, match=r"input dtype torch.float16 differs"):
        block(torch.randn(2, 4, 5, 5, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        block(torch.randn(1, 4, 1, 1, device=device))
    block.bn2.to("meta")
    with pytest.raises(ValueError, match=r"parameter bn2.weight is on meta"):
        block(torch.randn(2, 4, 5, 5, device=device))
    for part, pname in (("shortcut", "shortcut.0.weight"), ("conv2", "conv2.weight")):
        block = PreActBasicBlock(4, 8).to(device)
        getattr(block, part).to("meta")
        with pytest.raises(ValueError, match=rf"parameter {pname} is on meta"):
            block(torch.randn(2, 4, 5, 5, device=device))
    with pytest.raises(TypeError, match=r"float32, float16 or bfloat16, got torch.float64"):
        PreActBasicBlock(4, 8).to(device, torch.float64)(torch.randn(2, 4, 5, 5, device=device, dtype=torch.float64))


def test_double_backward_is_refused(device):
    block = PreActBasicBlock(4, 4).to(device)
    x = torch.randn(2, 4, 5, 5, device=device, requires_grad=True)
    with launched("conv_fprop_kernel"):
        y = block(x)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()
