"""Bad input gets a ValueError/TypeError naming the offending values — never a Triton crash."""

from __future__ import annotations

import pytest
import torch

from fusedres import bn_relu_conv2d


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


def test_empty_input(device):
    with pytest.raises(ValueError, match="empty tensors"):
        _call(_args(device, n=0))


@pytest.mark.parametrize("where", ["conv2", "bn2", "shortcut.0"])
def test_block_parameter_on_another_device(where):
    """A block whose parameter sits on another device than the input: a ValueError naming it."""
    import fusedres

    block = fusedres.PreActBasicBlock(4, 6, stride=2)
    block.get_submodule(where).to("meta")
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=rf"parameter {where}\.weight is on meta but the input is on cpu"):
        block(x)
