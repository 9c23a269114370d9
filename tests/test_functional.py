"""bn_relu_conv2d against F.conv2d(F.relu(F.batch_norm(...))) in float64: outputs, every
gradient and the running statistics over several training steps."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import CONV_KERNELS, DGRAD, DTYPE_IDS, DTYPES, WGRAD, kernel_matrix, launched
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedres import bn_relu_conv2d
from fusedres.testing import check_bn_relu_conv2d

# Training: the statistics pass finalizes in its last programs, the dgrad reduces the BatchNorm
# backward sums and the wgrad its splits in theirs (tests/test_ticket.py). Eval: the finalize
# kernel reads the running statistics.
ALL_KERNELS = ("bn_stats_kernel", "conv_fprop_kernel", DGRAD, "bn_bwd_apply_kernel", WGRAD)
EVAL_KERNELS = ("bn_finalize_kernel", *ALL_KERNELS[1:])


def _assert_ok(result, dtype):
    bad = result.failures(dtype)
    assert not bad, "; ".join(bad)


# a covering array under the interpreter (every combination of any three axes), the whole product on CUDA
@pytest.mark.parametrize(*kernel_matrix({
    "training": ([True, False], ["train", "eval"]),
    "residual": ([False, True], ["nores", "res"]),
    "ksize,stride,pad": ([(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1)], ["1x1s1", "1x1s2", "3x3s1", "3x3s2"]),
    "dtype": (DTYPES, DTYPE_IDS),
}))
def test_matches_pytorch(poison, device, dtype, ksize, stride, pad, residual, training):
    # C=19, Cout=21 (no multiple of any block), odd 9x7 image, three steps of running statistics.
    kernels = ALL_KERNELS if training else EVAL_KERNELS
    with launched(*kernels):
        r = check_bn_relu_conv2d(n=3, c=19, h=9, w=7, cout=21, ksize=ksize, stride=stride, padding=pad,
                                 dtype=dtype, device=device, training=training, residual=residual, steps=3)
    _assert_ok(r, dtype)


def test_fp32_without_tf32_is_fp32_exact(poison, device, no_tf32):
    """With TF32 off the fp32 path is held to the fp32 floor on every device."""
    with launched(*ALL_KERNELS):
        r = check_bn_relu_conv2d(n=2, c=19, h=9, w=7, cout=21, ksize=3, stride=2, padding=1, dtype=torch.float32,
                                 device=device, residual=True, steps=2)
    _assert_ok(r, torch.float32)


@pytest.mark.parametrize("affine,running", [(False, True), (True, False), (False, False)],
                         ids=["affine=False", "no-running-stats", "neither"])
def test_optional_bn_parameters(poison, device, affine, running):
    with launched(*ALL_KERNELS):
        r = check_bn_relu_conv2d(n=2, c=6, h=5, w=5, cout=7, ksize=3, stride=1, padding=1, dtype=torch.float32,
                                 device=device, training=True, affine=affine, running=running, steps=2)
    _assert_ok(r, torch.float32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_of_one(poison, device, training):
    with launched(*CONV_KERNELS):
        r = check_bn_relu_conv2d(n=1, c=5, h=3, w=1, cout=4, ksize=3, stride=2, padding=1, dtype=torch.float32,
                                 device=device, training=training, residual=True, steps=2)
    _assert_ok(r, torch.float32)


def test_contiguous_nchw_input(poison, device):
    with launched(*ALL_KERNELS):
        r = check_bn_relu_conv2d(n=2, c=5, h=6, w=7, cout=9, ksize=3, stride=1, padding=1, dtype=torch.float32,
                                 device=device, residual=True, channels_last=False, steps=2)
    _assert_ok(r, torch.float32)


def test_running_stats_exact_when_mean_dominates(poison, device):
    """x around 1000 with unit spread: the batch variance (and so every gradient) must survive."""
    with launched(*ALL_KERNELS):
        r = check_bn_relu_conv2d(n=4, c=3, h=16, w=16, cout=4, ksize=1, stride=1, padding=0, dtype=torch.float32,
                                 device=device, mean_offset=1000.0, steps=2)
    _assert_ok(r, torch.float32)
    assert r.fused["running_var"] < 1e-5


@pytest.mark.parametrize("x_format,w_format", [
    (torch.channels_last, torch.contiguous_format),
    (torch.contiguous_format, torch.contiguous_format),
    (torch.contiguous_format, torch.channels_last),
])
def test_memory_format_follows_conv2d(device, x_format, w_format):
    x = torch.randn(2, 4, 5, 5, device=device).contiguous(memory_format=x_format)
    w = torch.randn(6, 4, 3, 3, device=device).contiguous(memory_format=w_format)
    with launched("conv_fprop_kernel"):
        out = bn_relu_conv2d(x, w, None, None, None, None, training=True, padding=1)
    ref = F.conv2d(x, w, None, 1, 1)
    for fmt in (torch.channels_last, torch.contiguous_format):
        assert out.is_contiguous(memory_format=fmt) == ref.is_contiguous(memory_format=fmt)


def test_needs_input_grad_skips_unneeded_kernels(device):
    x = torch.randn(2, 4, 5, 5, device=device)
    w = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    g = torch.ones(4, device=device)
    b = torch.zeros(4, device=device)
    from fusedres import _runtime

    before = dict(_runtime.launch_counts)
    bn_relu_conv2d(x, w, g, b, None, None, training=True, padding=1).sum().backward()
    assert w.grad is not None and x.grad is None
    assert _runtime.launch_counts["conv_wgrad_kernel"] == before.get("conv_wgrad_kernel", 0) + 1
    assert _runtime.launch_counts["conv_dgrad_kernel"] == before.get("conv_dgrad_kernel", 0)


def test_expanded_gradient(device, no_tf32):
    """out.sum().backward() hands backward a stride-0 gradient; the kernels read it through strides."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5, device=device, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    with launched(*CONV_KERNELS):
        bn_relu_conv2d(x, w, None, None, None, None, training=True, padding=1).sum().backward()
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_()
    F.conv2d(F.relu(F.batch_norm(x64, None, None, training=True)), w64, None, 1, 1).sum().backward()
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad, rtol=1e-4, atol=1e-5)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 3), c=st.integers(1, 20), h=st.integers(1, 9), w=st.integers(1, 9),
    cout=st.integers(1, 20), ksize=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
    residual=st.booleans(), training=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_shapes(device, no_tf32, n, c, h, w, cout, ksize, stride, residual, training, seed):
    # Full fp32: shapes down to 1x1x1x2 make BatchNorm sums of two terms, where TF32's 10-bit
    # products alone exceed any fixed floor (seen on an H200). TF32 is checked in test_matches_pytorch.
    pad = ksize // 2
    if training and n * h * w == 1:
        return  # refused, as in PyTorch (tested in test_errors)
    with launched(*CONV_KERNELS):
        r = check_bn_relu_conv2d(n=n, c=c, h=h, w=w, cout=cout, ksize=ksize, stride=stride, padding=pad,
                                 dtype=torch.float32, device=device, training=training, residual=residual, seed=seed)
    _assert_ok(r, torch.float32)


