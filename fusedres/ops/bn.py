"""Per-channel BatchNorm kernels: statistics, finalize, backward sums and backward apply.

Layout contract of the launchers (no autograd, no modules):

- Activations are 4-D ``(N, C, H, W)`` tensors with any strides (channels_last reads best),
  fp32, fp16 or bf16; everything per channel is fp32.
- Statistics travel as per-tile partials: ``tile_mean`` and ``tile_m2`` (sum of squared
  deviations from the tile's mean), each ``(tiles, C)`` fp32, where tile ``t`` holds rows
  ``[t*tile_rows, (t+1)*tile_rows)`` of the ``N*H*W`` pixels. Merging them with Chan's
  formula in a fixed order keeps the variance exact when |mean| >> std and makes the
  result independent of scheduling (no atomics).
- Running statistics are updated in place, in their own dtype, exactly as
  ``torch.nn.functional.batch_norm`` does (unbiased variance, ``momentum`` weight).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from .._runtime import cdiv, launch
from .configs import APPLY_CONFIG, FINALIZE_BLOCK_C, FINALIZE_BLOCK_T, STATS_CONFIG, TWO_LEVEL_TILES

#: Most pixels (N*H*W) one launch may cover. The kernels index pixels in int32 (``pid * BLOCK_M +
#: row``, tile starts ``t * TILE_ROWS``) and turn them into int64 only after splitting them into
#: (n, h, w), so every address is int64 and tensors of more than 2**31 elements are fine; the
#: margin keeps the last tile's row indices below 2**31 too.
MAX_PIXELS = 2**31 - 2**16


def pixels(n: int, h: int, w: int) -> int:
    """``n * h * w``, the pixel count of a launch; a ValueError past :data:`MAX_PIXELS`."""
    m = n * h * w
    if m > MAX_PIXELS:
        raise ValueError(f"fusedres: {n}x{h}x{w} = {m} pixels in one tensor; the kernels take at most "
                         f"{MAX_PIXELS} (split the batch)")
    return m


@triton.jit
def relu(v):
    """max(v, 0) as ``torch.relu`` computes it: NaN stays NaN. (Plain ``tl.maximum`` compiles to
    PTX ``max.f32``, which returns the operand that is not NaN: a NaN would come out as 0.)"""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def relu_passes(pre):
    """Where ReLU's backward lets the gradient through, as eager's ``threshold_backward(grad,
    relu(pre), 0)`` does: everywhere but ``relu(pre) <= 0`` — so also where ``pre`` is NaN (a
    NaN compares false), which ``pre > 0`` would block."""
    return ~(pre <= 0.0)


@triton.jit
def tile_mean_m2(vals, mask, count):
    """Per-column mean and sum of squared deviations of the masked rows of a tile (the partials
    that :func:`bn_finalize` merges); also used by the convolution epilogue."""
    v = tl.where(mask, vals, 0.0)
    mean = tl.sum(v, axis=0) / count
    d = tl.where(mask, vals - mean[None, :], 0.0)
    return mean, tl.sum(d * d, axis=0)


@triton.jit
def _pixel_tile(M, H, W, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: BLOCK_M pixels (n, h, w as int64) x BLOCK_C channels, and its mask."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    w = (offs_m % W).to(tl.int64)
    t = offs_m // W
    h = (t % H).to(tl.int64)
    n = (t // H).to(tl.int64)
    mask = (offs_m < M)[:, None] & c_ok[None, :]
    return pid_m, offs_c, c_ok, n, h, w, offs_c.to(tl.int64)[None, :], mask


@triton.jit
def bn_stats_kernel(
    x_ptr, r_ptr, pmean_ptr, pm2_ptr, H, W, C, M,
    sxn, sxc, sxh, sxw,
    srn, src, srh, srw,
    counter_ptr, cmean_ptr, cm2_ptr, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, rmean_out_ptr, rvar_out_ptr,
    batches_ptr, stats_ptr, momentum, eps,
    ADD: tl.constexpr, TICKET: tl.constexpr, TWO_LEVEL: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-tile mean and M2 of each channel of x over BLOCK_M pixels. With ADD, x += r first
    (in place, rounded to x's dtype) and the statistics are those of the sum. With TICKET the
    last tile of each channel block finalizes them (:func:`stats_ticket`)."""
    pid_m, offs_c, c_ok, n, h, w, c64, mask = _pixel_tile(M, H, W, C, BLOCK_M, BLOCK_C)
    x_ptrs = x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + c64 * sxc
    v = tl.load(x_ptrs, mask=mask, other=0.0)
    if ADD:
        r = tl.load(r_ptr + (n * srn + h * srh + w * srw)[:, None] + c64 * src, mask=mask, other=0.0)
        v = (v.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_ptrs, v, mask=mask)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    mean, m2 = tile_mean_m2(v.to(tl.float32), mask, count)
    tl.store(pmean_ptr + pid_m * C + offs_c, mean, mask=c_ok)
    tl.store(pm2_ptr + pid_m * C + offs_c, m2, mask=c_ok)
    if TICKET:
        stats_ticket(pmean_ptr, pm2_ptr, pid_m, tl.program_id(1), tl.num_programs(1), tl.num_programs(0), C, M,
                     BLOCK_M, offs_c, c_ok, counter_ptr, cmean_ptr, cm2_ptr, weight_ptr, bias_ptr, rmean_ptr,
                     rvar_ptr, rmean_out_ptr, rvar_out_ptr, batches_ptr, stats_ptr, momentum, eps,
                     TWO_LEVEL, UPDATE_RUNNING, HAS_WEIGHT, HAS_BIAS, BLOCK_T)


@triton.jit
def _chunk_mean_m2(pmean_ptr, pm2_ptr, t0, T, C, M, TILE_ROWS, offs_c, c_ok, BLOCK_T: tl.constexpr):
    """Count, mean and M2 of tiles [t0, t0 + BLOCK_T) merged (tile t holds
    min(M - t*TILE_ROWS, TILE_ROWS) rows).

    Each channel's sums run over the tiles one after another, in tile order, starting from zero
    (the order of numpy's axis-0 sum, so the interpreter gives what a ``tl.sum`` over the chunk
    gave): a sum's rounding then does not depend on how the compiler spreads the tile over
    threads, so a kernel with any ``num_warps`` (the convolution's last program, the finalize
    kernel) gets the same bits. The loops are not unrolled: unrolled, their loads and partial
    results held 255 registers and spilled in every convolution that finalizes in its last
    program (offline sm_90 build), and a kernel's register count is paid by every program, not
    only the last. ``.cg`` reads the rows from L2, where the producing programs' stores are
    visible (see :func:`stats_ticket`)."""
    n_b = 0.0
    s = tl.zeros(offs_c.shape, dtype=tl.float32)
    q = tl.zeros(offs_c.shape, dtype=tl.float32)
    # Past T the body is skipped (the interpreter then runs two ops per tile instead of ~20; a
    # masked body would add zeros); the trip count stays BLOCK_T. The second loop keeps its masks:
    # a branch there, or a bound of min(T, t0 + BLOCK_T) on either loop, cost the register-capped
    # sm_90 fprop's ticket (256 channels, 128 registers) 8 bytes of spill (offline, Triton 3.8).
    for i in range(BLOCK_T):
        t = t0 + i
        if t < T:
            cnt = tl.minimum(M - t * TILE_ROWS, TILE_ROWS).to(tl.float32)
            idx = t.to(tl.int64) * C + offs_c
            pm = tl.load(pmean_ptr + idx, mask=c_ok, other=0.0, cache_modifier=".cg")
            s = s + cnt * pm
            q = q + tl.load(pm2_ptr + idx, mask=c_ok, other=0.0, cache_modifier=".cg")
            n_b = n_b + cnt
    mean_b = s / n_b
    d = tl.zeros(offs_c.shape, dtype=tl.float32)
    for i in range(BLOCK_T):
        t = t0 + i
        ok = t < T
        cnt = tl.where(ok, tl.minimum(M - t * TILE_ROWS, TILE_ROWS), 0).to(tl.float32)
        pm = tl.load(pmean_ptr + t.to(tl.int64) * C + offs_c, mask=ok & c_ok, other=0.0, cache_modifier=".cg")
        dev = tl.where(ok & c_ok, pm - mean_b, 0.0)
        d = d + cnt * dev * dev
    return n_b, mean_b, q + d


