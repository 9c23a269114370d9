"""Reductions done by the last program of the launch that produced their partials (an acq_rel
ticket per channel block or tile: fusedres.ops.bn.stats_ticket / sums_ticket, the wgrad splits)
against the two-launch path (fusedres.ops.bn.producer_reductions(False)), bit for bit, one level
and two (more than TWO_LEVEL_TILES tiles), with the counters left at zero.

The interpreter runs programs one after another, so here the tests check the arithmetic, the order
and the re-arming; the ordering between programs is the GPU's: ``test_cuda_ticket_stress`` repeats
large grids many times against the two-launch path."""

from __future__ import annotations

import pytest
import torch
from _helpers import launched

from fusedres.ops import bn as bn_ops
from fusedres.ops import conv as conv_ops
from fusedres.ops.configs import TWO_LEVEL_TILES, ConvConfig

cl = torch.channels_last


#: The convolution tests' two-level merges with chunks of 4 tiles above 16 (production: 64 above
#: 256): the same kernels and code paths, several chunks and a partial last one, from grids of ~20
#: tiles instead of ~270 (whose serial chunk loops the interpreter runs op by op). The stats test
#: below keeps the production constants; the CUDA stress test runs them at scale.
SMALL_BLOCK_T = 4
SMALL_TWO_LEVEL_TILES = 4 * SMALL_BLOCK_T


@pytest.fixture
def small_chunks(monkeypatch):
    from fusedres.ops import hopper

    for mod in (bn_ops, conv_ops, hopper):
        monkeypatch.setattr(mod, "FINALIZE_BLOCK_T", SMALL_BLOCK_T)
    for mod in (bn_ops, hopper):
        monkeypatch.setattr(mod, "TWO_LEVEL_TILES", SMALL_TWO_LEVEL_TILES)
    bn_ops.clear_plans()  # a cached launch plan holds the constants it was built with
    yield
    bn_ops.clear_plans()


def _counters_rearmed() -> None:
    assert all(int(c.abs().sum()) == 0 for c in bn_ops._COUNTERS.values()), "a ticket counter was left armed"


def _fin(C: int, device, running: bool, affine: bool = True):
    g = torch.Generator().manual_seed(C)
    w = (torch.rand(C, generator=g) + 0.5).to(device) if affine else None
    b = torch.randn(C, generator=g).to(device) if affine else None
    rm = torch.randn(C, generator=g).to(device) if running else None
    rv = (torch.rand(C, generator=g) + 0.5).to(device) if running else None
    return w, b, rm, rv


def _stats_both(produce, C: int, count: int, device, running: bool = True, affine: bool = True):
    """(stats, running mean, running var) by the ticket and by the two-launch path."""
    out = []
    for ticket in (True, False):
        w, b, rm, rv = _fin(C, device, running, affine)
        stats = torch.full((4, C), float("nan"), device=device)
        fin = bn_ops.Finalize(stats, w, b, rm, rv, None, 0.1, 1e-5)
        with bn_ops.producer_reductions(ticket):
            partials = produce(fin)
            if ticket:
                assert partials is fin
            else:
                bn_ops.bn_finalize(partials, count, w, b, rm, rv, training=True, momentum=0.1, eps=1e-5,
                                   channels=C, device=device, out=stats)
        out.append([stats] + ([rm, rv] if running else []))
    return out


