"""fusedres.convert / fusedres.inspect on the ResNets people hold: torchvision's and timm's
model zoo (structure), each new block kind on tiny instances (numerics, Triton kernels running),
state_dict round trips, and blocks whose training forward is not the fused unit."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _helpers import (
    CHAIN_KERNELS,
    POSTACT_KERNELS,
    HandWrittenPreAct,
    assert_low_precision_block,
    launched,
    randomize_bn,
)
from torch import nn
from torchvision.models.resnet import BasicBlock as TVBasic
from torchvision.models.resnet import Bottleneck as TVBottleneck

import fusedres
from fusedres import PreActBasicBlock, convert
from fusedres.adapters import TimmPostActBlock, TimmPreActBlock
from fusedres.testing import check_module, set_fused

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, create_conv2d  # noqa: E402
from timm.models import resnet as timm_resnet  # noqa: E402
from timm.models import resnetv2 as timm_resnetv2  # noqa: E402


def _assert_ok(result, dtype=torch.float32):
    bad = result.failures(dtype)
    assert not bad, "; ".join(bad)


def _quiet_convert(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything here is convertible: no warning at all
        return convert(model)


# --------------------------------------------------------------------------------------------
# The zoo: full-size models on the meta device (structure only: nothing allocated or downloaded)

ZOO = {  # name: (fused blocks, residual blocks, what the warning says of each block left)
    "torchvision:resnet18": (8, 8, None),
    "torchvision:resnet34": (16, 16, None),
    "torchvision:resnet50": (16, 16, None),
    "torchvision:resnet101": (33, 33, None),
    "torchvision:resnet152": (50, 50, None),
    "torchvision:wide_resnet50_2": (16, 16, None),
    "torchvision:resnext50_32x4d": (0, 16, "conv2 has groups=32"),
    "timm:resnet18": (8, 8, None),
    "timm:resnet34": (16, 16, None),
    "timm:resnet50": (16, 16, None),
    "timm:resnet101": (33, 33, None),
    "timm:resnet152": (50, 50, None),
    "timm:resnet26d": (8, 8, None),
    "timm:resnet50d": (16, 16, None),
    "timm:resnet101d": (33, 33, None),
    "timm:wide_resnet50_2": (16, 16, None),
    "timm:resnetv2_50": (16, 16, None),
    "timm:resnetv2_101": (33, 33, None),
    "timm:seresnet50": (0, 16, "se is SEModule"),
    "timm:resnetv2_50x1_bit": (0, 16, "norm1 is GroupNormAct (group norm"),
    "timm:resnetaa50": (13, 16, "aa is AvgPool2d (anti-aliased"),
    "timm:resnetv2_50d": (12, 16, "downsample is DownsampleAvg"),
}


def _residual_blocks(model: nn.Module) -> list[str]:
    """Paths of the library's own residual block classes: the ground truth, independent of convert."""
    kinds = (TVBasic, TVBottleneck, timm_resnet.BasicBlock, timm_resnet.Bottleneck, timm_resnetv2.PreActBasic,
             timm_resnetv2.PreActBottleneck)
    return [n for n, m in model.named_modules() if type(m) in kinds]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name):
    from fusedres.cli import build_model

    fused, total, why = ZOO[name]
    model = build_model(name)
    blocks = _residual_blocks(model)
    keys = list(model.state_dict())
    assert len(blocks) == total
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(model, inplace=True)
    assert list(model.state_dict()) == keys
    left = _residual_blocks(model)
    assert len(blocks) - len(left) == fused
    fused_types = {type(m) for n, m in model.named_modules() if n in blocks and n not in left}
    assert fused_types <= {fusedres.BasicBlock, fusedres.Bottleneck, TimmPostActBlock, TimmPreActBlock}
    messages = [str(w.message) for w in caught if "fusedres.convert" in str(w.message)]
    if not left:
        assert not messages
        return
    assert len(messages) == 1
    for path in left:  # every block left is named, with the reason
        assert re.search(rf"(^|[ (,]){re.escape(path)} \(\w+: [^)]*{re.escape(why)}", messages[0]), (path, messages)


