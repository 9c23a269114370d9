"""Activations of more than 2**31 elements on the GPU: every kernel role on a bf16 tensor of
8200 x 64 x 64 x 64 (2.15e9 elements, 4.3 GB), checked against PyTorch on the images around
element 2**31 and at the very end, where int32 offsets would wrap.

Each check builds its big tensors inside a helper that returns only slices and per-channel
results, so that the memory is free again when the assertions run (a failed assertion's
traceback then holds no 4 GB tensors). Where a result sums over every pixel (weight gradients,
statistics), the inputs are zero except on the checked images, so that the float64 reference
needs those images alone. Skipped without CUDA. About 30 GB of device memory at the peak, so
they run one at a time: ``scripts/gpu_check.sh`` runs the suite with ``--dist loadgroup``, which
keeps them on one xdist worker (``-m large`` selects them alone).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import fusedres
from fusedres.ops import bn as bn_ops
from fusedres.ops import conv as conv_ops
from fusedres.testing import ATOL, rel_error, within_bound

pytestmark = [
    pytest.mark.large,
    # under pytest-xdist's --dist loadgroup (scripts/gpu_check.sh): all on one worker, one at a time
    pytest.mark.xdist_group("large"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (and about 30 GB of its memory)"),
]

BF16 = torch.bfloat16
#: (N, C, H, W) of the big activation: the elements of image 8192 onwards lie past 2**31.
SHAPE = (8200, 64, 64, 64)
#: Where int32 element offsets wrap.
INT32_LIMIT = 2**31


def _windows(shape: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """Image ranges checked: the two images around element 2**31, and the last two."""
    n, c, h, w = shape
    first_past = -(-INT32_LIMIT // (c * h * w))  # the first image that starts at or past 2**31
    return [(max(first_past - 1, 0), min(first_past + 1, n)), (n - 2, n)]


@pytest.fixture(autouse=True)
def _free_memory() -> Iterator[None]:
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _big(shape: tuple[int, ...], device: torch.device, fill: str = "normal") -> torch.Tensor:
    """A channels_last bf16 tensor, allocated once (no contiguous copy), random or zero."""
    t = torch.empty(shape, device=device, dtype=BF16, memory_format=torch.channels_last)
    return t.normal_() if fill == "normal" else t.zero_()


def _vec(c: int, device: torch.device, lo: float, hi: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g) * (hi - lo) + lo).to(device)


def _check(fused: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor | float, what: str) -> None:
    """The 2x rule against eager bf16 where ``eager`` is its result; else ``eager`` is the floor."""
    err = rel_error(fused, ref64)
    if isinstance(eager, float):
        assert err <= eager, f"{what}: error {err:.3e} against float64 > {eager:.1e}"
        return
    base = rel_error(eager, ref64)
    assert within_bound(err, base, BF16, fused.device), f"{what}: fused error {err:.3e}, eager bf16 {base:.3e}"


#: Floors: a bf16 result computed from bf16 operands (one rounding of the output, a few of the
#: operands); an fp32 statistic or running statistic.
LOW, FP32 = ATOL[BF16], ATOL[torch.float32]


def fprop_case(shape: tuple[int, int, int, int], device: torch.device) -> list[tuple]:
    """conv_fprop with the BN-ReLU prologue, a residual and the statistics epilogue."""
    n, c, h, w = shape
    x, res = _big(shape, device), _big(shape, device)
    wt = (torch.randn(c, c, 3, 3, device=device) * (2 / (9 * c)) ** 0.5).to(BF16)
    wt = wt.contiguous(memory_format=torch.channels_last)
    scale, shift = _vec(c, device, 0.5, 1.5, 1), _vec(c, device, -0.3, 0.3, 2)
    out, partials = conv_ops.conv_fprop(x, wt, stride=1, padding=1, scale=scale, shift=shift, residual=res,
                                        stats=True)
    checks = []
    for a, b in _windows(shape):
        xs, rs = x[a:b], res[a:b]
        ref = F.conv2d(F.relu(xs.double() * scale.double()[:, None, None] + shift.double()[:, None, None]),
                       wt.double(), padding=1) + rs.double()
        eager = F.conv2d(F.relu(xs * scale[:, None, None] + shift[:, None, None]).to(BF16), wt, padding=1) + rs
        checks.append((f"out[{a}:{b}]", out[a:b].clone(), ref, eager))
    del x, res
    # The statistics partials of the stored output, merged, against float64 sums of it.
    mean, invstd, _, _ = bn_ops.bn_finalize(partials, n * h * w, None, None, None, None, training=True,
                                            momentum=0.0, eps=0.0, channels=c, device=device)
    s = torch.zeros(c, device=device, dtype=torch.float64)
    for chunk in out.split(512):
        s += chunk.double().sum((0, 2, 3))
    mean64 = s / (n * h * w)
    m2 = torch.zeros_like(s)
    for chunk in out.split(512):
        m2 += ((chunk.double() - mean64[:, None, None]) ** 2).sum((0, 2, 3))
    # (the kernel's statistics are of the fp32 accumulator, the reference's of the stored bf16 values)
    checks.append(("output mean", mean.clone(), mean64, LOW))
    checks.append(("output 1/std", invstd.clone(), (m2 / (n * h * w)).rsqrt(), LOW))
    return checks


def dgrad_case(shape: tuple[int, int, int, int], device: torch.device) -> list[tuple]:
    """conv_dgrad with an added gradient and the BatchNorm-ReLU backward epilogue (dz and the
    per-tile partial sums)."""
    n, c, h, w = shape
    dy, x, add = _big(shape, device), _big(shape, device), _big(shape, device)
    wt = (torch.randn(c, c, 3, 3, device=device) * (2 / (9 * c)) ** 0.5).to(BF16)
    wt = wt.contiguous(memory_format=torch.channels_last)
    scale, shift = _vec(c, device, 0.5, 1.5, 3), _vec(c, device, -0.3, 0.3, 4)
    mean, invstd = _vec(c, device, -0.2, 0.2, 5), _vec(c, device, 0.8, 1.2, 6)
    dz, (psum, psumx) = conv_ops.conv_dgrad(dy, wt, shape, stride=1, padding=1,
                                            bn=(x, scale, shift, mean, invstd), add=add)
    tiles_per_image = psum.shape[0] // n
    assert psum.shape[0] == n * tiles_per_image, "a tile would straddle two images"
    checks = []
    for a, b in _windows(shape):
        xs, dys, adds = x[a:b], dy[a:b], add[a:b]
        live = (xs.double() * scale.double()[:, None, None] + shift.double()[:, None, None]) > 0
        xhat = (xs.double() - mean.double()[:, None, None]) * invstd.double()[:, None, None]
        ref = (torch.nn.grad.conv2d_input(xs.shape, wt.double(), dys.double(), padding=1) + adds.double()) * live
        eager = (torch.nn.grad.conv2d_input(xs.shape, wt, dys, padding=1) + adds) * live
        checks.append((f"dz[{a}:{b}]", dz[a:b].clone(), ref, eager))
        t0, t1 = a * tiles_per_image, b * tiles_per_image
        checks.append((f"sum dz [{a}:{b}]", psum[t0:t1].sum(0), ref.sum((0, 2, 3)), eager.float().sum((0, 2, 3))))
        checks.append((f"sum dz*xhat [{a}:{b}]", psumx[t0:t1].sum(0), (ref * xhat).sum((0, 2, 3)),
                       (eager.float() * xhat.float()).sum((0, 2, 3))))
    return checks


def wgrad_case(shape: tuple[int, int, int, int], device: torch.device) -> list[tuple]:
    """conv_wgrad with the recomputed BN-ReLU activation; dy is zero outside the checked images,
    so the weight gradient is theirs alone."""
    n, c, h, w = shape
    x, dy = _big(shape, device), _big(shape, device, "zero")
    for a, b in _windows(shape):
        dy[a:b].normal_()
    wt = torch.empty(c, c, 3, 3, device=device, dtype=BF16).contiguous(memory_format=torch.channels_last)
    scale, shift = _vec(c, device, 0.5, 1.5, 7), _vec(c, device, -0.3, 0.3, 8)
    dw = conv_ops.conv_wgrad(dy, x, wt, stride=1, padding=1, scale=scale, shift=shift)
    ref = torch.zeros(wt.shape, device=device, dtype=torch.float64)
    eager = torch.zeros(wt.shape, device=device, dtype=torch.float32)
    for a, b in _windows(shape):
        act = F.relu(x[a:b].double() * scale.double()[:, None, None] + shift.double()[:, None, None])
        ref += torch.nn.grad.conv2d_weight(act, wt.shape, dy[a:b].double(), padding=1)
        eager += torch.nn.grad.conv2d_weight(act.to(BF16), wt.shape, dy[a:b], padding=1).float()
    return [("weight gradient", dw, ref, eager.to(BF16))]


def stats_case(shape: tuple[int, int, int, int], device: torch.device) -> list[tuple]:
    """bn_stats + bn_finalize (mean, 1/std, running statistics) of a tensor that is zero outside
    the checked images (there: mean 3, so that the merge of the partials matters)."""
    n, c, h, w = shape
    x = _big(shape, device, "zero")
    for a, b in _windows(shape):
        x[a:b].normal_(3.0, 1.0)
    g, bias = _vec(c, device, 0.5, 1.5, 9), _vec(c, device, -0.3, 0.3, 10)
    rm, rv = _vec(c, device, -0.2, 0.2, 11), _vec(c, device, 0.5, 1.5, 12)
    rm0, rv0 = rm.double(), rv.double()
    partials = bn_ops.bn_stats(x)
    mean, invstd, _, _ = bn_ops.bn_finalize(partials, n * h * w, g, bias, rm, rv, training=True, momentum=0.1,
                                            eps=1e-5, channels=c, device=device)
    count = n * h * w
    s = sum(x[a:b].double().sum((0, 2, 3)) for a, b in _windows(shape))
    mean64 = s / count
    live = sum((b - a) * h * w for a, b in _windows(shape))
    m2 = sum(((x[a:b].double() - mean64[:, None, None]) ** 2).sum((0, 2, 3)) for a, b in _windows(shape))
    m2 = m2 + (count - live) * mean64**2  # the zeros
    var = m2 / count
    return [
        ("mean", mean.clone(), mean64, FP32),
        ("1/std", invstd.clone(), (var + 1e-5).rsqrt(), FP32),
        ("running_mean", rm, 0.9 * rm0 + 0.1 * mean64, FP32),
        ("running_var", rv, 0.9 * rv0 + 0.1 * m2 / (count - 1), FP32),
    ]


def apply_case(shape: tuple[int, int, int, int], device: torch.device) -> list[tuple]:
    """The elementwise passes: bn_relu_apply, bn_add_relu (with a BatchNorm on the shortcut),
    relu_bn_bwd_partials (with an added gradient) and bn_bwd_apply (training, with an added gradient)."""
    n, c, h, w = shape
    col = [_vec(c, device, lo, hi, 20 + i)
           for i, (lo, hi) in enumerate([(0.5, 1.5), (-0.3, 0.3), (0.5, 1.5), (-0.3, 0.3), (-0.2, 0.2), (0.8, 1.2)])]
    scale, shift, sr, br, mean, invstd = col
    d = {k: v.double()[:, None, None] for k, v in zip(("scale", "shift", "sr", "br", "mean", "invstd"), col)}
    x, y = _big(shape, device), _big(shape, device)
    checks = []
    out = bn_ops.bn_relu_apply(x, scale, shift)
    for a, b in _windows(shape):
        checks.append((f"bn_relu_apply[{a}:{b}]", out[a:b].clone(), F.relu(x[a:b].double() * d["scale"] + d["shift"]),
                       LOW))
    del out
    out = bn_ops.bn_add_relu(y, x, scale, shift, sr, br)
    for a, b in _windows(shape):
        ref = F.relu(y[a:b].double() * d["scale"] + d["shift"] + x[a:b].double() * d["sr"] + d["br"])
        checks.append((f"bn_add_relu[{a}:{b}]", out[a:b].clone(), ref, LOW))
    del out
    add = _big(shape, device)
    dz, (psum, psumx) = bn_ops.relu_bn_bwd_partials(y, x, scale, shift, mean, invstd, add=add)
    for a, b in _windows(shape):
        live = (x[a:b].double() * d["scale"] + d["shift"]) > 0
        checks.append((f"relu_bn_bwd_partials[{a}:{b}]", dz[a:b].clone(),
                       (y[a:b].double() + add[a:b].double()) * live, LOW))
    del dz, psum, psumx
    # dx = weight * invstd * (dz - sum_dz / M - xhat * sum_dzx / M) + add, with weight = scale here
    count = n * h * w
        # sums of the order of the pixel count, so that their terms weigh as much as dz's
    sum_dz, sum_dzx = _vec(c, device, -0.5 * count, 0.5 * count, 30), _vec(c, device, -0.5 * count, 0.5 * count, 31)
    dx = bn_ops.bn_bwd_apply(y, x, mean, invstd, scale, sum_dz, sum_dzx, training=True, add=add)
    for a, b in _windows(shape):
        xhat = (x[a:b].double() - d["mean"]) * d["invstd"]
        ref = d["scale"] * d["invstd"] * (y[a:b].double() - sum_dz.double()[:, None, None] / count
                                          - xhat * sum_dzx.double()[:, None, None] / count) + add[a:b].double()
        checks.append((f"bn_bwd_apply[{a}:{b}]", dx[a:b].clone(), ref, LOW))
    return checks


def block_op_case(shape: tuple[int, int, int, int], device: torch.device) -> list[tuple]:
    """``fusedres.bn_relu_conv2d`` in training, forward and backward, through its whole chain
    (statistics pass, finalize, fprop; dgrad, wgrad, BatchNorm backward). x and dy are zero
    outside the checked images, so that every sum over pixels is theirs (plus known zeros)."""
    n, c, h, w = shape
    count = n * h * w
    x = _big(shape, device, "zero")
    for a, b in _windows(shape):
        x[a:b].normal_(1.0, 1.0)
    wt = (torch.randn(c, c, 3, 3, device=device) * (2 / (9 * c)) ** 0.5).to(BF16)
    wt = wt.contiguous(memory_format=torch.channels_last).requires_grad_()
    g = _vec(c, device, 0.5, 1.5, 40).requires_grad_()
    bias = _vec(c, device, -0.3, 0.3, 41).requires_grad_()
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    xg = x.requires_grad_()
    y = fusedres.bn_relu_conv2d(xg, wt, g, bias, rm, rv, training=True, padding=1)
    dy = _big(shape, device, "zero")
    for a, b in _windows(shape):
        dy[a:b].normal_()
    y.backward(dy)
    # float64 reference on the checked images with the global batch statistics (the zeros elsewhere
    # contribute to the mean and variance only; dz, and so every backward sum, is zero there).
    win = _windows(shape)
    live = sum((b - a) * h * w for a, b in win)
    s = sum(x[a:b].detach().double().sum((0, 2, 3)) for a, b in win)
    mean = s / count
    m2 = sum(((x[a:b].detach().double() - mean[:, None, None]) ** 2).sum((0, 2, 3)) for a, b in win)
    m2 = m2 + (count - live) * mean**2
    invstd = (m2 / count + 1e-5).rsqrt()
    g64, b64, w64 = g.detach().double(), bias.detach().double(), wt.detach().double()
    scale = (g64 * invstd)[:, None, None]
    shift = (b64 - mean * g64 * invstd)[:, None, None]
    checks = [("running_mean", rm, 0.1 * mean, FP32), ("running_var", rv, 0.9 + 0.1 * m2 / (count - 1), FP32)]
    dw = torch.zeros_like(w64)
    sum_dz = torch.zeros_like(mean)
    sum_dzx = torch.zeros_like(mean)
    parts = []
    for a, b in win:
        xs = x[a:b].detach().double()
        pre = xs * scale + shift
        checks.append((f"out[{a}:{b}]", y[a:b].detach().clone(), F.conv2d(F.relu(pre), w64, padding=1), LOW))
        dys = dy[a:b].double()
        dw += torch.nn.grad.conv2d_weight(F.relu(pre), w64.shape, dys, padding=1)
        dz = torch.nn.grad.conv2d_input(xs.shape, w64, dys, padding=1) * (pre > 0)
        xhat = (xs - mean[:, None, None]) * invstd[:, None, None]
        sum_dz += dz.sum((0, 2, 3))
        sum_dzx += (dz * xhat).sum((0, 2, 3))
        parts.append((a, b, dz, xhat))
    for a, b, dz, xhat in parts:
        dx = (g64 * invstd)[:, None, None] * (dz - sum_dz[:, None, None] / count
                                              - xhat * sum_dzx[:, None, None] / count)
        checks.append((f"grad x[{a}:{b}]", x.grad[a:b].clone(), dx, LOW))
    checks += [("grad weight", wt.grad, dw, LOW), ("grad bn_weight", g.grad, sum_dzx, LOW),
               ("grad bn_bias", bias.grad, sum_dz, LOW)]
    return checks


CASES = {"fprop": fprop_case, "dgrad": dgrad_case, "wgrad": wgrad_case, "stats": stats_case,
         "apply": apply_case, "bn_relu_conv2d": block_op_case}


@pytest.mark.parametrize("name", list(CASES))
def test_past_2_31_elements(name: str) -> None:
    device = torch.device("cuda")
    assert SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] > INT32_LIMIT
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs about 30 GB of free device memory, {free / 2**30:.1f} GB free")
    before = sum(fusedres.launch_counts.values())
    checks = CASES[name](SHAPE, device)
    assert sum(fusedres.launch_counts.values()) > before, "no Triton kernel ran"
    for what, fused, ref, eager in checks:
        _check(fused, ref, eager, what)
