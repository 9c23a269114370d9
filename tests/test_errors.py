"""Bad input gets a ValueError/TypeError naming the offending values — never a Triton crash."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import nothing_launched

from fusedres import bn_relu_conv2d
from fusedres.reference import bn_relu_conv2d_reference


def _args(device, *, n=2, c=4, h=5, w=5, cout=6, k=3, dtype=torch.float32):
    x = torch.randn(n, c, h, w, device=device, dtype=dtype)
    wt = torch.randn(cout, c, k, k, device=device, dtype=dtype)
    g, b = torch.ones(c, device=device), torch.zeros(c, device=device)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    return [x, wt, g, b, rm, rv]


def _call(args, **kw):
    kw.setdefault("training", True)
    kw.setdefault("padding", 1)
    return bn_relu_conv2d(*args, **kw)


def test_channel_mismatch_x_weight(device):
    a = _args(device)
    a[1] = torch.randn(6, 3, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"3 input channels.*x has 4"):
        _call(a)


@pytest.mark.parametrize("index,name", [(2, "bn_weight"), (3, "bn_bias"), (4, "running_mean"), (5, "running_var")])
def test_channel_mismatch_bn(device, index, name):
    a = _args(device)
    a[index] = torch.ones(5, device=device)
    with pytest.raises(ValueError, match=rf"{name} must have shape \(4,\).*\(5,\)"):
        _call(a)


def test_not_4d(device):
    a = _args(device)
    a[0] = torch.randn(2, 4, 5, device=device)
    with pytest.raises(ValueError, match=r"x must be 4-D.*\(2, 4, 5\)"):
        _call(a)
    a = _args(device)
    a[1] = torch.randn(6, 4, 3, device=device)
    with pytest.raises(ValueError, match=r"weight must be 4-D"):
        _call(a)


def test_mixed_dtypes(device):
    a = _args(device)
    a[1] = a[1].half()
    with pytest.raises(TypeError, match=r"weight dtype torch.float16 differs from x dtype torch.float32"):
        _call(a)
    a = _args(device, dtype=torch.bfloat16)
    a[2] = a[2].half()
    with pytest.raises(TypeError, match=r"bn_weight dtype torch.float16 must be float32 or x's dtype"):
        _call(a)


def test_unsupported_dtype(device):
    a = _args(device, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"float32, float16 or bfloat16, got torch.float64"):
        _call(a)


def test_mixed_devices(device):
    a = _args(device)
    a[3] = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match=r"bn_bias is on meta but x is on"):
        _call(a)


@pytest.mark.parametrize("shape,match", [((6, 4, 3, 1), "square"), ((6, 4, 2, 2), "odd kernel")])
def test_kernel_shape(device, shape, match):
    a = _args(device)
    a[1] = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match=match):
        _call(a)


def test_groups_and_dilation_refused(device):
    with pytest.raises(ValueError, match="groups=2 is not supported"):
        _call(_args(device), groups=2)
    with pytest.raises(ValueError, match="dilation=2 is not supported"):
        _call(_args(device), dilation=2)


def test_single_value_per_channel_in_training(device):
    a = _args(device, n=1, h=1, w=1)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 4, 1, 1\)"):
        _call(a)
    _call(a, training=False)  # eval is fine, as in PyTorch


def test_residual_shape_and_dtype(device):
    msg = r"residual shape \(2, 6, 4, 4\) does not match the output shape \(2, 6, 5, 5\)"
    with pytest.raises(ValueError, match=msg):
        _call(_args(device), residual=torch.randn(2, 6, 4, 4, device=device))
    with pytest.raises(TypeError, match="residual dtype"):
        _call(_args(device), residual=torch.randn(2, 6, 5, 5, device=device, dtype=torch.float16))


def test_eval_needs_running_stats(device):
    a = _args(device)
    a[4] = a[5] = None
    with pytest.raises(ValueError, match="required when training=False"):
        _call(a, training=False)
    a = _args(device)
    a[5] = None
    with pytest.raises(ValueError, match="running_mean and running_var must both be given or both be None"):
        _call(a)


def test_stride_padding_values(device):
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        _call(_args(device), stride=0)
    with pytest.raises(ValueError, match="padding must be one int or a pair of equal ints"):
        _call(_args(device), padding=(1, 0))
    with pytest.raises(TypeError, match="stride must be an int, got float"):
        _call(_args(device), stride=1.5)


def test_kernel_larger_than_input(device):
    with pytest.raises(ValueError, match=r"3x3 kernel with padding 0 does not fit input of size 2x2"):
        _call(_args(device, h=2, w=2), padding=0)


@pytest.mark.parametrize("shape,cout", [((2, 4, 0, 5), 6), ((2, 0, 5, 5), 6), ((2, 4, 5, 5), 0)],
                         ids=["H=0", "C=0", "Cout=0"])
def test_empty_channels_or_images(device, shape, cout):
    """Eager PyTorch raises for these too (a kernel larger than the padded input, an empty weight)."""
    n, c, h, w = shape
    with pytest.raises(ValueError, match=r"empty channels or images are not supported, got x \(\d+, \d+, \d+, \d+\)"):
        _call(_args(device, n=n, c=c, h=h, w=w, cout=cout))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_is_eager_pytorch(device, training):
    """N=0: what eager PyTorch gives — an empty output, running statistics untouched, zero
    parameter gradients — with nothing launched."""
    results = []
    for impl in (bn_relu_conv2d, bn_relu_conv2d_reference):
        a = _args(device, n=0)
        a[0].requires_grad_(True)
        a[1].requires_grad_(True)
        a[2].requires_grad_(True)
        a[4].normal_()
        before = [t.clone() for t in a[4:]]
        with nothing_launched():
            y = impl(*a, training=training, padding=1)
            y.sum().backward()
        assert y.shape == (0, 6, 5, 5)
        assert all(torch.equal(t, b) for t, b in zip(a[4:], before)), "running statistics changed"
        assert not a[1].grad.any() and not a[2].grad.any()
        results.append(y)
    assert results[0].dtype == results[1].dtype and results[0].stride() == results[1].stride()


@pytest.mark.parametrize("training,eps,match", [(True, 0.0, "eps must be positive when training, got 0.0"),
                                                (False, -1.0, "eps must be non-negative, got -1.0"),
                                                (True, float("nan"), "eps must be positive when training, got nan")])
def test_eps_as_batch_norm(device, training, eps, match):
    with pytest.raises(ValueError, match=match):
        _call(_args(device), training=training, eps=eps)


def test_not_a_tensor(device):
    a = _args(device)
    a[0] = a[0].tolist()
    with pytest.raises(TypeError, match="x and weight must be tensors, got list and Tensor"):
        _call(a)
    with pytest.raises(TypeError, match="padding must be an int, got str 'same'"):
        _call(_args(device), padding="same")
    with pytest.raises(ValueError, match="padding must be >= 0, got -1"):
        _call(_args(device), padding=-1)


@pytest.mark.parametrize("where", ["conv2", "bn2", "shortcut.0"])
def test_block_parameter_on_another_device(where):
    """A block whose parameter sits on another device than the input: a ValueError naming it."""
    import fusedres

    block = fusedres.PreActBasicBlock(4, 6, stride=2)
    block.get_submodule(where).to("meta")
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=rf"parameter {where}\.weight is on meta but the input is on cpu"):
        block(x)


# The blocks: the same malformed calls, for each kind of fused block.
def _tv(kind: str) -> torch.nn.Module:
    from torch import nn
    from torchvision.models.resnet import BasicBlock, Bottleneck

    import fusedres

    # (base_width=128: an inner width of 2, so that a grouped convolution can be swapped in)
    block = BasicBlock(4, 4) if kind == "basic" else Bottleneck(4, 1, base_width=128)
    return fusedres.convert(nn.Sequential(block))[0]


def _blocks() -> dict:
    import fusedres

    return {
        "PreActBasicBlock": (lambda: fusedres.PreActBasicBlock(4, 8), "PreActBasicBlock"),
        "PreActBottleneck": (lambda: fusedres.PreActBottleneck(4, 2), "PreActBottleneck"),
        "torchvision BasicBlock": (lambda: _tv("basic"), "fusedres.BasicBlock"),
        "torchvision Bottleneck": (lambda: _tv("bottleneck"), "fusedres.Bottleneck"),
    }


BLOCKS = list(_blocks())
PREACT = ("PreActBasicBlock", "PreActBottleneck")


def _block(name, device):
    make, label = _blocks()[name]
    return make().to(device), label


@pytest.mark.parametrize("name", BLOCKS)
def test_block_shape_errors(device, name):
    block, label = _block(name, device)
    preact = name in PREACT
    cases = [
        ([1, 2], TypeError, f"{label}: input must be a tensor, got list"),
        (torch.randn(2, 4, 5, device=device), ValueError,
         r"input must be 4-D \(N, C, H, W\), got shape \(2, 4, 5\)" if preact
         else r"expected a 4-D input with 4 channels, got \(2, 4, 5\)"),
        (torch.randn(2, 3, 5, 5, device=device), ValueError,
         r"expected 4 input channels, got 3 \(input shape \(2, 3, 5, 5\)\)" if preact
         else r"expected a 4-D input with 4 channels, got \(2, 3, 5, 5\)"),
        (torch.randn(2, 4, 0, 5, device=device), ValueError,
         rf"{label}: empty images are not supported, got input size \(2, 4, 0, 5\)"),
        (torch.randn(1, 4, 1, 1, device=device), ValueError,
         rf"{label}: expected more than 1 value per channel when training, got input size \(1, 4, 1, 1\)"),
    ]
    for x, exc, match in cases:
        with pytest.raises(exc, match=match):
            block(x)


def test_single_value_inside_the_block(device):
    """A stride-2 block on a 2x2 image of batch 1: bn2 normalises one value per channel (eager's
    BatchNorm raises there too); eval is fine."""
    import fusedres

    block = fusedres.PreActBasicBlock(4, 8, 2).to(device)
    x = torch.randn(1, 4, 2, 2, device=device)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 4, 2, 2\) \(1x1 values"):
        block(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fusedres.PreActBasicBlock(4, 8, 2, fused=False).to(device)(x)
    assert block.eval()(x).shape == (1, 8, 1, 1)


@pytest.mark.parametrize("name", BLOCKS)
def test_block_dtype_errors(device, name):
    block, label = _block(name, device)
    msg = (r"input dtype torch.float16 differs from the convolution weights' dtype torch.float32" if name in PREACT
           else r"input dtype torch.float16 differs from the weights' torch.float32")
    with pytest.raises(TypeError, match=msg):
        block(torch.randn(2, 4, 5, 5, device=device, dtype=torch.float16))
    block64 = block.double()
    with pytest.raises(TypeError, match=rf"{label}: the fused kernels compute in float32, float16 or bfloat16, "
                                        r"got torch.float64"):
        block64(torch.randn(2, 4, 5, 5, device=device, dtype=torch.float64))


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("what", ["bn1.weight", "bn1.running_mean", "conv2.weight"])
def test_block_device_errors(device, name, what):
    block, label = _block(name, device)
    module, attr = what.rsplit(".", 1)
    sub = block.get_submodule(module)
    if attr == "running_mean":
        sub.running_mean = torch.zeros_like(sub.running_mean, device="meta")
    else:
        sub.to("meta")
    kind = "buffer" if attr == "running_mean" else "parameter"
    with pytest.raises(ValueError, match=rf"{label}: {kind} {what} is on meta but the input is on {device.type}"):
        block(torch.randn(2, 4, 5, 5, device=device))


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("change,problem", [
    (dict(groups=2), "groups=2"),
    (dict(dilation=2, padding=2), r"dilation=\(2, 2\)"),
    (dict(bias=True), "a bias"),
    (dict(kernel_size=(3, 1), padding=(1, 0)), r"kernel_size=\(3, 1\), padding=\(1, 0\)"),
    (dict(kernel_size=2, padding=0), r"kernel_size=\(2, 2\)"),
    (dict(padding_mode="reflect"), "padding_mode='reflect'"),
], ids=["groups", "dilation", "bias", "non-square", "even", "padding_mode"])
def test_block_convolution_the_kernels_do_not_compute(device, name, change, problem):
    """A convolution swapped into a block (or changed in place) that the fused kernels would
    compute wrongly: refused by name; fused=False runs it in eager PyTorch (where it keeps the
    output size: an even kernel does not)."""
    block, label = _block(name, device)
    old = block.conv2
    kw = dict(in_channels=old.in_channels, out_channels=old.out_channels, kernel_size=old.kernel_size,
              stride=old.stride, padding=old.padding, bias=False)
    block.conv2 = torch.nn.Conv2d(**{**kw, **change}).to(device)
    x = torch.randn(2, 4, 6, 6, device=device)
    with pytest.raises(ValueError, match=rf"{label}: conv2 has {problem}; the fused kernels take square odd kernels"):
        block(x)
    if change.get("kernel_size") != 2:
        block.fused = False
        with nothing_launched():
            block(x)


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_empty_batch_is_eager_pytorch(device, name, training):
    """N=0: the modules' own forward — an empty output, running statistics untouched,
    num_batches_tracked counted in training — exactly as the eager twin, with nothing launched."""
    from fusedres.testing import set_fused

    block, _ = _block(name, device)
    block.train(training)
    twin = set_fused(copy.deepcopy(block), False)
    x = torch.randn(0, 4, 5, 5, device=device, requires_grad=True)
    with nothing_launched():
        y = block(x)
        y.sum().backward()
    want = twin(x)
    assert y.shape == want.shape and y.dtype == want.dtype
    for (k, a), b in zip(block.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    if training:
        assert int(block.bn1.num_batches_tracked) == 1