def test_inspect_reports_without_changing_the_model():
    model = timm_resnet.ResNet(timm_resnet.BasicBlock, [2, 2], channels=(8, 16), stem_width=8, drop_path_rate=0.1)
    before = [type(m) for m in model.modules()]
    report = fusedres.inspect(model, "tiny")
    assert [type(m) for m in model.modules()] == before
    assert [(b.path, b.fused) for b in report.blocks] == [("layer1.0", True), ("layer1.1", False),
                                                        ("layer2.0", False), ("layer2.1", False)]
    assert "drop_path is DropPath(drop_prob=" in report.blocks[1].reason
    assert report.blocks[0].into == "fusedres.adapters.TimmPostActBlock"
    lines = str(report).splitlines()
    assert lines[-1] == report.summary() == "tiny: 1 of 4 residual blocks fused, 3 left as they are"
    assert "layer1.1" in lines[1] and "not fused: drop_path is DropPath" in lines[1]


# --------------------------------------------------------------------------------------------
# Numerics of each new block kind: two training steps, then eval, against float64 eager


def _timm_block(key: str) -> nn.Module:
    B, Bn = timm_resnet.BasicBlock, timm_resnet.Bottleneck
    return {
        "timm-basic-identity": lambda: B(8, 8),
        "timm-basic-downsample-s2": lambda: B(6, 8, 2, downsample=timm_resnet.downsample_conv(6, 8, 1, 2)),
        "timm-bottleneck-identity": lambda: Bn(16, 4),
        "timm-bottleneck-downsample-s2": lambda: Bn(8, 4, 2, downsample=timm_resnet.downsample_conv(8, 16, 1, 2)),
        # the -d variants: AvgPool2d(2, ceil_mode) + 1x1 + BN, computed as a module (odd sizes too)
        "timm-bottleneck-avgpool-s2": lambda: Bn(8, 4, 2, downsample=timm_resnet.downsample_avg(8, 16, 1, 2)),
        "timm-wide-bottleneck": lambda: Bn(8, 2, base_width=128),  # width 4 = 2 * 128/64, out 8
        "torchvision-wide-bottleneck": lambda: TVBottleneck(8, 2, base_width=128),
    }[key]()


@pytest.mark.parametrize("key", ["timm-basic-identity", "timm-basic-downsample-s2", "timm-bottleneck-identity",
                                 "timm-bottleneck-downsample-s2", "timm-bottleneck-avgpool-s2",
                                 "timm-wide-bottleneck", "torchvision-wide-bottleneck"])
def test_post_act_block_numerics(poison, device, no_tf32, key):
    torch.manual_seed(0)
    original = nn.Sequential(randomize_bn(_timm_block(key)))
    converted = _quiet_convert(original)
    want = fusedres.Bottleneck if key.startswith("torchvision") else TimmPostActBlock
    assert type(converted[0]) is want
    cin = converted[0].conv1.in_channels
    x = torch.randn(2, cin, 9, 7)
    torch.testing.assert_close(set_fused(copy.deepcopy(converted), False)(x), original(x), rtol=0, atol=0)
    with launched(*POSTACT_KERNELS):
        _assert_ok(check_module(converted, (2, cin, 9, 7), dtype=torch.float32, device=device, steps=2))
    # bf16: one step (the dtype's plumbing; the steps' interplay is the fp32 check's)
    assert_low_precision_block(converted, (2, cin, 9, 7), torch.bfloat16, device, kernels=POSTACT_KERNELS, steps=1)


def _tiny_resnetv2(basic: bool) -> nn.Module:
    # [2, 1]: stage 0 holds an identity block (no downsample), the kind convert used to leave
    return randomize_bn(timm_resnetv2.ResNetV2(layers=[2, 1], channels=(16, 32), num_classes=5, stem_chs=8,
                                               conv_layer=create_conv2d, norm_layer=BatchNormAct2d, basic=basic))