def test_cpu_without_interpreter_uses_pytorch():
    """Without TRITON_INTERPRET, CPU tensors take the documented plain-PyTorch path."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        import fusedres
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        w = torch.randn(5, 3, 3, 3, requires_grad=True)
        rm, rv = torch.zeros(3), torch.ones(3)
        y = fusedres.bn_relu_conv2d(x, w, None, None, rm, rv, training=True, padding=1)
        ref = F.conv2d(F.relu(F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)), w, None, 1, 1)
        assert torch.allclose(y, ref), "different result"
        y.sum().backward()
        assert x.grad is not None and w.grad is not None
        assert sum(fusedres.launch_counts.values()) == 0, "a Triton kernel ran"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_weight_reorder_is_cached_against_version(device):
    from fusedres.functional import kernel_weight

    w = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)  # contiguous (Cout, Cin, R, S)
    first = kernel_weight(w)
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert kernel_weight(w) is first, "the reorder must be cached, not redone per call"
    x = torch.randn(2, 4, 5, 5, device=device)
    with launched("conv_fprop_kernel"):
        y1 = bn_relu_conv2d(x, w, None, None, None, None, training=True, padding=1)
    with torch.no_grad():
        w.mul_(2.0)  # an optimizer step: the version counter moves
    assert kernel_weight(w) is not first
    with launched("conv_fprop_kernel"):
        y2 = bn_relu_conv2d(x, w, None, None, None, None, training=True, padding=1)
    torch.testing.assert_close(y2, 2.0 * y1, rtol=1e-5, atol=1e-5)
    cl = w.detach().contiguous(memory_format=torch.channels_last)
    assert kernel_weight(cl) is cl
