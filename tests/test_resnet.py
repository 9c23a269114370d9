"""torchvision-compatible fused blocks and fusedres.convert, against the originals."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import CHAIN_KERNELS, POSTACT_KERNELS, assert_low_precision_block, launched, randomize_bn
from torch import nn
from torchvision.models.resnet import BasicBlock as TVBasic
from torchvision.models.resnet import Bottleneck as TVBottleneck
from torchvision.models.resnet import ResNet, resnet18, resnet50

import fusedres
from fusedres import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck, convert
from fusedres.testing import check_module, set_fused


def _ds(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _avgpool2() -> nn.Module:
    return nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)  # ResNet-D style, odd sizes too


def _assert_ok(result, dtype=torch.float32):
    bad = result.failures(dtype)
    assert not bad, "; ".join(bad)


BLOCKS = {
    "basic-identity": lambda cls: cls(8, 8),
    "basic-downsample-s2": lambda cls: cls(6, 8, 2, _ds(6, 8, 2)),
    "bottleneck-identity": lambda cls: cls(16, 4),
    "bottleneck-downsample-s2": lambda cls: cls(8, 4, 2, _ds(8, 16, 2)),
    # a downsample that is not conv1x1 + BN runs as a module; the fused block adds its output
    "bottleneck-avgpool-downsample": lambda cls: cls(8, 4, 2, nn.Sequential(_avgpool2(), _ds(8, 16, 1))),
}


def _pair(key: str) -> tuple[nn.Module, nn.Module]:
    fused_cls = BasicBlock if key.startswith("basic") else Bottleneck
    tv_cls = TVBasic if key.startswith("basic") else TVBottleneck
    torch.manual_seed(0)
    tv = randomize_bn(BLOCKS[key](tv_cls))
    ours = BLOCKS[key](fused_cls)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return ours, tv


@pytest.mark.parametrize("key", list(BLOCKS))
def test_eager_path_is_torchvision(key):
    ours, tv = _pair(key)
    x = torch.randn(2, ours.conv1.in_channels, 8, 8)
    torch.testing.assert_close(set_fused(ours, False)(x), tv(x))


@pytest.mark.parametrize("key", list(BLOCKS))
def test_block_matches_twin(poison, device, no_tf32, key):
    """Three training steps (statistics in epilogues, bn-relu in prologues, one closing pass),
    then eval under no_grad (BatchNorm folded into the convolutions)."""
    ours, _ = _pair(key)
    with launched(*POSTACT_KERNELS):
        r = check_module(ours, (2, ours.conv1.in_channels, 9, 7), dtype=torch.float32, device=device, steps=3)
    _assert_ok(r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_block_low_precision(poison, device, dtype):
    assert_low_precision_block(randomize_bn(Bottleneck(8, 4, 2, _ds(8, 16, 2))), (4, 8, 8, 8), dtype, device,
                               kernels=POSTACT_KERNELS)


@pytest.mark.parametrize("key", ["basic-downsample-s2", "bottleneck-identity"])
def test_eval_with_gradients(poison, device, no_tf32, key):
    """eval() with autograd on (fine-tuning with frozen statistics) runs the fused Function on the
    running statistics."""
    ours, tv = _pair(key)
    ours, tv = ours.to(device).eval(), tv.double().eval()
    x = torch.randn(2, ours.conv1.in_channels, 7, 7, device=device, requires_grad=True)
    x64 = x.detach().cpu().double().requires_grad_()
    with launched(*POSTACT_KERNELS):
        ours(x).square().sum().backward()
    tv(x64).square().sum().backward()
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), tv.parameters()):
        torch.testing.assert_close(p.grad.double().cpu(), q.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("key,launches", [("basic-identity", 2), ("basic-downsample-s2", 3),
                                          ("bottleneck-identity", 3)])
def test_eval_folded_launches(device, no_tf32, key, launches):
    ours, tv = _pair(key)
    ours, tv = ours.to(device).eval(), tv.to(device).eval()
    before = dict(fusedres.launch_counts)
    x = torch.randn(2, ours.conv1.in_channels, 8, 8, device=device)
    with torch.no_grad():
        y = ours(x)
    after = fusedres.launch_counts
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {
        "conv_fprop_kernel": launches}
    torch.testing.assert_close(y, tv(x), rtol=1e-4, atol=1e-4)


def test_folded_weights_follow_parameter_and_buffer_changes(device, no_tf32):
    ours, tv = _pair("basic-downsample-s2")
    ours, tv = ours.to(device).eval(), tv.to(device).eval()
    x = torch.randn(2, 6, 8, 8, device=device)
    with torch.no_grad():
        ours(x)
        for m in (ours, tv):
            m.bn1.running_mean.add_(0.5)
            m.conv2.weight.mul_(1.5)
            m.downsample[1].bias.sub_(0.25)
        with launched("conv_fprop_kernel"):
            y = ours(x)
        torch.testing.assert_close(y, tv(x), rtol=1e-4, atol=1e-4)


def test_resnet_with_fused_blocks_loads_torchvision_state_dicts():
    tv18, tv50 = resnet18(num_classes=10), resnet50(num_classes=10)
    ours18 = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10)
    ours50 = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=10)
    for ours, tv in ((ours18, tv18), (ours50, tv50)):
        assert list(ours.state_dict()) == list(tv.state_dict())
        ours.load_state_dict(tv.state_dict(), strict=True)
        tv.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(set_fused(ours18, False).eval()(x), tv18.eval()(x))


def test_unsupported_configurations_warn_and_run_plain(device):
    with pytest.warns(UserWarning, match=r"Bottleneck: groups=2, dilation=1"):
        grouped = Bottleneck(16, 4, groups=2, base_width=64)
    assert not grouped.fused
    with pytest.warns(UserWarning, match=r"norm layer GroupNorm"):
        gn = BasicBlock(8, 8, norm_layer=lambda c: nn.GroupNorm(2, c))
    tv = TVBasic(8, 8, norm_layer=lambda c: nn.GroupNorm(2, c))
    gn.load_state_dict(tv.state_dict())
    x = torch.randn(2, 8, 5, 5)
    before = sum(fusedres.launch_counts.values())
    torch.testing.assert_close(gn(x), tv(x))
    assert sum(fusedres.launch_counts.values()) == before
    with pytest.raises(ValueError, match="only supports groups=1"):
        BasicBlock(8, 8, groups=2)


class _SmallTorchvisionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(TVBasic(8, 8), TVBasic(8, 16, 2, _ds(8, 16, 2)))
        self.layer2 = nn.Sequential(TVBottleneck(16, 4), TVBottleneck(16, 8, 2, _ds(16, 32, 2)))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        h = self.layer2(self.layer1(self.stem(x)))
        return self.fc(h.mean((2, 3)))


class _CommonPreActBlock(nn.Module):
    """The widely copied CIFAR pre-activation block."""

    def __init__(self, in_planes, planes, stride=1, shortcut_on_x=False):
        super().__init__()
        self.shortcut_on_x = shortcut_on_x
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        src = x if self.shortcut_on_x else out
        shortcut = self.shortcut(src) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class _CommonPreActBottleneck(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, 4 * planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class _HandWrittenPreActNet(nn.Module):
    def __init__(self, shortcut_on_x=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layers = nn.Sequential(
            _CommonPreActBlock(8, 8), _CommonPreActBlock(8, 12, 2, shortcut_on_x), _CommonPreActBottleneck(12, 3),
        )
        self.bn = nn.BatchNorm2d(12)
        self.linear = nn.Linear(12, 5)

    def forward(self, x):
        h = self.layers(self.conv1(x))
        return self.linear(F.relu(self.bn(h)).mean((2, 3)))


def test_convert_torchvision_model(poison, device, no_tf32):
    original = randomize_bn(_SmallTorchvisionNet())
    keys = list(original.state_dict())
    converted = convert(original)
    assert type(original.layer1[0]) is TVBasic, "inplace=False must leave the original alone"
    assert [type(b) for b in (*converted.layer1, *converted.layer2)] == [BasicBlock, BasicBlock, Bottleneck,
                                                                          Bottleneck]
    assert list(converted.state_dict()) == keys
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(set_fused(copy.deepcopy(converted), False)(x), original(x), rtol=0, atol=0)
    with launched(*POSTACT_KERNELS):
        r = check_module(converted, (2, 3, 9, 9), dtype=torch.float32, device=device, steps=2)
    _assert_ok(r)


def test_convert_inplace_keeps_the_same_tensors():
    model = _SmallTorchvisionNet()
    weight, mean = model.layer1[1].conv1.weight, model.layer1[1].downsample[1].running_mean
    out = convert(model, inplace=True)
    assert out is model and type(model.layer1[1]) is BasicBlock
    assert model.layer1[1].conv1.weight is weight and model.layer1[1].downsample[1].running_mean is mean


def test_convert_hand_written_preact_net(poison, device, no_tf32):
    original = randomize_bn(_HandWrittenPreActNet())
    converted = convert(original)
    assert [type(b) for b in converted.layers] == [PreActBasicBlock, PreActBasicBlock, PreActBottleneck]
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(set_fused(copy.deepcopy(converted), False).eval()(x), original.eval()(x))
    with launched(*CHAIN_KERNELS):
        r = check_module(converted, (2, 3, 9, 9), dtype=torch.float32, device=device, steps=2)
    _assert_ok(r)


def test_convert_leaves_lookalikes_and_names_them():
    """A block with the pre-act layout whose shortcut reads x instead of relu(bn1(x)) is a
    different function: verified, left alone, and named."""
    model = _HandWrittenPreActNet(shortcut_on_x=True)
    with pytest.warns(UserWarning, match=r"left 1 block\(s\) as they are: layers.1 \(_CommonPreActBlock"):
        converted = convert(model)
    assert [type(b) for b in converted.layers] == [PreActBasicBlock, _CommonPreActBlock, PreActBottleneck]


def test_convert_nothing_to_convert_warns():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="nothing to convert in Sequential"):
        out = convert(model, inplace=True)
    assert out is model


def test_convert_wrong_declared_shapes_raises():
    model = _SmallTorchvisionNet()
    model.layer1[0].conv2.weight = nn.Parameter(torch.randn(8, 4, 3, 3))
    with pytest.raises(ValueError, match=r"layer1.0.conv2.weight has shape \(8, 4, 3, 3\) but the layer declares"):
        convert(model)


def test_convert_eval_mode_model(device, no_tf32):
    original = randomize_bn(_SmallTorchvisionNet()).eval().to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert(original)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        with launched("conv_fprop_kernel"):
            y = converted(x)
        torch.testing.assert_close(y, original(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("basic", [False, True], ids=["PreActBottleneck", "PreActBasic"])
def test_convert_timm_resnetv2(poison, device, no_tf32, basic):
    timm_resnetv2 = pytest.importorskip("timm.models.resnetv2")
    from timm.layers import BatchNormAct2d, create_conv2d

    # [2, 1]: stage 0 holds an identity block (no downsample), the kind convert used to leave
    model = randomize_bn(timm_resnetv2.ResNetV2(layers=[2, 1], channels=(16, 32), num_classes=5, stem_chs=8,
                                                conv_layer=create_conv2d, norm_layer=BatchNormAct2d, basic=basic))
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything convertible is converted
        converted = convert(model)
    blocks = [b for s in converted.stages for b in s.blocks]
    assert [type(b).__name__ for b in blocks] == ["TimmPreActBlock"] * 3 and blocks[1].downsample is None
    assert list(converted.state_dict()) == keys
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(set_fused(copy.deepcopy(converted), False).eval()(x), model.eval()(x))
    with launched(*CHAIN_KERNELS):
        r = check_module(converted, (2, 3, 16, 16), dtype=torch.float32, device=device, steps=2)
    _assert_ok(r)