@pytest.mark.parametrize("pixels", [(2, 7, 9), (2, 160, 103)], ids=["one-level", "two-level"])
@pytest.mark.parametrize("affine,running", [(True, True), (False, False)], ids=["affine-running", "plain"])
def test_bn_stats_ticket_bitwise(poison, device, pixels, affine, running):
    n, h, w = pixels
    C = 5  # not a multiple of the channel block
    x = (torch.randn(n, C, h, w, device=device) * 3 + 5).contiguous(memory_format=cl)
    tiles = -(-n * h * w // bn_ops.STATS_CONFIG.block_m)
    assert (tiles > TWO_LEVEL_TILES) == (pixels[1] > 100)
    with launched("bn_stats_kernel"):
        a, b = _stats_both(lambda fin: bn_ops.bn_stats(x, finalize=fin), C, n * h * w, device, running, affine)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    ref = x.double().transpose(0, 1).reshape(C, -1)
    assert torch.allclose(a[0][0].double(), ref.mean(1), rtol=1e-5, atol=1e-5)
    _counters_rearmed()


@pytest.mark.parametrize("tiles", ["one-level", "two-level"])
def test_conv_fprop_ticket_bitwise(poison, device, tiles, small_chunks):
    """Several column blocks (Cout 40 over tiles of 16 channels) each finalized by their last tile."""
    N, C, H, W, K = (2, 3, 6, 5, 40) if tiles == "one-level" else (2, 3, 12, 13, 6)
    cfg = ConvConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)
    x = torch.randn(N, C, H, W, device=device).contiguous(memory_format=cl)
    wt = torch.randn(K, C, 3, 3, device=device).contiguous(memory_format=cl)
    assert ((N * H * W + 15) // 16 > SMALL_TWO_LEVEL_TILES) == (tiles == "two-level")
    outs = []

    def produce(fin):
        y, partials = conv_ops.conv_fprop(x, wt, stride=1, padding=1, stats=True, finalize=fin, config=cfg)
        outs.append(y)
        return partials

    with launched("conv_fprop_kernel"):
        a, b = _stats_both(produce, K, N * H * W, device)
    assert torch.equal(outs[0], outs[1])
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    _counters_rearmed()


@pytest.mark.parametrize("tiles,ksize,stride,pad", [
    ("one-level", 1, 1, 0), ("two-level", 1, 1, 0), ("one-level", 3, 2, 1), ("two-level", 3, 2, 1),
    ("one-level", 1, 2, 0),
], ids=["1x1s1-one-level", "1x1s1-two-level", "3x3s2-one-level", "3x3s2-two-level", "1x1s2-one-level"])
def test_conv_dgrad_sums_ticket_bitwise(poison, device, tiles, ksize, stride, pad, small_chunks):
    """At stride 2 the tiles of the four parity classes (of different sizes: odd sides; at 1x1,
    three without taps) are the T tiles of the ticket, each once."""
    N, C, H, W, K = (2, 40, 5, 6, 8) if tiles == "one-level" else (2, 6, 12, 13, 4)
    cfg = ConvConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)
    g = torch.Generator().manual_seed(3)
    OH, OW = (conv_ops.conv_out_size(n, ksize, stride, pad) for n in (H, W))
    dy = torch.randn(N, K, OH, OW, generator=g).to(device).contiguous(memory_format=cl)
    wt = torch.randn(K, C, ksize, ksize, generator=g).to(device).contiguous(memory_format=cl)
    x = torch.randn(N, C, H, W, generator=g).to(device).contiguous(memory_format=cl)
    vec = [torch.randn(C, generator=g).to(device) for _ in range(4)]
    bn = (x, vec[0], vec[1], vec[2], vec[3].abs() + 0.5)
    res = []
    for ticket in (True, False):
        with bn_ops.producer_reductions(ticket), launched("conv_dgrad_kernel"):
            dz, sums = conv_ops.conv_dgrad(dy, wt, tuple(x.shape), stride=stride, padding=pad, bn=bn,
                                           reduce_sums=True, config=cfg)
            if ticket:
                assert isinstance(sums, bn_ops.Sums)
            else:
                assert (sums[0].shape[0] > SMALL_TWO_LEVEL_TILES) == (tiles == "two-level")
                sums = bn_ops.bn_bwd_reduce(*sums)
        res.append((dz, *sums))
    for u, v in zip(*res):
        assert torch.equal(u, v)
    assert torch.allclose(res[0][1].double().cpu(), res[0][0].double().cpu().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    _counters_rearmed()


def test_conv_wgrad_ticket_bitwise(poison, device, small_chunks):
    """Several tiles (Cout 40, Cin 19 over 16x16 tiles, 9 taps), each reduced by its last split."""
    N, C, H, W, K = 2, 19, 7, 6, 40
    cfg = ConvConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)
    dy = torch.randn(N, K, H, W, device=device).contiguous(memory_format=cl)
    x = torch.randn(N, C, H, W, device=device).contiguous(memory_format=cl)
    w_like = torch.empty(K, C, 3, 3, device=device)  # NCHW: the reduction writes through dw's strides
    sc, sh = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    res = []
    for ticket in (True, False):
        with bn_ops.producer_reductions(ticket), launched("conv_wgrad_kernel"):
            res.append(conv_ops.conv_wgrad(dy, x, w_like, stride=1, padding=1, scale=sc, shift=sh, splits=3,
                                           config=cfg))
    assert torch.equal(res[0], res[1]) and res[0].stride() == w_like.stride()
    _counters_rearmed()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the interpreter runs programs one at a time")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_ticket_stress(dtype):
    """Many launches of large grids (thousands of programs per launch, two-level merges, many
    channel blocks and wgrad tiles racing for their tickets), each compared bit for bit with the
    two-launch path: a missing release/acquire or a stale L1 read shows as a differing bit."""
    torch.manual_seed(0)
    N, C, H, W, K = 64, 64, 32, 32, 128  # 65536 pixels: 512 fprop tiles of 128 (two levels), 2 column blocks
    x = torch.randn(N, C, H, W, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    wt = (torch.randn(K, C, 3, 3, device="cuda", dtype=dtype) * 0.05).contiguous(memory_format=cl)
    dy = torch.randn(N, K, H, W, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    vec = [torch.randn(C, device="cuda") for _ in range(4)]
    bn = (x, vec[0], vec[1], vec[2], vec[3].abs() + 0.5)

    def run(ticket: bool):
        w, b, rm, rv = _fin(K, "cuda", True)
        stats = torch.empty((4, K), device="cuda")
        fin = bn_ops.Finalize(stats, w, b, rm, rv, None, 0.1, 1e-5)
        with bn_ops.producer_reductions(ticket):
            y, partials = conv_ops.conv_fprop(x, wt, stride=1, padding=1, stats=True, finalize=fin)
            if not ticket:
                bn_ops.bn_finalize(partials, N * H * W, w, b, rm, rv, training=True, momentum=0.1, eps=1e-5,
                                   channels=K, device=x.device, out=stats)
            s_stats = torch.empty((4, C), device="cuda")
            p = bn_ops.bn_stats(x, finalize=bn_ops.Finalize(s_stats, None, None, None, None, None, 0.1, 1e-5))
            if not ticket:
                bn_ops.bn_finalize(p, N * H * W, None, None, None, None, training=True, momentum=0.1, eps=1e-5,
                                   channels=C, device=x.device, out=s_stats)
            dz, sums = conv_ops.conv_dgrad(dy, wt, tuple(x.shape), stride=1, padding=1, bn=bn, reduce_sums=True)
            if not ticket:
                sums = bn_ops.bn_bwd_reduce(*sums)
            dw = conv_ops.conv_wgrad(dy, x, wt, stride=1, padding=1, scale=vec[0], shift=vec[1])
        return [y, stats, rm, rv, s_stats, dz, *sums, dw]

    ref = run(False)
    for _ in range(200):
        got = run(True)
        for r, v in zip(ref, got):
            assert torch.equal(r, v)
    torch.cuda.synchronize()
    _counters_rearmed()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the interpreter runs programs one at a time")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_merged_backward_stress(dtype):
    """The merged backward launch (conv.conv_bwd_kernel: the dgrad's sums ticket and the wgrad's
    split tickets racing in one grid, on adjacent counters) against the two launches, bit for bit,
    many times over a large grid (two-level sums)."""
    torch.manual_seed(0)
    N, C, H, W, K = 64, 32, 32, 32, 32  # 65536 pixels: 512 dgrad tiles of 128 (two levels); equal warps
    x = torch.randn(N, C, H, W, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    wt = (torch.randn(K, C, 3, 3, device="cuda", dtype=dtype) * 0.05).contiguous(memory_format=cl)
    dy = torch.randn(N, K, H, W, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    vec = [torch.randn(C, device="cuda") for _ in range(4)]
    bn = (x, vec[0], vec[1], vec[2], vec[3].abs() + 0.5)
    dplan = conv_ops.dgrad_plan(dy, wt, tuple(x.shape), stride=1, padding=1, bn=bn, reduce_sums=True)
    wplan = conv_ops.wgrad_plan(dy, x, wt, stride=1, padding=1, scale=vec[0])
    plan = conv_ops.bwd_plan(dplan, wplan, x.device)
    assert plan is not None, "the stress shape must take the merged launch"
    dz, sums = conv_ops.conv_dgrad(dy, wt, tuple(x.shape), stride=1, padding=1, bn=bn, reduce_sums=True)
    ref = [dz, *sums, conv_ops.conv_wgrad(dy, x, wt, stride=1, padding=1, scale=vec[0], shift=vec[1])]
    for _ in range(200):
        mdz, msums, mdw = conv_ops.conv_bwd(plan, dy, wt, bn=bn, add=None, x=x, weight_like=wt, scale=vec[0],
                                            shift=vec[1])
        for r, v in zip(ref, [mdz, *msums, mdw]):
            assert torch.equal(r, v)
    torch.cuda.synchronize()
    _counters_rearmed()