@pytest.mark.parametrize("basic", [False, True], ids=["PreActBottleneck", "PreActBasic"])
def test_resnetv2_identity_blocks_low_precision(poison, device, basic):
    """The converted stages in bf16, one training step and eval (the whole network over two fp32
    steps, its identity block included: tests/test_resnet.py::test_convert_timm_resnetv2)."""
    model = _tiny_resnetv2(basic)
    converted = _quiet_convert(model)
    blocks = [b for s in converted.stages for b in s.blocks]
    assert [type(b) for b in blocks] == [TimmPreActBlock] * 3 and blocks[1].downsample is None
    stages = converted.stages  # the blocks alone: the stem and head are not what is tested here
    assert_low_precision_block(stages, (2, 8, 7, 7), torch.bfloat16, device, kernels=CHAIN_KERNELS, steps=1)


# --------------------------------------------------------------------------------------------
# state_dicts load both ways, strictly


_PreActBlock = HandWrittenPreAct


FAMILIES = {
    "torchvision": lambda: torchvision.models.resnet.ResNet(TVBasic, [1, 1, 1, 1], num_classes=5),
    "timm-resnet-d": lambda: timm_resnet.ResNet(timm_resnet.Bottleneck, [1, 1], channels=(8, 16), stem_width=8,
                                                stem_type="deep", avg_down=True, num_classes=5),
    "timm-resnetv2": lambda: _tiny_resnetv2(False),
    "hand-written-preact": lambda: nn.Sequential(_PreActBlock(8, 8), _PreActBlock(8, 16, 2)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_loads_both_ways(family):
    torch.manual_seed(0)
    original = FAMILIES[family]()
    converted = _quiet_convert(original)
    assert any(getattr(m, "fused", False) for m in converted.modules())
    torch.manual_seed(1)
    other = FAMILIES[family]()  # other random weights
    converted.load_state_dict(other.state_dict(), strict=True)
    fresh = FAMILIES[family]()
    fresh.load_state_dict(converted.state_dict(), strict=True)
    for (k, a), b in zip(other.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


# --------------------------------------------------------------------------------------------
# Train-only behaviour: a block with dropout between its convolutions is never fused without it


class _WideBasic(nn.Module):
    """The widely copied WideResNet BasicBlock (bn1, relu1, conv1, bn2, relu2, conv2, droprate)."""

    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(in_planes, out_planes, 1, stride, 0,
                                                                bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class _DropoutModuleBlock(_PreActBlock):
    """The same layout with an nn.Dropout module between relu(bn2) and conv2."""

    def __init__(self, c):
        super().__init__(c, c)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        return self.conv2(self.drop(F.relu(self.bn2(self.conv1(a))))) + x


@pytest.mark.parametrize("make", [lambda: _WideBasic(8, 8, 1, 0.3), lambda: _DropoutModuleBlock(8)],
                         ids=["F.dropout", "nn.Dropout"])
def test_dropout_between_convolutions_is_never_dropped(device, make):
    torch.manual_seed(0)
    original = randomize_bn(nn.Sequential(make(), _WideBasic(8, 8, 1, 0.0))).to(device)
    with pytest.warns(UserWarning, match=r"left 1 block\(s\) as they are: 0 \(\w+: its training forward draws "
                                         r"random numbers \(dropout\?\)"):
        converted = convert(original)
    assert type(converted[0]) is type(original[0]) and type(converted[1]) is PreActBasicBlock
    x = torch.randn(2, 8, 6, 6, device=device)
    for mode in (True, False):
        converted.train(mode), original.train(mode)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            want = original(x)
            torch.manual_seed(3)
            got = converted(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _TrainOnlyScale(_PreActBlock):
    """No random numbers, yet another function in training than in eval."""

    def forward(self, x):
        out = super().forward(x)
        return out * 0.5 if self.training else out


class _BatchNormTwice(_PreActBlock):
    """The same output, but bn1 runs twice: its running statistics move twice per step."""

    def forward(self, x):
        self.bn1(x)
        return super().forward(x)


@pytest.mark.parametrize("cls,why", [(_TrainOnlyScale, "its training forward computes another function"),
                                     (_BatchNormTwice, "its training forward updates its buffers")])
def test_train_only_behaviour_is_named(cls, why):
    report = fusedres.inspect(nn.Sequential(cls(8, 8), _PreActBlock(8, 8)))
    assert [b.fused for b in report.blocks] == [False, True]
    assert report.blocks[0].reason.startswith(why), report.blocks[0].reason