@triton.jit
def _chunk_sums(psum_ptr, psumx_ptr, t0, T, C, offs_c, c_ok, BLOCK_T: tl.constexpr):
    """Sums of rows [t0, t0 + BLOCK_T) of two (tiles, C) partials, row after row in order from
    zero (see :func:`_chunk_mean_m2` for why)."""
    s = tl.zeros(offs_c.shape, dtype=tl.float32)
    sx = tl.zeros(offs_c.shape, dtype=tl.float32)
    for i in range(BLOCK_T):
        t = t0 + i
        if t < T:  # the rows that exist: past T the masked loads would add zeros (see _chunk_mean_m2)
            idx = t.to(tl.int64) * C + offs_c
            s = s + tl.load(psum_ptr + idx, mask=c_ok, other=0.0, cache_modifier=".cg")
            sx = sx + tl.load(psumx_ptr + idx, mask=c_ok, other=0.0, cache_modifier=".cg")
    return s, sx


@triton.jit
def bn_merge_kernel(
    pmean_ptr, pm2_ptr, T, C, M, TILE_ROWS, out_mean_ptr, out_m2_ptr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """First level of a two-level merge: program (j, c) merges tiles [j*BLOCK_T, (j+1)*BLOCK_T)
    into row j of the output partials (whose tiles then hold BLOCK_T*TILE_ROWS rows each). The
    chunks run along grid x: a grid's y extent stops at 65535, reached past ~2.7e8 pixels."""
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    _merge_chunk(pmean_ptr, pm2_ptr, tl.program_id(0), T, C, M, TILE_ROWS, offs_c, offs_c < C, out_mean_ptr,
                 out_m2_ptr, BLOCK_T)


@triton.jit
def _merge_chunk(pmean_ptr, pm2_ptr, j, T, C, M, TILE_ROWS, offs_c, c_ok, out_mean_ptr, out_m2_ptr,
                 BLOCK_T: tl.constexpr):
    _, mean_b, m2_b = _chunk_mean_m2(pmean_ptr, pm2_ptr, j * BLOCK_T, T, C, M, TILE_ROWS, offs_c, c_ok, BLOCK_T)
    tl.store(out_mean_ptr + j * C + offs_c, mean_b, mask=c_ok)
    tl.store(out_m2_ptr + j * C + offs_c, m2_b, mask=c_ok)


@triton.jit
def bn_sum_chunks_kernel(
    psum_ptr, psumx_ptr, T, C, out_sum_ptr, out_sumx_ptr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """First level of a two-level sum: program (j, c) sums rows [j*BLOCK_T, (j+1)*BLOCK_T) (chunks
    along grid x, as in :func:`bn_merge_kernel`)."""
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    _sum_chunk(psum_ptr, psumx_ptr, tl.program_id(0), T, C, offs_c, offs_c < C, out_sum_ptr, out_sumx_ptr, BLOCK_T)


@triton.jit
def _sum_chunk(psum_ptr, psumx_ptr, j, T, C, offs_c, c_ok, out_sum_ptr, out_sumx_ptr, BLOCK_T: tl.constexpr):
    s, sx = _chunk_sums(psum_ptr, psumx_ptr, j * BLOCK_T, T, C, offs_c, c_ok, BLOCK_T)
    tl.store(out_sum_ptr + j * C + offs_c, s, mask=c_ok)
    tl.store(out_sumx_ptr + j * C + offs_c, sx, mask=c_ok)


@triton.jit
def bn_finalize_kernel(
    pmean_ptr, pm2_ptr, T, C, M, TILE_ROWS,
    weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, rmean_out_ptr, rvar_out_ptr,
    batches_ptr, stats_ptr, momentum, eps,
    TRAINING: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """mean, invstd and the prologue's scale/shift per channel (rows 0-3 of the (4, C) ``stats``);
    running-stat update in training.

    Training merges the tile partials chunk by chunk (Chan et al.); eval reads the running
    statistics instead. The updated running statistics go to ``r*_out_ptr`` (the running
    statistics themselves for an in-place update). Training also counts the batch in
    ``batches_ptr`` (see :func:`finalize_channels`).
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    finalize_channels(pmean_ptr, pm2_ptr, T, C, M, TILE_ROWS, offs_c, offs_c < C,
                      weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, rmean_out_ptr, rvar_out_ptr,
                      batches_ptr, tl.program_id(0) == 0, stats_ptr,
                      momentum, eps, TRAINING, UPDATE_RUNNING, HAS_WEIGHT, HAS_BIAS, BLOCK_T)


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """(count, mean, M2) of two merged groups (Chan et al.)."""
    n_ab = n_a + n_b
    delta = mean_b - mean_a
    # A mean of +-Inf (an infinite input) makes delta infinite or NaN: the weighted form then
    # gives the mean eager PyTorch gives (the sum over the count), where mean_a + delta * w would
    # give NaN. M2 is NaN there already (Inf - Inf in the tile).
    mean = tl.where(tl.abs(delta) < float("inf"), mean_a + delta * (n_b / n_ab),
                    mean_a * (n_a / n_ab) + mean_b * (n_b / n_ab))
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n_ab)
    return n_ab, mean, m2


@triton.jit
def finalize_channels(
    pmean_ptr, pm2_ptr, T, C, M, TILE_ROWS, offs_c, c_ok,
    weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, rmean_out_ptr, rvar_out_ptr, batches_ptr, first_block, stats_ptr,
    momentum, eps,
    TRAINING: tl.constexpr, UPDATE_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """What :func:`bn_finalize_kernel` does for the channels ``offs_c``: also run by the last
    program of a kernel that produced the partials (:func:`stats_ticket`).

    Training counts the batch: the program finalizing the first channel block (``first_block``)
    adds 1 to the int64 at ``batches_ptr`` — the BatchNorm's ``num_batches_tracked``, which the
    module would increment in its forward, or :func:`batch_sink` where the caller counts itself
    (one atomic, so that no ``_foreach_add_`` launch is needed for a counter the finalize owns)."""
    if TRAINING:
        if first_block:
            tl.atomic_add(batches_ptr, 1, sem="relaxed")
        n_a = tl.zeros(offs_c.shape, dtype=tl.float32)
        mean_a = tl.zeros(offs_c.shape, dtype=tl.float32)
        m2_a = tl.zeros(offs_c.shape, dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            n_b, mean_b, m2_b = _chunk_mean_m2(pmean_ptr, pm2_ptr, t0, T, C, M, TILE_ROWS, offs_c, c_ok, BLOCK_T)
            n_a, mean_a, m2_a = chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
        mean = mean_a
        var = m2_a / n_a
        if UPDATE_RUNNING:
            rm = tl.load(rmean_ptr + offs_c, mask=c_ok, other=0.0)
            rv = tl.load(rvar_ptr + offs_c, mask=c_ok, other=0.0)
            unbiased = m2_a / (n_a - 1.0)
            new_rm = (1.0 - momentum) * rm.to(tl.float32) + momentum * mean
            new_rv = (1.0 - momentum) * rv.to(tl.float32) + momentum * unbiased
            tl.store(rmean_out_ptr + offs_c, new_rm.to(rm.dtype), mask=c_ok)
            tl.store(rvar_out_ptr + offs_c, new_rv.to(rv.dtype), mask=c_ok)
    else:
        mean = tl.load(rmean_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        var = tl.load(rvar_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32) * invstd
    else:
        scale = invstd
    shift = -mean * scale
    if HAS_BIAS:
        shift += tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(stats_ptr + offs_c, mean, mask=c_ok)
    tl.store(stats_ptr + C + offs_c, invstd, mask=c_ok)
    tl.store(stats_ptr + 2 * C + offs_c, scale, mask=c_ok)
    tl.store(stats_ptr + 3 * C + offs_c, shift, mask=c_ok)


@triton.jit
def _last_ticket(counter_ptr, takers):
    """True in the program that draws the last of ``takers`` tickets of ``counter``, which it re-arms.

    Why that program sees every other program's partials: each program stores its partials, then
    takes its ticket with an acq_rel atomic at GPU scope. Triton emits a CTA barrier (bar.sync)
    before the atomic, so all threads' stores precede it in the CTA, and the atomic's release
    orders them before the counter update at GPU scope. The last ticket's atomic reads the value
    written by every earlier release in the counter's modification order, so its acquire makes
    every partial store happen-before what that program does next; its threads wait at the barrier
    Triton puts after the atomic (the ticket is broadcast through shared memory) and then read
    the partials with ``ld.global.cg`` (L2: no stale L1 line; L1 is not coherent). The counter is
    reset to zero by that program, after which no program of this launch touches it, and the next
    launch on the stream starts after this one ends (one counter buffer per stream:
    :func:`ticket_counters`)."""
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == takers - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def stats_ticket(
    pmean_ptr, pm2_ptr, pid_m, col, n_cols, T, C, M, TILE_ROWS, offs_c, c_ok, counter_ptr, cmean_ptr, cm2_ptr,
    weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, rmean_out_ptr, rvar_out_ptr, batches_ptr, stats_ptr, momentum, eps,
    TWO_LEVEL: tl.constexpr, UPDATE_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """After tile ``pid_m`` of column block ``col`` stored its (mean, M2) partials: the last of the T
    tiles of the column finalizes the column's channels exactly as :func:`bn_finalize` does
    (same helpers, same order, so the same bits), in the producing launch.

    TWO_LEVEL (more than TWO_LEVEL_TILES tiles, where bn_finalize first merges chunks of BLOCK_T
    tiles in parallel): the last tile of each chunk merges the chunk into ``cmean/cm2`` row
    (chunk) as :func:`bn_merge_kernel` does, then takes a ticket of the column; the last chunk
    finalizes from the chunk rows. Counters: (n_cols, chunks) for the chunks, then n_cols for the
    columns (one level: n_cols)."""
    if TWO_LEVEL:
        chunks = tl.cdiv(T, BLOCK_T)
        chunk = pid_m // BLOCK_T
        if _last_ticket(counter_ptr + col * chunks + chunk, tl.minimum(T - chunk * BLOCK_T, BLOCK_T)):
            _merge_chunk(pmean_ptr, pm2_ptr, chunk, T, C, M, TILE_ROWS, offs_c, c_ok, cmean_ptr, cm2_ptr, BLOCK_T)
            if _last_ticket(counter_ptr + n_cols * chunks + col, chunks):
                finalize_channels(cmean_ptr, cm2_ptr, chunks, C, M, TILE_ROWS * BLOCK_T, offs_c, c_ok,
                                  weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, rmean_out_ptr, rvar_out_ptr,
                                  batches_ptr, col == 0, stats_ptr,
                                  momentum, eps, True, UPDATE_RUNNING, HAS_WEIGHT, HAS_BIAS, BLOCK_T)
    else:
        if _last_ticket(counter_ptr + col, T):
            finalize_channels(pmean_ptr, pm2_ptr, T, C, M, TILE_ROWS, offs_c, c_ok,
                              weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, rmean_out_ptr, rvar_out_ptr,
                              batches_ptr, col == 0, stats_ptr,
                              momentum, eps, True, UPDATE_RUNNING, HAS_WEIGHT, HAS_BIAS, BLOCK_T)


@triton.jit
def sums_ticket(
    psum_ptr, psumx_ptr, pid_m, col, n_cols, T, C, offs_c, c_ok, counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr,
    TWO_LEVEL: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """After tile ``pid_m`` of column block ``col`` stored its backward partial sums: the last of the
    T tiles of the column sums them as :func:`bn_bwd_reduce` does (two levels above
    TWO_LEVEL_TILES, as :func:`bn_bwd_chunks` then the reduction), in the producing launch. The
    ordering argument is :func:`_last_ticket`'s; the counters are laid out as in
    :func:`stats_ticket`."""
    if TWO_LEVEL:
        chunks = tl.cdiv(T, BLOCK_T)
        chunk = pid_m // BLOCK_T
        if _last_ticket(counter_ptr + col * chunks + chunk, tl.minimum(T - chunk * BLOCK_T, BLOCK_T)):
            _sum_chunk(psum_ptr, psumx_ptr, chunk, T, C, offs_c, c_ok, csum_ptr, csumx_ptr, BLOCK_T)
            if _last_ticket(counter_ptr + n_cols * chunks + col, chunks):
                bn_bwd_sum_channels(csum_ptr, csumx_ptr, sum_ptr, sumx_ptr, chunks, C, offs_c, c_ok, BLOCK_T)
    else:
        if _last_ticket(counter_ptr + col, T):
            bn_bwd_sum_channels(psum_ptr, psumx_ptr, sum_ptr, sumx_ptr, T, C, offs_c, c_ok, BLOCK_T)


@triton.jit
def bn_bwd_reduce_kernel(
    psum_ptr, psumx_ptr, sum_ptr, sumx_ptr, T, C,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """sum over tiles of the dgrad epilogue's partial sums, in a fixed order."""
    bn_bwd_reduce_block(tl.program_id(0), psum_ptr, psumx_ptr, sum_ptr, sumx_ptr, T, C, BLOCK_T, BLOCK_C)


@triton.jit
def bn_bwd_reduce_block(pid, psum_ptr, psumx_ptr, sum_ptr, sumx_ptr, T, C,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channel block ``pid`` of :func:`bn_bwd_reduce_kernel` (also run by the convolution module's
    combined weight-gradient and backward-sum reduction)."""
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    bn_bwd_sum_channels(psum_ptr, psumx_ptr, sum_ptr, sumx_ptr, T, C, offs_c, offs_c < C, BLOCK_T)


@triton.jit
def bn_bwd_sum_channels(psum_ptr, psumx_ptr, sum_ptr, sumx_ptr, T, C, offs_c, c_ok, BLOCK_T: tl.constexpr):
    """Sums over the T rows of the partials of the channels ``offs_c``, chunk by chunk in order."""
    acc = tl.zeros(offs_c.shape, dtype=tl.float32)
    accx = tl.zeros(offs_c.shape, dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        s, sx = _chunk_sums(psum_ptr, psumx_ptr, t0, T, C, offs_c, c_ok, BLOCK_T)
        acc += s
        accx += sx
    tl.store(sum_ptr + offs_c, acc, mask=c_ok)
    tl.store(sumx_ptr + offs_c, accx, mask=c_ok)


@triton.jit
def bn_bwd_apply_kernel(
    dz_ptr, x_ptr, dx_ptr, add_ptr, mean_ptr, invstd_ptr, weight_ptr, sum_ptr, sumx_ptr,
    H, W, C, M,
    szn, szc, szh, szw,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    san, sac, sah, saw,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = w*invstd*(dz - sum(dz)/M - xhat*sum(dz*xhat)/M) in training, dz*w*invstd in eval (+ add)."""
    _, offs_c, c_ok, n, h, w, c64, mask = _pixel_tile(M, H, W, C, BLOCK_M, BLOCK_C)
    dz = tl.load(dz_ptr + (n * szn + h * szh + w * szw)[:, None] + c64 * szc, mask=mask, other=0.0)
    dz = dz.to(tl.float32)
    inv = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0)
    if HAS_WEIGHT:
        g = tl.load(weight_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32) * inv
    else:
        g = inv
    if TRAINING:
        x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + c64 * sxc, mask=mask, other=0.0)
        mu = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
        xhat = (x.to(tl.float32) - mu[None, :]) * inv[None, :]
        s1 = tl.load(sum_ptr + offs_c, mask=c_ok, other=0.0) / M
        s2 = tl.load(sumx_ptr + offs_c, mask=c_ok, other=0.0) / M
        dx = g[None, :] * (dz - s1[None, :] - xhat * s2[None, :])
    else:
        dx = dz * g[None, :]
    if HAS_ADD:
        dx += tl.load(add_ptr + (n * san + h * sah + w * saw)[:, None] + c64 * sac, mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(dx_ptr + (n * son + h * soh + w * sow)[:, None] + c64 * soc, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_relu_pool_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr, HW, W, C,
    sxn, sxc, sxh, sxw, son, soc,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[n, c] = mean over pixels of relu(x[n, c] * scale[c] + shift[c]) (global average pool)."""
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < HW)[:, None] & c_ok[None, :]
        ptrs = x_ptr + n * sxn + ((p // W).to(tl.int64) * sxh + (p % W).to(tl.int64) * sxw)[:, None] \
            + offs_c.to(tl.int64)[None, :] * sxc
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(mask, relu(v * sc[None, :] + sh[None, :]), 0.0), axis=0)
    tl.store(out_ptr + n * son + offs_c * soc, (acc / HW).to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def bn_relu_pool_bwd_kernel(
    dp_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, dz_ptr, psum_ptr, psumx_ptr,
    H, W, C, M,
    sdn, sdc, sxn, sxc, sxh, sxw, szn, szc, szh, szw,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dz = dpool[n, c] / (H*W) where relu_passes(x*scale + shift) (else 0), stored, with per-tile sums
    of dz and dz*xhat."""
    pid_m, offs_c, c_ok, n, h, w, c64, mask = _pixel_tile(M, H, W, C, BLOCK_M, BLOCK_C)
    x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + c64 * sxc, mask=mask, other=0.0).to(tl.float32)
    dp = tl.load(dp_ptr + (n * sdn)[:, None] + c64 * sdc, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    keep = mask & relu_passes(x * sc[None, :] + sh[None, :])
    dz = tl.where(keep, dp / (H * W), 0.0).to(dz_ptr.dtype.element_ty)
    tl.store(dz_ptr + (n * szn + h * szh + w * szw)[:, None] + c64 * szc, dz, mask=mask)
    dzf = dz.to(tl.float32)
    mu = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    inv = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0)
    xhat = (x - mu[None, :]) * inv[None, :]
    tl.store(psum_ptr + pid_m * C + offs_c, tl.sum(dzf, axis=0), mask=c_ok)
    tl.store(psumx_ptr + pid_m * C + offs_c, tl.sum(tl.where(mask, dzf * xhat, 0.0), axis=0), mask=c_ok)


@triton.jit
def bn_add_relu_kernel(
    y_ptr, r_ptr, out_ptr, sy_ptr, by_ptr, sr_ptr, br_ptr,
    H, W, C, M,
    syn, syc, syh, syw,
    srn, src, srh, srw,
    son, soc, soh, sow,
    RES_BN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = relu(y*sy + by + r'), r' = r*sr + br (RES_BN) or r: a post-activation block's close."""
    _, offs_c, c_ok, n, h, w, c64, mask = _pixel_tile(M, H, W, C, BLOCK_M, BLOCK_C)
    pre = _bn_add_pre(y_ptr, r_ptr, sy_ptr, by_ptr, sr_ptr, br_ptr, n, h, w, c64, offs_c, c_ok, mask,
                      syn, syc, syh, syw, srn, src, srh, srw, RES_BN)
    out = relu(pre).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (n * son + h * soh + w * sow)[:, None] + c64 * soc, out, mask=mask)


@triton.jit
def _bn_add_pre(y_ptr, r_ptr, sy_ptr, by_ptr, sr_ptr, br_ptr, n, h, w, c64, offs_c, c_ok, mask,
                syn, syc, syh, syw, srn, src, srh, srw, RES_BN: tl.constexpr):
    """y*sy + by + (r*sr + br or r), in fp32: the value a post-activation block's closing ReLU sees."""
    y = tl.load(y_ptr + (n * syn + h * syh + w * syw)[:, None] + c64 * syc, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + (n * srn + h * srh + w * srw)[:, None] + c64 * src, mask=mask, other=0.0).to(tl.float32)
    sy = tl.load(sy_ptr + offs_c, mask=c_ok, other=0.0)
    by = tl.load(by_ptr + offs_c, mask=c_ok, other=0.0)
    pre = y * sy[None, :] + by[None, :]
    if RES_BN:
        sr = tl.load(sr_ptr + offs_c, mask=c_ok, other=0.0)
        br = tl.load(br_ptr + offs_c, mask=c_ok, other=0.0)
        pre += r * sr[None, :] + br[None, :]
    else:
        pre += r
    return pre


@triton.jit
def bn_add_relu_bwd_kernel(
    dout_ptr, y_ptr, r_ptr, g_ptr, sy_ptr, by_ptr, sr_ptr, br_ptr,
    mean_y_ptr, invstd_y_ptr, mean_r_ptr, invstd_r_ptr, psum_ptr, psumy_ptr, psumr_ptr,
    H, W, C, M,
    sdn, sdc, sdh, sdw,
    syn, syc, syh, syw,
    srn, src, srh, srw,
    sgn, sgc, sgh, sgw,
    RES_BN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """g = dout where relu_passes(pre) (else 0), stored, with per-tile sums of g, g*xhat_y and (RES_BN)
    g*xhat_r."""
    pid_m, offs_c, c_ok, n, h, w, c64, mask = _pixel_tile(M, H, W, C, BLOCK_M, BLOCK_C)
    pre = _bn_add_pre(y_ptr, r_ptr, sy_ptr, by_ptr, sr_ptr, br_ptr, n, h, w, c64, offs_c, c_ok, mask,
                      syn, syc, syh, syw, srn, src, srh, srw, RES_BN)
    d = tl.load(dout_ptr + (n * sdn + h * sdh + w * sdw)[:, None] + c64 * sdc, mask=mask, other=0.0)
    g = tl.where(mask & relu_passes(pre), d.to(tl.float32), 0.0).to(g_ptr.dtype.element_ty)
    tl.store(g_ptr + (n * sgn + h * sgh + w * sgw)[:, None] + c64 * sgc, g, mask=mask)
    gf = g.to(tl.float32)
    tl.store(psum_ptr + pid_m * C + offs_c, tl.sum(gf, axis=0), mask=c_ok)
    y = tl.load(y_ptr + (n * syn + h * syh + w * syw)[:, None] + c64 * syc, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(mean_y_ptr + offs_c, mask=c_ok, other=0.0)
    inv = tl.load(invstd_y_ptr + offs_c, mask=c_ok, other=0.0)
    gy = tl.where(mask, gf * (y - mu[None, :]) * inv[None, :], 0.0)
    tl.store(psumy_ptr + pid_m * C + offs_c, tl.sum(gy, axis=0), mask=c_ok)
    if RES_BN:
        r = tl.load(r_ptr + (n * srn + h * srh + w * srw)[:, None] + c64 * src, mask=mask, other=0.0)
        mur = tl.load(mean_r_ptr + offs_c, mask=c_ok, other=0.0)
        invr = tl.load(invstd_r_ptr + offs_c, mask=c_ok, other=0.0)
        gr = tl.where(mask, gf * (r.to(tl.float32) - mur[None, :]) * invr[None, :], 0.0)
        tl.store(psumr_ptr + pid_m * C + offs_c, tl.sum(gr, axis=0), mask=c_ok)


@triton.jit
def bn_relu_apply_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr, H, W, C, M,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = relu(x*scale + shift): the activation a convolution routed to cuDNN reads."""
    _, offs_c, c_ok, n, h, w, c64, mask = _pixel_tile(M, H, W, C, BLOCK_M, BLOCK_C)
    x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + c64 * sxc, mask=mask, other=0.0)
    sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    a = relu(x.to(tl.float32) * sc[None, :] + sh[None, :])
    tl.store(out_ptr + (n * son + h * soh + w * sow)[:, None] + c64 * soc, a.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def relu_bn_bwd_tile(da, x_ptrs, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, offs_c, c_ok, mask, dz_ptr):
    """The BatchNorm-ReLU backward of one (pixels x channels) tile of the gradient ``da`` (fp32):
    dz = da where relu_passes(x*scale + shift) (else 0) rounded to dz's dtype, and the column sums
    of dz and dz * xhat over the masked rows, taken from the rounded dz (the values the apply pass reads). Shared by the
    dgrad epilogue and the pass after a cuDNN dgrad."""
    xv = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    keep = mask & relu_passes(xv * sc[None, :] + sh[None, :])
    dz = tl.where(keep, da, 0.0).to(dz_ptr.dtype.element_ty)
    dzf = dz.to(tl.float32)
    mu = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    inv = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0)
    xhat = (xv - mu[None, :]) * inv[None, :]
    return dz, tl.sum(dzf, axis=0), tl.sum(tl.where(mask, dzf * xhat, 0.0), axis=0)


@triton.jit
def relu_bn_bwd_partials_kernel(
    da_ptr, add_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, dz_ptr, psum_ptr, psumx_ptr, H, W, C, M,
    sdn, sdc, sdh, sdw,
    san, sac, sah, saw,
    sxn, sxc, sxh, sxw,
    szn, szc, szh, szw,
    HAS_ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dz = (da [+ add]) where relu_passes(x*scale + shift) (else 0) and per-tile sums of dz and dz * xhat: the dgrad
    epilogue's BatchNorm-ReLU backward (and its HAS_ADD), for a dgrad computed by cuDNN. dz may be
    da itself (each element is read before it is written, by the same program)."""
    pid_m, offs_c, c_ok, n, h, w, c64, mask = _pixel_tile(M, H, W, C, BLOCK_M, BLOCK_C)
    da = tl.load(da_ptr + (n * sdn + h * sdh + w * sdw)[:, None] + c64 * sdc, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        da += tl.load(add_ptr + (n * san + h * sah + w * saw)[:, None] + c64 * sac, mask=mask, other=0.0).to(
            tl.float32)
    x_ptrs = x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + c64 * sxc
    dz, sum_dz, sum_dzx = relu_bn_bwd_tile(da, x_ptrs, scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
                                           offs_c, c_ok, mask, dz_ptr)
    tl.store(dz_ptr + (n * szn + h * szh + w * szw)[:, None] + c64 * szc, dz, mask=mask)
    tl.store(psum_ptr + pid_m * C + offs_c, sum_dz, mask=c_ok)
    tl.store(psumx_ptr + pid_m * C + offs_c, sum_dzx, mask=c_ok)


#: Whether the kernels that produce BatchNorm partials also reduce them (the last program of the
#: launch, :func:`stats_ticket`) when the caller hands them a :class:`Finalize`. Off: the
#: two-launch path (partials, then :func:`bn_finalize`), which gives the same bits; see
#: :func:`producer_reductions`.
TICKETS = True


@contextlib.contextmanager
def producer_reductions(enabled: bool) -> Iterator[None]:
    """Inside the block, producers reduce their own partials (True, the default) or leave them to a
    separate launch (False: the two-launch reference the tests compare with bit for bit)."""
    global TICKETS
    old, TICKETS = TICKETS, enabled
    try:
        yield
    finally:
        TICKETS = old


# (device, stream) -> int32 zeros. A launch's last programs leave their counters at zero again,
# and launches on one stream run one after another, so one buffer serves every launch of a stream;
# another stream gets its own (two launches running at once must not share a counter).
_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def ticket_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` int32 counters at zero for one launch on the current stream. While a CUDA
    graph is captured, a new zeroed buffer (a memset node in the graph): a cached buffer would be
    shared by graphs that may later be replayed concurrently on different streams."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, device=device, dtype=torch.int32)
    key = (device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        # the old buffer's memory goes back to the stream's pool: reused only after the launches
        # that still use it (stream order)
        buf = _COUNTERS[key] = torch.zeros(max(n, 256), device=device, dtype=torch.int32)
    return buf


# device -> an int64 that the finalize kernels count batches into when the caller counts them
# itself (see finalize_channels); its value means nothing.
_SINKS: dict[torch.device, torch.Tensor] = {}


def batch_sink(device: torch.device) -> torch.Tensor:
    """The int64 a finalize launch counts its batch into when no ``num_batches_tracked`` is given
    (the argument must be an int64 pointer either way: one compiled kernel for both). While a
    CUDA graph is captured, a new one (as :func:`ticket_counters`)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, device=device, dtype=torch.int64)
    sink = _SINKS.get(device)
    if sink is None:
        sink = _SINKS[device] = torch.zeros(1, device=device, dtype=torch.int64)
    return sink


def scratch_key(device: torch.device) -> tuple | None:
    """Where a launch plan's cached launch-local scratch may be reused, or None: allocate fresh.

    Launch-local scratch (statistics partials, backward-sum partials, a weight gradient's split
    workspace, ticket chunk rows) is written and consumed inside one launch, by the ticket's last
    program. Launches on one stream run one after another, so a buffer serves every later launch
    of that stream: the key is the (device, stream) the launch goes to — another stream gets its
    own buffers (two launches running at once must not share them), and autograd's backward,
    which runs on the forward's stream, keys by the stream it runs on. While a CUDA graph is
    captured: None, as :func:`ticket_counters` (a cached buffer would be shared by graphs that may
    be replayed concurrently on different streams, and by eager launches between replays). On
    the CPU (the interpreter runs each launch synchronously in the calling thread) the thread."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return None
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return idx, torch._C._cuda_getCurrentRawStream(idx)
    return device.type, threading.get_ident()


#: Launch-local scratch above this many bytes is not kept by a plan: held between calls it would
#: add to every later step's peak memory (a weight gradient's split workspace reaches tens of MB
#: at ImageNet widths), while at such sizes the launch's GPU time dwarfs an allocation's host cost.
SCRATCH_CACHE_BYTES = 1 << 20


def cached_scratch(store: dict, device: torch.device, make: Callable[[], tuple]) -> tuple:
    """``make()``'s launch-local buffers, cached in ``store`` (a plan's) per :func:`scratch_key`,
    unless they are larger than :data:`SCRATCH_CACHE_BYTES` together (then made per call)."""
    key = scratch_key(device)
    if key is None:
        return make()
    got = store.get(key)
    if got is None:
        got = make()
        if sum(t.numel() * t.element_size() for t in got if isinstance(t, torch.Tensor)) <= SCRATCH_CACHE_BYTES:
            store[key] = got
    return got


#: Launch plans (see :mod:`fusedres.ops.conv`): key -> plan. Cleared when it grows past
#: :data:`PLAN_LIMIT` entries (every distinct shape, layout and mode is one entry) and by
#: :func:`clear_plans`.
PLANS: dict[tuple, Any] = {}
PLAN_LIMIT = 512


def plan_for(key: tuple, build: Callable[[], Any]) -> Any:
    """The cached plan of ``key``, built by ``build()`` on a miss."""
    plan = PLANS.get(key)
    if plan is None:
        if len(PLANS) >= PLAN_LIMIT:
            PLANS.clear()
        plan = PLANS[key] = build()
    return plan


def clear_plans() -> None:
    """Forget every launch plan and its cached scratch (tests that poison new buffers call it, so
    that scratch is allocated — and poisoned — again)."""
    PLANS.clear()


def ticket_plan(tiles: int, cols: int) -> tuple[bool, int, int]:
    """(two levels, chunks, counters) of a ticket producer with ``tiles`` x ``cols`` programs."""
    two_level = tiles > TWO_LEVEL_TILES
    chunks = cdiv(tiles, FINALIZE_BLOCK_T)
    return two_level, chunks, cols * (chunks + 1) if two_level else cols


class Finalize(NamedTuple):
    """What :func:`bn_finalize` is given, for a launch that produces the partials and finalizes
    them in its last programs: the stats buffer to fill ((4, C) fp32 contiguous: rows mean,
    invstd, scale, shift), the BatchNorm's affine parameters and running statistics (or None) and
    where the updated running statistics go (None: in place); ``batches``: the BatchNorm's
    ``num_batches_tracked`` when the finalizing launch counts the batch (None: the caller does)."""

    stats: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    running_out: tuple[torch.Tensor, torch.Tensor] | None
    momentum: float
    eps: float
    batches: torch.Tensor | None = None

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.stats.unbind(0)[:4])

    def launch_args(self, tiles: int, cols: int) -> tuple[tuple, dict]:
        """The ticket arguments and constexprs of a producer with ``tiles`` x ``cols`` programs
        (tiles along grid x, channel blocks along grid y), and the chunk workspace above
        TWO_LEVEL_TILES tiles."""
        s = self.stats
        two_level, chunks, n_counters = ticket_plan(tiles, cols)
        cmean = cm2 = None
        if two_level:
            cmean = torch.empty((chunks, s.shape[1]), device=s.device, dtype=torch.float32)
            cm2 = torch.empty_like(cmean)
        args = self.tensor_args(ticket_counters(s.device, n_counters), cmean, cm2)
        return args, self.flags(two_level)

    def flags(self, two_level: bool) -> dict:
        """The ticket constexprs (what a launch plan caches: they depend on which tensors are given)."""
        return dict(TICKET=True, TWO_LEVEL=two_level, UPDATE_RUNNING=self.running_mean is not None,
                    HAS_WEIGHT=self.weight is not None, HAS_BIAS=self.bias is not None, BLOCK_T=FINALIZE_BLOCK_T)

    def key(self) -> tuple[bool, bool, bool]:
        """What of this finalize the constexprs depend on."""
        return self.running_mean is not None, self.weight is not None, self.bias is not None

    def tensor_args(self, counters: torch.Tensor, cmean: torch.Tensor | None, cm2: torch.Tensor | None) -> tuple:
        """The ticket arguments, given the counters and the chunk rows (None: one level)."""
        s = self.stats
        C = s.shape[1]
        if s.stride() != (C, 1):
            raise ValueError(f"fusedres: a stats buffer of strides {s.stride()}; expected ({C}, 1)")
        g, b, rm, rv = self.weight, self.bias, self.running_mean, self.running_var
        rm_out, rv_out = self.running_out if self.running_out is not None else (rm, rv)
        return (counters, cmean if cmean is not None else s, cm2 if cm2 is not None else s,
                g if g is not None else s, b if b is not None else s,
                rm if rm is not None else s, rv if rv is not None else s,
                rm_out if rm_out is not None else s, rv_out if rv_out is not None else s,
                self.batches if self.batches is not None else batch_sink(s.device),
                s, float(self.momentum), float(self.eps))


class Sums(NamedTuple):
    """The BatchNorm-backward sums (Σdz, Σdz·x̂) per channel, already reduced by the launch that
    produced their partials (in place of the ``(psum, psumx)`` partials)."""

    sum_dz: torch.Tensor
    sum_dzx: torch.Tensor


def sums_ticket_args(tiles: int, cols: int, C: int, device: torch.device) -> tuple[Sums, tuple, dict]:
    """The :class:`Sums` a producer with ``tiles`` x ``cols`` programs reduces into, and its
    :func:`sums_ticket` arguments and constexprs."""
    s = torch.empty(C, device=device, dtype=torch.float32)  # two allocations: returned as
    sx = torch.empty_like(s)  # separate gradients, they must not share storage
    two_level, chunks, n_counters = ticket_plan(tiles, cols)
    cs = csx = s
    if two_level:
        cs = torch.empty((chunks, C), device=device, dtype=torch.float32)
        csx = torch.empty_like(cs)
    counters = ticket_counters(device, n_counters)
    return Sums(s, sx), (counters, cs, csx, s, sx), dict(TICKET=True, TWO_LEVEL=two_level, BLOCK_T=FINALIZE_BLOCK_T)


def no_ticket_args(placeholder: torch.Tensor) -> tuple[tuple, dict]:
    """The ticket arguments of a producer launch that leaves its partials to a later launch."""
    return (placeholder,) * 11 + (0.0, 0.0), dict(TICKET=False, TWO_LEVEL=False, UPDATE_RUNNING=False,
                                                   HAS_WEIGHT=False, HAS_BIAS=False, BLOCK_T=FINALIZE_BLOCK_T)


def bn_stats(
    x: torch.Tensor, add: torch.Tensor | None = None, finalize: Finalize | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int] | Finalize:
    """Per-tile statistics partials of each channel of ``x`` (see the module docstring); with
    ``add`` (shaped and typed like x), of ``x.add_(add)``, done in the same pass. With
    ``finalize`` (and :data:`TICKETS` on), the launch also finalizes them into
    ``finalize.stats`` (as :func:`bn_finalize` would) and returns ``finalize``."""
    N, C, H, W = x.shape
    cfg = STATS_CONFIG
    M = pixels(N, H, W)
    grid = (cdiv(M, cfg.block_m), cdiv(C, cfg.block_c))
    pmean = torch.empty((grid[0], C), device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    r = add if add is not None else x
    ticket = finalize is not None and TICKETS
    t_args, t_flags = finalize.launch_args(*grid) if ticket else no_ticket_args(pmean)
    launch(
        bn_stats_kernel, grid, x, r, pmean, pm2, H, W, C, M,
        *x.stride(),
        *r.stride(),
        *t_args,
        ADD=add is not None, **t_flags, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return finalize if ticket else (pmean, pm2, cfg.block_m)


def bn_finalize(
    partials: tuple[torch.Tensor, torch.Tensor, int] | None,
    count: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    channels: int,
    device: torch.device,
    out: torch.Tensor | None = None,
    running_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    batches: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, invstd, scale, shift)``, each fp32 of length C (rows of ``out``, a contiguous
    (4, C) fp32 buffer, when given).

    Training merges ``partials`` (over ``count`` pixels) and, when running statistics are
    given, updates them — in place, or into ``running_out`` (new mean, new var) when given —
    and adds 1 to ``batches`` (a ``num_batches_tracked``) when given; eval reads the running
    statistics.
    """
    C = channels
    if out is None:
        out = torch.empty((4, C), device=device, dtype=torch.float32)
    if out.stride() != (C, 1):
        raise ValueError(f"fusedres: a stats buffer of strides {out.stride()}; expected ({C}, 1)")
    if training:
        pmean, pm2, tile_rows = partials
        T = pmean.shape[0]
        if T > TWO_LEVEL_TILES:
            # One program per 32 channels would merge T tiles serially: merge chunks of BLOCK_T
            # tiles in parallel first (same formula, so the same result up to rounding).
            chunks = cdiv(T, FINALIZE_BLOCK_T)
            cmean = torch.empty((chunks, C), device=device, dtype=torch.float32)
            cm2 = torch.empty_like(cmean)
            launch(
                bn_merge_kernel, (chunks, cdiv(C, FINALIZE_BLOCK_C)),
                pmean, pm2, T, C, count, tile_rows, cmean, cm2,
                BLOCK_T=FINALIZE_BLOCK_T, BLOCK_C=FINALIZE_BLOCK_C,
            )
            pmean, pm2, tile_rows, T = cmean, cm2, tile_rows * FINALIZE_BLOCK_T, chunks
    else:
        pmean = pm2 = out
        tile_rows, T = 1, 0
    update = training and running_mean is not None
    dummy = out
    rm_out, rv_out = running_out if running_out is not None else (running_mean, running_var)
    launch(
        bn_finalize_kernel, (cdiv(C, FINALIZE_BLOCK_C),),
        pmean, pm2, T, C, count, tile_rows,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        running_mean if running_mean is not None else dummy, running_var if running_var is not None else dummy,
        rm_out if rm_out is not None else dummy, rv_out if rv_out is not None else dummy,
        batches if batches is not None else batch_sink(device), out, float(momentum), float(eps),
        TRAINING=training, UPDATE_RUNNING=update,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_T=FINALIZE_BLOCK_T, BLOCK_C=FINALIZE_BLOCK_C,
    )
    return tuple(out.unbind(0)[:4])


def bn_bwd_chunks(psum: torch.Tensor, psumx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The partials as the final reduction takes them: above TWO_LEVEL_TILES tiles, chunks of
    tiles summed in parallel first (a fixed order: deterministic); else as they are."""
    T, C = psum.shape
    if T <= TWO_LEVEL_TILES:
        return psum, psumx
    chunks = cdiv(T, FINALIZE_BLOCK_T)
    csum = torch.empty((chunks, C), device=psum.device, dtype=torch.float32)
    csumx = torch.empty_like(csum)
    launch(
        bn_sum_chunks_kernel, (chunks, cdiv(C, FINALIZE_BLOCK_C)),
        psum, psumx, T, C, csum, csumx, BLOCK_T=FINALIZE_BLOCK_T, BLOCK_C=FINALIZE_BLOCK_C,
    )
    return csum, csumx


def bn_bwd_reduce(psum: torch.Tensor, psumx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum dz, sum dz*xhat)`` per channel from the dgrad epilogue's per-tile partials."""
    psum, psumx = bn_bwd_chunks(psum, psumx)
    T, C = psum.shape
    s = torch.empty(C, device=psum.device, dtype=torch.float32)  # two allocations: returned as
    sx = torch.empty_like(s)  # separate gradients, they must not share storage
    launch(
        bn_bwd_reduce_kernel, (cdiv(C, FINALIZE_BLOCK_C),),
        psum, psumx, s, sx, T, C, BLOCK_T=FINALIZE_BLOCK_T, BLOCK_C=FINALIZE_BLOCK_C,
    )
    return s, sx


def bn_bwd_apply(
    dz: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sum_dz: torch.Tensor,
    sum_dzx: torch.Tensor,
    *,
    training: bool,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of BatchNorm with respect to its input (plus ``add`` when given), like x."""
    N, C, H, W = x.shape
    dx = torch.empty_like(x)
    cfg = APPLY_CONFIG
    M = pixels(N, H, W)
    a = add if add is not None else dx
    launch(
        bn_bwd_apply_kernel, (cdiv(M, cfg.block_m), cdiv(C, cfg.block_c)),
        dz, x, dx, a, mean, invstd, weight if weight is not None else mean, sum_dz, sum_dzx,
        H, W, C, M,
        *dz.stride(),
        *x.stride(),
        *dx.stride(),
        *a.stride(),
        TRAINING=training, HAS_WEIGHT=weight is not None, HAS_ADD=add is not None,
        BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return dx


def bn_relu_pool(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Global average pool of relu(x*scale + shift): ``(N, C)`` in x's dtype."""
    N, C, H, W = x.shape
    out = torch.empty((N, C), device=x.device, dtype=x.dtype)
    cfg = STATS_CONFIG
    launch(
        bn_relu_pool_kernel, (N, cdiv(C, cfg.block_c)),
        x, scale, shift, out, H * W, W, C,
        *x.stride(), out.stride(0), out.stride(1),
        BLOCK_P=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return out


def bn_relu_pool_bwd(
    dpool: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    mean: torch.Tensor, invstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dz, psum, psumx)``: the gradient at the BatchNorm output through pool and ReLU, with
    the per-tile partial sums that :func:`bn_bwd_reduce` turns into the BatchNorm-backward sums."""
    N, C, H, W = x.shape
    cfg = STATS_CONFIG
    M = pixels(N, H, W)
    grid = (cdiv(M, cfg.block_m), cdiv(C, cfg.block_c))
    dz = torch.empty((N, C, H, W), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    psum = torch.empty((grid[0], C), device=x.device, dtype=torch.float32)
    psumx = torch.empty_like(psum)
    launch(
        bn_relu_pool_bwd_kernel, grid,
        dpool, x, scale, shift, mean, invstd, dz, psum, psumx, H, W, C, M,
        dpool.stride(0), dpool.stride(1),
        *x.stride(),
        *dz.stride(),
        BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return dz, psum, psumx


def bn_add_relu(
    y: torch.Tensor,
    r: torch.Tensor,
    sy: torch.Tensor,
    by: torch.Tensor,
    sr: torch.Tensor | None = None,
    br: torch.Tensor | None = None,
) -> torch.Tensor:
    """``relu(y*sy + by + (r*sr + br if sr is given else r))``, channels_last, in y's dtype."""
    N, C, H, W = y.shape
    out = torch.empty((N, C, H, W), device=y.device, dtype=y.dtype, memory_format=torch.channels_last)
    cfg = APPLY_CONFIG
    M = pixels(N, H, W)
    res_bn = sr is not None
    launch(
        bn_add_relu_kernel, (cdiv(M, cfg.block_m), cdiv(C, cfg.block_c)),
        y, r, out, sy, by, sr if res_bn else sy, br if res_bn else by, H, W, C, M,
        *y.stride(),
        *r.stride(),
        *out.stride(),
        RES_BN=res_bn, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return out


def bn_add_relu_bwd(
    dout: torch.Tensor,
    y: torch.Tensor,
    r: torch.Tensor,
    sy: torch.Tensor,
    by: torch.Tensor,
    mean_y: torch.Tensor,
    invstd_y: torch.Tensor,
    r_bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward of :func:`bn_add_relu`: ``(g, psum, psumx_y, psumx_r)`` where g = dout * relu'
    and the partial sums feed :func:`bn_bwd_reduce` for y's BatchNorm and, when
    ``r_bn = (sr, br, mean_r, invstd_r)`` is given, for r's."""
    N, C, H, W = y.shape
    cfg = APPLY_CONFIG
    M = pixels(N, H, W)
    grid = (cdiv(M, cfg.block_m), cdiv(C, cfg.block_c))
    g = torch.empty((N, C, H, W), device=y.device, dtype=y.dtype, memory_format=torch.channels_last)
    psum = torch.empty((grid[0], C), device=y.device, dtype=torch.float32)
    psumy = torch.empty_like(psum)
    psumr = torch.empty_like(psum) if r_bn is not None else None
    sr, br, mean_r, invstd_r = r_bn if r_bn is not None else (sy, by, mean_y, invstd_y)
    launch(
        bn_add_relu_bwd_kernel, grid,
        dout, y, r, g, sy, by, sr, br, mean_y, invstd_y, mean_r, invstd_r,
        psum, psumy, psumr if psumr is not None else psum,
        H, W, C, M,
        *dout.stride(),
        *y.stride(),
        *r.stride(),
        *g.stride(),
        RES_BN=r_bn is not None, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return g, psum, psumy, psumr


def bn_relu_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``relu(x*scale + shift)`` per channel, channels_last, in x's dtype."""
    N, C, H, W = x.shape
    out = torch.empty((N, C, H, W), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    cfg = APPLY_CONFIG
    M = pixels(N, H, W)
    launch(
        bn_relu_apply_kernel, (cdiv(M, cfg.block_m), cdiv(C, cfg.block_c)),
        x, scale, shift, out, H, W, C, M,
        *x.stride(),
        *out.stride(),
        BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return out


def relu_bn_bwd_partials(
    da: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
    invstd: torch.Tensor, *, add: torch.Tensor | None = None, in_place: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``(dz, (psum, psumx))`` as :func:`fusedres.ops.conv.conv_dgrad` returns them with its
    BatchNorm-ReLU epilogue (``add``: its HAS_ADD), from a gradient ``da`` computed elsewhere.
    dz is channels_last; ``in_place`` writes it into ``da`` (the caller's own temporary)."""
    N, C, H, W = x.shape
    if in_place:
        dz = da
    else:
        dz = torch.empty((N, C, H, W), device=x.device, dtype=da.dtype, memory_format=torch.channels_last)
    cfg = APPLY_CONFIG
    M = pixels(N, H, W)
    grid = (cdiv(M, cfg.block_m), cdiv(C, cfg.block_c))
    psum = torch.empty((grid[0], C), device=x.device, dtype=torch.float32)
    psumx = torch.empty_like(psum)
    a = add if add is not None else da
    launch(
        relu_bn_bwd_partials_kernel, grid,
        da, a, x, scale, shift, mean, invstd, dz, psum, psumx, H, W, C, M,
        *da.stride(),
        *a.stride(),
        *x.stride(),
        *dz.stride(),
        HAS_ADD=add is not None, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return dz, (psum, psumx)
