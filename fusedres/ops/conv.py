"""Implicit-GEMM convolution kernels with BatchNorm/ReLU fused into their loads and stores.

Layout contract of every launcher here (no autograd, no modules):

- Activations are 4-D tensors in PyTorch's logical order ``(N, C, H, W)`` with any strides;
  the kernels address them through the strides, so channels_last tensors (stride 1 along C)
  give coalesced, vectorised loads and contiguous NCHW tensors still compute correctly.
- Weights are ``(Cout, Cin, R, S)`` with any strides (channels_last weights read best).
- ``scale``/``shift``/``mean``/``invstd`` are fp32 vectors of length Cin: the prologue
  applies ``a = max(x * scale + shift, 0)`` (NaN-propagating, as ``torch.relu``); taps in the
  zero padding are 0 after it.
- Inputs are fp32, fp16 or bf16; accumulation is fp32; outputs take the input dtype.
  fp32 dots use TF32 exactly when ``torch.backends.cudnn.allow_tf32`` is True.
- Index arithmetic that multiplies sizes is done in int64; pixel indices are int32 until split
  into (n, h, w), so one launch covers at most :data:`fusedres.ops.bn.MAX_PIXELS` pixels.
- Per-channel statistics come out as per-tile partials (fp32 mean and M2 of each
  BLOCK_M-row tile) that :mod:`fusedres.ops.bn` merges in a fixed order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import triton
import triton.language as tl

from .._runtime import cdiv, launch, sm_count
from . import bn as bn_ops
from .bn import (
    Finalize,
    _last_ticket,
    bn_bwd_chunks,
    bn_bwd_reduce_block,
    no_ticket_args,
    pixels,
    relu,
    relu_bn_bwd_tile,
    stats_ticket,
    sums_ticket,
    tile_mean_m2,
)
from .configs import FINALIZE_BLOCK_C, FINALIZE_BLOCK_T, ConvConfig, dgrad_config, fprop_config, wgrad_config


@triton.jit
def conv_fprop_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, scale_ptr, shift_ptr, oshift_ptr, pmean_ptr, pm2_ptr,
    H, W, C, OH, OW, K, M,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    son, soc, soh, sow,
    srn, src, srh, srw,
    counter_ptr, cmean_ptr, cm2_ptr, bn_w_ptr, bn_b_ptr, rmean_ptr, rvar_ptr, rmean_out_ptr, rvar_out_ptr,
    batches_ptr, stats_ptr, momentum, eps,
    STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STATS: tl.constexpr,
    OUT_SHIFT: tl.constexpr, OUT_RELU: tl.constexpr,
    TICKET: tl.constexpr, TWO_LEVEL: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, k] = sum_{r,s,c} act(x)[pixel(m) + tap(r,s), c] * w[k, c, r, s] (+ res[m, k]).

    OUT_SHIFT adds a per-output-channel vector (a folded BatchNorm's shift) and OUT_RELU
    clamps at zero, both after the residual: the eval-mode post-activation block's epilogue.
    With STATS and TICKET the last tile of each column block finalizes the next BatchNorm's
    statistics of its channels (:func:`fusedres.ops.bn.stats_ticket`).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    n = (t // OH).to(tl.int64)
    ih0 = oh * STRIDE - PAD
    iw0 = ow * STRIDE - PAD
    x_row = n * sxn
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < K
    w_col = offs_n.to(tl.int64) * swk
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_c = tl.cdiv(C, BLOCK_K)
    for kk in range(0, R * S * num_c):
        rs = kk // num_c
        c0 = (kk - rs * num_c) * BLOCK_K
        r = rs // S
        s = rs - r * S
        ih = ih0 + r
        iw = iw0 + s
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        cc = c0 + offs_k
        c_ok = cc < C
        a_mask = pix_ok[:, None] & c_ok[None, :]
        a_ptrs = x_ptr + (x_row + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] \
            + cc.to(tl.int64)[None, :] * sxc
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if PROLOGUE:
            sc = tl.load(scale_ptr + cc, mask=c_ok, other=0.0)
            sh = tl.load(shift_ptr + cc, mask=c_ok, other=0.0)
            act = relu(a.to(tl.float32) * sc[None, :] + sh[None, :])
            # Padded taps are zero after the activation, not relu(shift).
            a = tl.where(a_mask, act, 0.0).to(x_ptr.dtype.element_ty)
        b_ptrs = w_ptr + (r * swr + s * sws) + cc.to(tl.int64)[:, None] * swc + w_col[None, :]
        b = tl.load(b_ptrs, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    mask = m_ok[:, None] & n_ok[None, :]
    o_ptrs = out_ptr + (n * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow)[:, None] \
        + offs_n.to(tl.int64)[None, :] * soc
    if HAS_RESIDUAL:
        r_ptrs = res_ptr + (n * srn + oh.to(tl.int64) * srh + ow.to(tl.int64) * srw)[:, None] \
            + offs_n.to(tl.int64)[None, :] * src
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    if OUT_SHIFT:
        acc += tl.load(oshift_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if OUT_RELU:
        acc = relu(acc)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(o_ptrs, y, mask=mask)
    if STATS:
        # Statistics of the stored (rounded) values: what the next BatchNorm would see.
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        mean, m2 = tile_mean_m2(y.to(tl.float32), mask, count)
        tl.store(pmean_ptr + pid_m * K + offs_n, mean, mask=n_ok)
        tl.store(pm2_ptr + pid_m * K + offs_n, m2, mask=n_ok)
        if TICKET:
            stats_ticket(pmean_ptr, pm2_ptr, pid_m, pid_n, tl.num_programs(1), tl.num_programs(0), K, M, BLOCK_M,
                         offs_n, n_ok, counter_ptr, cmean_ptr, cm2_ptr, bn_w_ptr, bn_b_ptr, rmean_ptr, rvar_ptr,
                         rmean_out_ptr, rvar_out_ptr, batches_ptr, stats_ptr, momentum, eps,
                         TWO_LEVEL, UPDATE_RUNNING, HAS_WEIGHT, HAS_BIAS, BLOCK_T)


@triton.jit
def conv_dgrad_kernel(
    dy_ptr, w_ptr, dz_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr,
    H, W, C, OH, OW, K, M,
    sdn, sdk, sdh, sdw,
    swk, swc, swr, sws,
    szn, szc, szh, szw,
    sxn, sxc, sxh, sxw,
    san, sac, sah, saw,
    counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr,
    STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    BN_BWD: tl.constexpr, HAS_ADD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TICKET: tl.constexpr, TWO_LEVEL: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """da[m, c] = sum_{r,s,k} dy[pixel(m) - tap(r,s), k] * w[k, c, r, s] over input pixels m.

    With STRIDE > 1 the input pixels are split into STRIDE**2 parity classes (ph, pw) =
    (ih % STRIDE, iw % STRIDE), whose tiles follow each other along grid axis 0 (class-major:
    :func:`dgrad_tiles`). Only the taps r = (ph + PAD) mod STRIDE (+ STRIDE, ...) reach a pixel
    of row parity ph from an output pixel (and likewise s), so a class's programs loop over those
    taps alone, with oh = (ih + PAD - r) / STRIDE exact: no MMA on a tap that cannot contribute
    (3x3 at stride 2: 4, 2, 2 or 1 taps instead of 9). A class without taps (1x1 at stride 2,
    odd parities) gets da = 0.

    HAS_ADD adds another gradient of the same activation first (the projection shortcut's).
    With BN_BWD the epilogue applies the ReLU mask recomputed from the pre-BN input x,
    stores dz = da where relu_passes(x*scale + shift) (else 0; NaN passes, as in eager) and writes
    per-tile sums of dz and dz * xhat (row pid_m: every tile of every class once); with TICKET
    the last tile of each column block reduces them into ``sum/sumx``
    (:func:`fusedres.ops.bn.sums_ticket`).
    """
    _dgrad_tile(tl.program_id(0), tl.program_id(1), 0, 0,
                dy_ptr, w_ptr, dz_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr,
                H, W, C, OH, OW, K, M, sdn, sdk, sdh, sdw, swk, swc, swr, sws, szn, szc, szh, szw,
                sxn, sxc, sxh, sxw, san, sac, sah, saw, counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr,
                STRIDE, PAD, R, S, BN_BWD, HAS_ADD, INPUT_PRECISION, TICKET, TWO_LEVEL, BLOCK_T,
                BLOCK_M, BLOCK_N, BLOCK_K, None, True)


@triton.jit
def _dgrad_tile(
    pid_m, pid_n, n_tiles, n_cols,
    dy_ptr, w_ptr, dz_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr,
    H, W, C, OH, OW, K, M,
    sdn, sdk, sdh, sdw,
    swk, swc, swr, sws,
    szn, szc, szh, szw,
    sxn, sxc, sxh, sxw,
    san, sac, sah, saw,
    counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr,
    STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    BN_BWD: tl.constexpr, HAS_ADD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TICKET: tl.constexpr, TWO_LEVEL: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOOP_STAGES: tl.constexpr,
    GRID: tl.constexpr,
):
    """Program (pid_m, pid_n) of :func:`conv_dgrad_kernel`'s (n_tiles, n_cols) grid (also run by
    :func:`conv_bwd_kernel` on its share of a merged grid). LOOP_STAGES: the main loop's pipeline
    depth, None for the launch's ``num_stages``. GRID: the launch is this role's alone, n_tiles and
    n_cols are read from the grid where the epilogue needs them (passed in, they would hold two
    registers through the main loop)."""
    if STRIDE == 1:
        # (the general case below with one class: the same instructions and bits as before classes)
        tile = pid_m
        ph = 0
        pw = 0
        hc = H
        wc = W
        mc = M
        r0 = 0
        s0 = 0
        taps_r = R
        taps_s = S
    else:
        # Which class tile pid_m is in: the last class whose first tile is at or before it (an
        # empty class starts where the next one does, so it is never picked).
        n_img = M // (H * W)
        ph = 0
        pw = 0
        first = 0
        start = 0
        for cls in tl.static_range(STRIDE * STRIDE):
            qh = cls // STRIDE
            qw = cls % STRIDE
            mine = pid_m >= start
            ph = tl.where(mine, qh, ph)
            pw = tl.where(mine, qw, pw)
            first = tl.where(mine, start, first)
            start += tl.cdiv(n_img * tl.cdiv(H - qh, STRIDE) * tl.cdiv(W - qw, STRIDE), BLOCK_M)
        tile = pid_m - first
        hc = tl.cdiv(H - ph, STRIDE)
        wc = tl.cdiv(W - pw, STRIDE)
        mc = n_img * hc * wc
        r0 = (ph + PAD) % STRIDE
        s0 = (pw + PAD) % STRIDE
        taps_r = tl.cdiv(R - r0, STRIDE)  # 0 when r0 >= R (1x1, odd classes)
        taps_s = tl.cdiv(S - s0, STRIDE)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < mc
    iw2 = offs_m % wc
    t = offs_m // wc
    ih2 = t % hc
    n = (t // hc).to(tl.int64)
    ih = ih2 * STRIDE + ph
    iw = iw2 * STRIDE + pw
    # oh = (ih + PAD - r) / STRIDE for the class's j-th tap r = r0 + j*STRIDE
    oh0 = ih2 + (ph + PAD - r0) // STRIDE
    ow0 = iw2 + (pw + PAD - s0) // STRIDE
    dy_row = n * sdn
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C
    w_col = offs_n.to(tl.int64) * swc
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = tl.cdiv(K, BLOCK_K)
    if STRIDE > 1:
        # The class's tap (jr, js) and channel block k0 of each iteration, counted up: dividing
        # them out of kk by the runtime num_k and taps_s cost ~20 instructions per iteration more.
        jr = 0
        js = 0
        k0 = 0
    for kk in tl.range(0, taps_r * taps_s * num_k, num_stages=LOOP_STAGES):
        if STRIDE == 1:
            rs = kk // num_k
            k0 = (kk - rs * num_k) * BLOCK_K
            jr = rs // S
            js = rs - jr * S
        r = r0 + jr * STRIDE
        s = s0 + js * STRIDE
        oh = oh0 - jr
        ow = ow0 - js
        pix_ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        kc = k0 + offs_k
        k_ok = kc < K
        a_ptrs = dy_ptr + (dy_row + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw)[:, None] \
            + kc.to(tl.int64)[None, :] * sdk
        a = tl.load(a_ptrs, mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        b_ptrs = w_ptr + (r * swr + s * sws) + kc.to(tl.int64)[:, None] * swk + w_col[None, :]
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if STRIDE > 1:
            k0 += BLOCK_K
            next_tap = k0 >= K
            k0 = tl.where(next_tap, 0, k0)
            js += next_tap.to(tl.int32)
            next_row = js == taps_s
            js = tl.where(next_row, 0, js)
            jr += next_row.to(tl.int32)

    mask = m_ok[:, None] & n_ok[None, :]
    dgrad_epilogue(acc, n, ih.to(tl.int64), iw.to(tl.int64), offs_n, n_ok, mask, pid_m, C,
                   dz_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr,
                   szn, szc, szh, szw, sxn, sxc, sxh, sxw, san, sac, sah, saw,
                   counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr,
                   pid_n, tl.num_programs(1) if GRID else n_cols, tl.num_programs(0) if GRID else n_tiles,
                   BN_BWD, HAS_ADD, TICKET, TWO_LEVEL, BLOCK_T)


@triton.jit
def dgrad_epilogue(
    acc, n, ih64, iw64, offs_n, n_ok, mask, tile, C,
    dz_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr,
    szn, szc, szh, szw, sxn, sxc, sxh, sxw, san, sac, sah, saw,
    counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr, col, n_cols, n_tiles,
    BN_BWD: tl.constexpr, HAS_ADD: tl.constexpr, TICKET: tl.constexpr, TWO_LEVEL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """The dgrad epilogue of both engines (:func:`conv_dgrad_kernel`,
    :func:`fusedres.ops.hopper.hopper_dgrad_kernel`) on a (pixels x channels) fp32 tile ``acc``:
    input pixels (n, ih64, iw64) (int64; n may be one scalar), channels ``offs_n``, stored where
    ``mask``. HAS_ADD, then BN_BWD (the ReLU mask from x, dz, the sums of row ``tile`` of the
    partials and with TICKET their reduction by the last program of the column block), or the
    plain store of da. ``col``: the program's column block, of ``n_cols``; ``n_tiles``: the tiles
    (rows of the partials) of each column."""
    z_ptrs = dz_ptr + (n * szn + ih64 * szh + iw64 * szw)[:, None] + offs_n.to(tl.int64)[None, :] * szc
    if HAS_ADD:
        a_ptrs = add_ptr + (n * san + ih64 * sah + iw64 * saw)[:, None] + offs_n.to(tl.int64)[None, :] * sac
        acc += tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    if BN_BWD:
        x_ptrs = x_ptr + (n * sxn + ih64 * sxh + iw64 * sxw)[:, None] + offs_n.to(tl.int64)[None, :] * sxc
        dz, sum_dz, sum_dzx = relu_bn_bwd_tile(acc, x_ptrs, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, offs_n,
                                               n_ok, mask, dz_ptr)
        tl.store(z_ptrs, dz, mask=mask)
        tl.store(psum_ptr + tile * C + offs_n, sum_dz, mask=n_ok)
        tl.store(psumx_ptr + tile * C + offs_n, sum_dzx, mask=n_ok)
        if TICKET:
            sums_ticket(psum_ptr, psumx_ptr, tile, col, n_cols, n_tiles, C,
                        offs_n, n_ok, counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr, TWO_LEVEL, BLOCK_T)
    else:
        tl.store(z_ptrs, acc.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_wgrad_kernel(
    dy_ptr, x_ptr, scale_ptr, shift_ptr, ws_ptr,
    H, W, C, OH, OW, K, P, PIX_PER_SPLIT,
    sdn, sdk, sdh, sdw,
    sxn, sxc, sxh, sxw,
    counter_ptr, dw_ptr, swk, swc, swr, sws,
    STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    PROLOGUE: tl.constexpr, INPUT_PRECISION: tl.constexpr, TICKET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ws[split, k, r, s, c] = sum over this split's output pixels p of dy[p, k] * act(x)[p + tap(r,s), c].

    The activation relu(x*scale + shift) is recomputed here, never read from memory.
    Workspace ``ws`` is fp32, contiguous ``(splits, K, R, S, C)``; a second pass sums the splits,
    or with TICKET the last split of each tile does (into ``dw``, as :func:`wgrad_reduce_kernel`).
    """
    _wgrad_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), 0, 0,
                dy_ptr, x_ptr, scale_ptr, shift_ptr, ws_ptr, H, W, C, OH, OW, K, P, PIX_PER_SPLIT,
                sdn, sdk, sdh, sdw, sxn, sxc, sxh, sxw, counter_ptr, dw_ptr, swk, swc, swr, sws,
                STRIDE, PAD, R, S, PROLOGUE, INPUT_PRECISION, TICKET, BLOCK_M, BLOCK_N, BLOCK_K, None, True)


@triton.jit
def _wgrad_tile(
    pid_m, pid_n, pid_s, n_cols, splits,
    dy_ptr, x_ptr, scale_ptr, shift_ptr, ws_ptr,
    H, W, C, OH, OW, K, P, PIX_PER_SPLIT,
    sdn, sdk, sdh, sdw,
    sxn, sxc, sxh, sxw,
    counter_ptr, dw_ptr, swk, swc, swr, sws,
    STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    PROLOGUE: tl.constexpr, INPUT_PRECISION: tl.constexpr, TICKET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOOP_STAGES: tl.constexpr,
    GRID: tl.constexpr,
):
    """Program (pid_m, pid_n, pid_s) of :func:`conv_wgrad_kernel`'s (., n_cols, splits) grid (also run
    by :func:`conv_bwd_kernel` on its share of a merged grid); LOOP_STAGES and GRID as
    :func:`_dgrad_tile`'s."""
    num_cb = tl.cdiv(C, BLOCK_N)
    rs = pid_n // num_cb
    cb = pid_n - rs * num_cb
    r = rs // S
    s = rs - r * S
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < K
    offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C
    if PROLOGUE:
        sc = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
        sh = tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    p_start = pid_s * PIX_PER_SPLIT
    p_end = tl.minimum(P, p_start + PIX_PER_SPLIT)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in tl.range(p_start, p_end, BLOCK_K, num_stages=LOOP_STAGES):
        p = p0 + offs_k
        p_ok = p < p_end
        ow = p % OW
        t = p // OW
        oh = t % OH
        n = (t // OH).to(tl.int64)
        ih = oh * STRIDE - PAD + r
        iw = ow * STRIDE - PAD + s
        pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # dy of a pixel whose tap lands in the padding is not loaded either: its product with the
        # padding's zero is no term of the gradient (eager leaves it out), and an infinite dy
        # would make it a NaN.
        a_ptrs = dy_ptr + (n * sdn + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw)[None, :] \
            + offs_m.to(tl.int64)[:, None] * sdk
        a = tl.load(a_ptrs, mask=m_ok[:, None] & pix_ok[None, :], other=0.0)
        b_mask = pix_ok[:, None] & n_ok[None, :]
        b_ptrs = x_ptr + (n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] \
            + offs_n.to(tl.int64)[None, :] * sxc
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if PROLOGUE:
            act = relu(b.to(tl.float32) * sc[None, :] + sh[None, :])
            b = tl.where(b_mask, act, 0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    RSC = R * S * C
    ws_ptrs = ws_ptr + pid_s.to(tl.int64) * K * RSC + offs_m.to(tl.int64)[:, None] * RSC \
        + rs * C + offs_n[None, :]
    tile_ok = m_ok[:, None] & n_ok[None, :]
    tl.store(ws_ptrs, acc, mask=tile_ok)
    if TICKET:
        # the ordering argument of fusedres.ops.bn._last_ticket: every split's workspace tile is
        # stored before its release, and read from L2 after the last split's acquire
        if GRID:
            n_cols = tl.num_programs(1)
            splits = tl.num_programs(2)
        if _last_ticket(counter_ptr + pid_m * n_cols + pid_n, splits):
            total = K * RSC
            ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * RSC + rs * C + offs_n[None, :]
            red = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for _ in range(0, splits):  # split after split from zero, as _wgrad_reduce_block
                red += tl.load(ptrs, mask=tile_ok, other=0.0, cache_modifier=".cg")
                ptrs += total
            dw_ptrs = dw_ptr + offs_m.to(tl.int64)[:, None] * swk + offs_n[None, :] * swc + r * swr + s * sws
            tl.store(dw_ptrs, red.to(dw_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def conv_bwd_kernel(
    dy_ptr, w_ptr, dz_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr,
    H, W, C, OH, OW, K, M,
    sdn, sdk, sdh, sdw,
    swk, swc, swr, sws,
    szn, szc, szh, szw,
    sxn, sxc, sxh, sxw,
    san, sac, sah, saw,
    counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr,
    w_dy_ptr, w_x_ptr, w_scale_ptr, w_shift_ptr, ws_ptr,
    w_H, w_W, w_C, w_OH, w_OW, w_K, P, PIX_PER_SPLIT,
    w_sdn, w_sdk, w_sdh, w_sdw,
    w_sxn, w_sxc, w_sxh, w_sxw,
    w_counter_ptr, dw_ptr, dw_sk, dw_sc, dw_sr, dw_ss,
    D_TILES, D_COLS, W_ROWS, W_COLS, W_SPLITS,
    STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BN_BWD: tl.constexpr, HAS_ADD: tl.constexpr,
    TICKET: tl.constexpr, TWO_LEVEL: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    D_STAGES: tl.constexpr,
    PROLOGUE: tl.constexpr, W_TICKET: tl.constexpr,
    W_BLOCK_M: tl.constexpr, W_BLOCK_N: tl.constexpr, W_BLOCK_K: tl.constexpr, W_STAGES: tl.constexpr,
):
    """One convolution's backward in one launch: :func:`conv_dgrad_kernel`'s (D_TILES, D_COLS) grid,
    then :func:`conv_wgrad_kernel`'s (W_ROWS, W_COLS, W_SPLITS) grid, flattened into one axis in
    each grid's own order (axis 0 fastest). Each program runs exactly the tile it runs in its own
    launch (same arithmetic, same order, same bits), so the merge removes a launch and the kernel
    boundary between the two, nothing else; the two never read what the other writes (dz and the
    BatchNorm sums; the weight gradient), and each ticket has its own counters. Each main loop keeps
    its own pipeline depth (D_STAGES, W_STAGES: the two launches' ``num_stages``). The dgrad arguments
    come first, as :func:`conv_dgrad_kernel` takes them, then the weight gradient's (``w_``-prefixed
    where the names clash; its ``dw`` strides as ``dw_s*``)."""
    pid = tl.program_id(0)
    n_dgrad = D_TILES * D_COLS
    if pid < n_dgrad:
        _dgrad_tile(pid % D_TILES, pid // D_TILES, D_TILES, D_COLS,
                    dy_ptr, w_ptr, dz_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, psum_ptr,
                    psumx_ptr, H, W, C, OH, OW, K, M, sdn, sdk, sdh, sdw, swk, swc, swr, sws, szn, szc, szh, szw,
                    sxn, sxc, sxh, sxw, san, sac, sah, saw, counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr,
                    STRIDE, PAD, R, S, BN_BWD, HAS_ADD, INPUT_PRECISION, TICKET, TWO_LEVEL, BLOCK_T,
                    BLOCK_M, BLOCK_N, BLOCK_K, D_STAGES, False)
    else:
        q = pid - n_dgrad
        rest = q // W_ROWS
        _wgrad_tile(q - rest * W_ROWS, rest % W_COLS, rest // W_COLS, W_COLS, W_SPLITS,
                    w_dy_ptr, w_x_ptr, w_scale_ptr, w_shift_ptr, ws_ptr, w_H, w_W, w_C, w_OH, w_OW, w_K, P,
                    PIX_PER_SPLIT, w_sdn, w_sdk, w_sdh, w_sdw, w_sxn, w_sxc, w_sxh, w_sxw,
                    w_counter_ptr, dw_ptr, dw_sk, dw_sc, dw_sr, dw_ss,
                    STRIDE, PAD, R, S, PROLOGUE, INPUT_PRECISION, W_TICKET, W_BLOCK_M, W_BLOCK_N, W_BLOCK_K,
                    W_STAGES, False)


@triton.jit
def wgrad_reduce_kernel(
    ws_ptr, dw_ptr, SPLITS, K, C, RS_C,
    swk, swc, swr, sws,
    S: tl.constexpr, BLOCK: tl.constexpr,
):
    """dw[k, c, r, s] = sum over splits of ws[split, k, r, s, c], in a fixed order, cast to dw's dtype."""
    _wgrad_reduce_block(tl.program_id(0), ws_ptr, dw_ptr, SPLITS, K, C, RS_C, swk, swc, swr, sws, S, BLOCK)


@triton.jit
def wgrad_bn_reduce_kernel(
    ws_ptr, dw_ptr, SPLITS, K, C, RS_C,
    swk, swc, swr, sws,
    W_PROGRAMS, psum_ptr, psumx_ptr, sum_ptr, sumx_ptr, T, BN_C,
    S: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """:func:`wgrad_reduce_kernel` (programs below W_PROGRAMS) and the BatchNorm backward sums of
    :func:`fusedres.ops.bn.bn_bwd_reduce_kernel` (the rest) in one launch: both reductions of a
    stage's backward, each the same arithmetic in the same order as alone."""
    pid = tl.program_id(0)
    if pid < W_PROGRAMS:
        _wgrad_reduce_block(pid, ws_ptr, dw_ptr, SPLITS, K, C, RS_C, swk, swc, swr, sws, S, BLOCK)
    else:
        bn_bwd_reduce_block(pid - W_PROGRAMS, psum_ptr, psumx_ptr, sum_ptr, sumx_ptr, T, BN_C, BLOCK_T, BLOCK_C)


@triton.jit
def _wgrad_reduce_block(pid, ws_ptr, dw_ptr, SPLITS, K, C, RS_C, swk, swc, swr, sws,
                        S: tl.constexpr, BLOCK: tl.constexpr):
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    total = K * RS_C
    ok = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = ws_ptr + offs.to(tl.int64)
    for _ in range(0, SPLITS):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += total
    k = offs // RS_C
    rem = offs - k * RS_C
    rs = rem // C
    c = rem - rs * C
    r = rs // S
    s = rs - r * S
    tl.store(dw_ptr + k * swk + c * swc + r * swr + s * sws, acc.to(dw_ptr.dtype.element_ty), mask=ok)


#: ``torch.backends.cudnn.allow_tf32``'s getter, called without the property's Python layer (the
#: launchers put it in their plan keys, every call).
tf32_enabled = torch._C._get_cudnn_allow_tf32


def input_precision(dtype: torch.dtype) -> str:
    """The tl.dot precision PyTorch's own convolution would use for ``dtype``."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def conv_out_size(size: int, ksize: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - ksize) // stride + 1


class _Plan:
    """What a launcher computes once per (shapes, strides, dtype, device, mode): the grid, the
    scalar arguments in launch order (``mid``: sizes and strides between the leading tensors and
    the ticket arguments), the constexprs, the output's shape, and the launch-local scratch per
    stream (:func:`fusedres.ops.bn.cached_scratch`). Per call only the tensors are filled in."""

    __slots__ = ("grid", "mid", "kwargs", "out_shape", "make", "scratch", "extra")

    def __init__(self, grid: tuple, mid: tuple, kwargs: dict, out_shape: tuple, make: Any = None,
                 extra: Any = None) -> None:
        self.grid, self.mid, self.kwargs, self.out_shape = grid, mid, kwargs, out_shape
        self.make, self.extra = make, extra
        self.scratch: dict = {}


def _cl_strides(shape: tuple[int, int, int, int]) -> tuple[int, ...]:
    """The strides of a channels_last tensor of ``shape``, as torch.empty gives them."""
    return torch.empty(shape, device="meta", memory_format=torch.channels_last).stride()


def _fprop_plan(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, prologue: bool,
                residual: torch.Tensor | None, out: torch.Tensor | None, stats: bool, out_shift: bool,
                out_relu: bool, finalize: Finalize | None, cfg: ConvConfig | None) -> _Plan:
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    OH, OW = conv_out_size(H, R, stride, padding), conv_out_size(W, S, stride, padding)
    cfg = cfg or fprop_config(C, K, R, stride, x.dtype)
    M = pixels(N, OH, OW)
    grid = (cdiv(M, cfg.block_m), cdiv(K, cfg.block_n))
    o_strides = out.stride() if out is not None else _cl_strides((N, K, OH, OW))
    r_strides = residual.stride() if residual is not None else o_strides
    mid = (H, W, C, OH, OW, K, M, *x.stride(), *weight.stride(), *o_strides, *r_strides)
    ticket = stats and finalize is not None and bn_ops.TICKETS
    make = None
    if ticket:
        two_level, chunks, n_counters = bn_ops.ticket_plan(*grid)
        t_flags = finalize.flags(two_level)
        device = x.device

        def make() -> tuple:
            pmean = torch.empty((grid[0], K), device=device, dtype=torch.float32)
            pm2 = torch.empty_like(pmean)
            cmean = cm2 = None
            if two_level:
                cmean = torch.empty((chunks, K), device=device, dtype=torch.float32)
                cm2 = torch.empty_like(cmean)
            return pmean, pm2, bn_ops.ticket_counters(device, n_counters), cmean, cm2
    else:
        t_flags = no_ticket_args(x)[1]
    kwargs = dict(
        STRIDE=stride, PAD=padding, R=R, S=S,
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, STATS=stats,
        OUT_SHIFT=out_shift, OUT_RELU=out_relu, **t_flags,
        INPUT_PRECISION=input_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _Plan(grid, mid, kwargs, (N, K, OH, OW), make, extra=cfg.block_m)


def fprop_plan(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride: int,
    padding: int,
    scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    stats: bool = False,
    out_shift: torch.Tensor | None = None,
    out_relu: bool = False,
    finalize: Finalize | None = None,
) -> _Plan:
    """The cached plan :func:`conv_fprop` launches these arguments with (no ``out``, no
    ``config``); a caller that knows its next calls have the same key passes it back as ``plan``."""
    prologue = scale is not None
    ticket = stats and finalize is not None and bn_ops.TICKETS
    key = ("fprop", x.shape, x.stride(), weight.shape, weight.stride(), x.dtype, x.device, stride, padding,
           prologue, residual.stride() if residual is not None else None, stats, out_shift is not None,
           out_relu, finalize.key() if ticket else None, bn_ops.TICKETS, tf32_enabled())
    return bn_ops.plan_for(key, lambda: _fprop_plan(x, weight, stride, padding, prologue, residual, None, stats,
                                                    out_shift is not None, out_relu, finalize if ticket else None,
                                                    None))


def conv_fprop(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride: int,
    padding: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    stats: bool = False,
    out_shift: torch.Tensor | None = None,
    out_relu: bool = False,
    finalize: Finalize | None = None,
    config: ConvConfig | None = None,
    plan: _Plan | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, int] | Finalize | None]:
    """Convolution of ``relu(x*scale + shift)`` (or of ``x`` when scale is None) with ``weight``,
    then ``+ residual``, ``+ out_shift`` (fp32, per output channel) and ``relu`` when asked.

    Returns ``(out, partials)``: ``out`` is (N, Cout, OH, OW) in x's dtype, channels_last
    unless ``out`` is given; ``partials`` is ``(tile_mean, tile_m2, tile_rows)`` of ``out``'s
    channels when ``stats`` is set (for :func:`fusedres.ops.bn.bn_finalize`), else None — or,
    with ``stats`` and ``finalize`` (and :data:`fusedres.ops.bn.TICKETS` on), ``finalize``,
    whose stats buffer the launch filled as bn_finalize would.

    Everything but the tensors comes from a plan cached per shapes, strides, dtype, device and
    mode (:class:`_Plan`, :func:`fprop_plan`; ``plan``: that plan, looked up by the caller); with
    a ticket, the partials (consumed in the launch) are the plan's per-stream scratch.
    """
    prologue = scale is not None
    ticket = stats and finalize is not None and bn_ops.TICKETS
    if plan is None:
        if out is None and config is None:
            plan = fprop_plan(x, weight, stride=stride, padding=padding, scale=scale, residual=residual, stats=stats,
                              out_shift=out_shift, out_relu=out_relu, finalize=finalize)
        else:
            plan = _fprop_plan(x, weight, stride, padding, prologue, residual, out, stats, out_shift is not None,
                               out_relu, finalize if ticket else None, config)
    if out is None:
        out = torch.empty(plan.out_shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    partials = None
    if ticket:
        pmean, pm2, counters, cmean, cm2 = bn_ops.cached_scratch(plan.scratch, x.device, plan.make)
        t_args = finalize.tensor_args(counters, cmean, cm2)
        partials = finalize
    elif stats:
        pmean = torch.empty((plan.grid[0], plan.out_shape[1]), device=x.device, dtype=torch.float32)
        pm2 = torch.empty_like(pmean)
        partials = (pmean, pm2, plan.extra)
        t_args = no_ticket_args(pmean)[0]
    else:
        pmean = pm2 = out  # placeholders; never read when STATS is off
        t_args = no_ticket_args(out)[0]
    launch(
        conv_fprop_kernel, plan.grid,
        x, weight, out, residual if residual is not None else out,
        scale if prologue else x, shift if prologue else x,
        out_shift if out_shift is not None else x,
        pmean, pm2,
        *plan.mid,
        *t_args,
        **plan.kwargs,
    )
    return out, partials


def dgrad_tiles(N: int, H: int, W: int, stride: int, block_m: int) -> int:
    """Programs along grid axis 0 of :func:`conv_dgrad_kernel`: the BLOCK_M-pixel tiles of each
    parity class (ih % stride, iw % stride) in turn, the order in which the kernel finds them."""
    return sum(cdiv(N * cdiv(H - ph, stride) * cdiv(W - pw, stride), block_m)
               for ph in range(stride) for pw in range(stride))


def _dgrad_plan(dy: torch.Tensor, weight: torch.Tensor, input_shape: tuple[int, int, int, int], stride: int,
                padding: int, x: torch.Tensor | None, add: torch.Tensor | None, ticket: bool,
                cfg: ConvConfig | None) -> _Plan:
    N, C, H, W = input_shape
    K, _, R, S = weight.shape
    _, _, OH, OW = dy.shape
    cfg = cfg or dgrad_config(C, K, R, stride, dy.dtype)
    M = pixels(N, H, W)
    grid = (dgrad_tiles(N, H, W, stride, cfg.block_m), cdiv(C, cfg.block_n))
    z_strides = _cl_strides((N, C, H, W))
    mid = (H, W, C, OH, OW, K, M, *dy.stride(), *weight.stride(), *z_strides,
           *(x.stride() if x is not None else z_strides), *(add.stride() if add is not None else z_strides))
    make = None
    t_flags = dict(TICKET=False, TWO_LEVEL=False, BLOCK_T=FINALIZE_BLOCK_T)
    if ticket:
        two_level, chunks, n_counters = bn_ops.ticket_plan(*grid)
        t_flags = dict(TICKET=True, TWO_LEVEL=two_level, BLOCK_T=FINALIZE_BLOCK_T)
        device = dy.device

        def make() -> tuple:
            psum = torch.empty((grid[0], C), device=device, dtype=torch.float32)
            psumx = torch.empty_like(psum)
            cs = csx = None
            if two_level:
                cs = torch.empty((chunks, C), device=device, dtype=torch.float32)
                csx = torch.empty_like(cs)
            return psum, psumx, bn_ops.ticket_counters(device, n_counters), cs, csx
    kwargs = dict(
        STRIDE=stride, PAD=padding, R=R, S=S,
        BN_BWD=x is not None, HAS_ADD=add is not None, INPUT_PRECISION=input_precision(dy.dtype), **t_flags,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _Plan(grid, mid, kwargs, (N, C, H, W), make)


def dgrad_plan(
    dy: torch.Tensor,
    weight: torch.Tensor,
    input_shape: tuple[int, int, int, int],
    *,
    stride: int,
    padding: int,
    bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    add: torch.Tensor | None = None,
    reduce_sums: bool = False,
) -> _Plan:
    """The cached plan :func:`conv_dgrad` launches these arguments with (no ``config``), as
    :func:`fprop_plan`."""
    x = bn[0] if bn is not None else None
    ticket = bn is not None and reduce_sums and bn_ops.TICKETS
    input_shape = tuple(input_shape)
    key = ("dgrad", dy.shape, dy.stride(), weight.shape, weight.stride(), input_shape, dy.dtype, dy.device,
           stride, padding, x.stride() if x is not None else None, add.stride() if add is not None else None,
           ticket, tf32_enabled())
    return bn_ops.plan_for(key, lambda: _dgrad_plan(dy, weight, input_shape, stride, padding, x, add, ticket, None))


def conv_dgrad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    input_shape: tuple[int, int, int, int],
    *,
    stride: int,
    padding: int,
    bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    add: torch.Tensor | None = None,
    reduce_sums: bool = False,
    config: ConvConfig | None = None,
    plan: _Plan | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | bn_ops.Sums | None]:
    """Gradient of the convolution with respect to its (activated) input.

    ``bn = (x, scale, shift, mean, invstd)`` turns on the BatchNorm-ReLU epilogue: the
    result is then dz = da * relu'(x*scale + shift), and the second return value holds
    per-tile partial sums (sum dz, sum dz*xhat), each (tiles, Cin) fp32 — or, with
    ``reduce_sums`` (and :data:`fusedres.ops.bn.TICKETS` on), those sums reduced by the launch's
    last programs, as a :class:`fusedres.ops.bn.Sums`. ``add`` (shaped like the input) is added to the gradient
    before the epilogue. Everything but the tensors comes from a cached plan (as :func:`conv_fprop`,
    :func:`dgrad_plan`); with the ticket, the partials are the plan's per-stream scratch.
    """
    if plan is None:
        ticket = bn is not None and reduce_sums and bn_ops.TICKETS
        if config is None:
            plan = dgrad_plan(dy, weight, input_shape, stride=stride, padding=padding, bn=bn, add=add,
                              reduce_sums=reduce_sums)
        else:
            plan = _dgrad_plan(dy, weight, tuple(input_shape), stride, padding, bn[0] if bn is not None else None,
                               add, ticket, config)
    args, dz, sums = _dgrad_args(plan, dy, weight, bn, add)
    launch(conv_dgrad_kernel, plan.grid, *args, **plan.kwargs)
    return dz, sums


def _dgrad_args(plan: _Plan, dy: torch.Tensor, weight: torch.Tensor, bn: tuple | None,
                add: torch.Tensor | None) -> tuple[tuple, torch.Tensor, Any]:
    """:func:`conv_dgrad_kernel`'s arguments from ``plan`` and the tensors (its outputs allocated),
    dz, and the sums (see :func:`conv_dgrad`)."""
    dz = torch.empty(plan.out_shape, device=dy.device, dtype=dy.dtype, memory_format=torch.channels_last)
    sums = None
    t_args = (dz,) * 5
    if bn is not None:
        x, scale, shift, mean, invstd = bn
        if plan.kwargs["TICKET"]:
            psum, psumx, counters, cs, csx = bn_ops.cached_scratch(plan.scratch, dy.device, plan.make)
            C = plan.out_shape[1]
            s = torch.empty(C, device=dy.device, dtype=torch.float32)  # two allocations: returned as
            sx = torch.empty_like(s)  # separate gradients, they must not share storage
            sums = bn_ops.Sums(s, sx)
            t_args = (counters, cs if cs is not None else s, csx if csx is not None else s, s, sx)
        else:
            psum = torch.empty((plan.grid[0], plan.out_shape[1]), device=dy.device, dtype=torch.float32)
            psumx = torch.empty_like(psum)
            sums = (psum, psumx)
    else:
        x = dz
        scale = shift = mean = invstd = psum = psumx = dz
    return (dy, weight, dz, x, add if add is not None else dz, scale, shift, mean, invstd, psum, psumx,
            *plan.mid, *t_args), dz, sums


def _wgrad_plan(dy: torch.Tensor, x: torch.Tensor, weight_like: torch.Tensor, stride: int, padding: int,
                prologue: bool, splits: int | None, ticket: bool, cfg: ConvConfig | None) -> _Plan:
    N, C, H, W = x.shape
    K, _, R, S = weight_like.shape
    _, _, OH, OW = dy.shape
    cfg = cfg or wgrad_config(C, K, R, stride, x.dtype)
    P = pixels(N, OH, OW)
    tiles = cdiv(K, cfg.block_m) * R * S * cdiv(C, cfg.block_n)
    if splits is None:
        splits = max(1, min(cdiv(2 * sm_count(x.device), tiles), cdiv(P, 4 * cfg.block_k)))
    pix_per_split = cdiv(cdiv(P, splits), cfg.block_k) * cfg.block_k
    splits = cdiv(P, pix_per_split)
    grid = (cdiv(K, cfg.block_m), R * S * cdiv(C, cfg.block_n), splits)
    mid = (H, W, C, OH, OW, K, P, pix_per_split, *dy.stride(), *x.stride())
    ws_shape = (splits, K, R, S, C)
    device = x.device
    make = None
    if ticket:
        def make() -> tuple:
            return (torch.empty(ws_shape, device=device, dtype=torch.float32),
                    bn_ops.ticket_counters(device, tiles))
    kwargs = dict(
        STRIDE=stride, PAD=padding, R=R, S=S,
        PROLOGUE=prologue, INPUT_PRECISION=input_precision(x.dtype), TICKET=ticket,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _Plan(grid, mid, kwargs, ws_shape, make, extra=(splits, S))


def wgrad_plan(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight_like: torch.Tensor,
    *,
    stride: int,
    padding: int,
    scale: torch.Tensor | None = None,
    splits: int | None = None,
) -> _Plan:
    """The cached plan :func:`conv_wgrad` launches these arguments with (no ``config``), as
    :func:`fprop_plan`."""
    prologue = scale is not None
    ticket = bn_ops.TICKETS
    key = ("wgrad", dy.shape, dy.stride(), x.shape, x.stride(), weight_like.shape, x.dtype, x.device, stride,
           padding, prologue, splits, ticket, tf32_enabled())
    return bn_ops.plan_for(key, lambda: _wgrad_plan(dy, x, weight_like, stride, padding, prologue, splits, ticket,
                                                    None))


def conv_wgrad(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight_like: torch.Tensor,
    *,
    stride: int,
    padding: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    splits: int | None = None,
    config: ConvConfig | None = None,
    defer_reduce: bool = False,
    plan: _Plan | None = None,
) -> torch.Tensor | PendingWgrad:
    """Gradient of the convolution with respect to its weight, shaped and strided like ``weight_like``.

    The input activation relu(x*scale + shift) is recomputed (or x used as is when scale is
    None). The pixel reduction is split over ``splits`` programs (chosen from the device's
    multiprocessor count when None) and the splits are summed in fp32 in a fixed order — by the
    last split of each tile when :data:`fusedres.ops.bn.TICKETS` is on (one launch; the gradient
    comes back done; the split workspace is then the plan's per-stream scratch), else by a launch
    of its own, or with ``defer_reduce`` by the caller: a :class:`PendingWgrad` comes back, for
    :func:`reduce_wgrad_and_bn_sums` (or :meth:`PendingWgrad.finish`). The plan comes from
    :func:`wgrad_plan` (or is ``plan``, as :func:`conv_fprop`).
    """
    prologue = scale is not None
    ticket = bn_ops.TICKETS
    if plan is None:
        if config is None:
            plan = wgrad_plan(dy, x, weight_like, stride=stride, padding=padding, scale=scale, splits=splits)
        else:
            plan = _wgrad_plan(dy, x, weight_like, stride, padding, prologue, splits, ticket, config)
    dw = torch.empty_like(weight_like)
    if ticket:
        ws, counters = bn_ops.cached_scratch(plan.scratch, x.device, plan.make)
    else:
        ws = torch.empty(plan.out_shape, device=x.device, dtype=torch.float32)
        counters = ws
    launch(conv_wgrad_kernel, plan.grid, *_wgrad_args(plan, dy, x, scale, shift, ws, counters, dw), **plan.kwargs)
    if ticket:
        return dw
    pending = PendingWgrad(ws, dw, *plan.extra)
    return pending if defer_reduce else pending.finish()


def _wgrad_args(plan: _Plan, dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None,
                shift: torch.Tensor | None, ws: torch.Tensor, counters: torch.Tensor, dw: torch.Tensor) -> tuple:
    """:func:`conv_wgrad_kernel`'s arguments."""
    return (dy, x, scale if scale is not None else x, shift if scale is not None else x, ws, *plan.mid,
            counters, dw, *dw.stride())


#: Whether a convolution's weight gradient and input gradient may share one launch
#: (:func:`conv_bwd_kernel`, :func:`bwd_plan`); off: two launches, the reference the tests compare
#: with bit for bit (and the GPU run times against).
MERGED_BACKWARD = True


@contextlib.contextmanager
def merged_backward(enabled: bool) -> Iterator[None]:
    """Inside the block, :data:`MERGED_BACKWARD` is ``enabled``."""
    global MERGED_BACKWARD
    old, MERGED_BACKWARD = MERGED_BACKWARD, enabled
    try:
        yield
    finally:
        MERGED_BACKWARD = old


def bwd_plan(dplan: _Plan, wplan: _Plan, device: torch.device) -> _Plan | None:
    """The plan of one :func:`conv_bwd_kernel` launch running ``dplan``'s dgrad and ``wplan``'s
    wgrad (two plans of the same convolution, the wgrad with its ticket), or None where they cannot
    share a launch: a launch has one ``num_warps`` (each main loop keeps its ``num_stages``), and a wgrad without its
    ticket leaves a reduction to a later launch anyway. The wgrad's ticket counters follow the
    dgrad's in the stream's counter buffer (two tickets at once must not share a counter)."""
    dk, wk = dplan.kwargs, wplan.kwargs
    if not wk["TICKET"] or dk["num_warps"] != wk["num_warps"]:
        return None
    d_counters = bn_ops.ticket_plan(*dplan.grid)[2] if dk["TICKET"] else 0
    w_counters = wplan.grid[0] * wplan.grid[1]
    ws_shape = wplan.out_shape

    def make() -> tuple:
        counters = bn_ops.ticket_counters(device, d_counters + w_counters)
        return torch.empty(ws_shape, device=device, dtype=torch.float32), counters[d_counters:]

    kwargs = dict(dk, D_STAGES=dk["num_stages"], PROLOGUE=wk["PROLOGUE"], W_TICKET=True,
                  W_BLOCK_M=wk["BLOCK_M"], W_BLOCK_N=wk["BLOCK_N"], W_BLOCK_K=wk["BLOCK_K"],
                  W_STAGES=wk["num_stages"])
    grid = (dplan.grid[0] * dplan.grid[1] + wplan.grid[0] * wplan.grid[1] * wplan.grid[2],)
    return _Plan(grid, (*dplan.grid, *wplan.grid), kwargs, dplan.out_shape, make, extra=(dplan, wplan))


def conv_bwd(
    plan: _Plan,
    dy: torch.Tensor,
    weight: torch.Tensor,
    *,
    bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    add: torch.Tensor | None,
    x: torch.Tensor,
    weight_like: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """``(dz, sums, dw)``: what :func:`conv_dgrad` (``dy, weight, bn, add``) and :func:`conv_wgrad`
    (``dy, x, weight_like, scale, shift``) return, from one launch of :func:`bwd_plan`'s ``plan``."""
    dplan, wplan = plan.extra
    d_args, dz, sums = _dgrad_args(dplan, dy, weight, bn, add)
    ws, counters = bn_ops.cached_scratch(plan.scratch, x.device, plan.make)
    dw = torch.empty_like(weight_like)
    launch(conv_bwd_kernel, plan.grid, *d_args, *_wgrad_args(wplan, dy, x, scale, shift, ws, counters, dw),
           *plan.mid, **plan.kwargs)
    return dz, sums, dw


_WGRAD_REDUCE_BLOCK = 1024


class PendingWgrad:
    """A weight gradient whose split sums are not reduced yet: ``dw`` is allocated, not written."""

    __slots__ = ("ws", "dw", "splits", "S")

    def __init__(self, ws: torch.Tensor, dw: torch.Tensor, splits: int, S: int) -> None:
        self.ws, self.dw, self.splits, self.S = ws, dw, splits, S

    def args(self) -> tuple:
        K, C, R, S = self.dw.shape
        return (self.ws, self.dw, self.splits, K, C, R * S * C, *self.dw.stride())

    def programs(self) -> int:
        return cdiv(self.dw.numel(), _WGRAD_REDUCE_BLOCK)

    def finish(self) -> torch.Tensor:
        """Reduce by a launch of its own; returns dw."""
        launch(wgrad_reduce_kernel, (self.programs(),), *self.args(), S=self.S, BLOCK=_WGRAD_REDUCE_BLOCK)
        return self.dw


def reduce_wgrad_and_bn_sums(
    pending: PendingWgrad, psum: torch.Tensor, psumx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dw, sum dz, sum dz*xhat)``: :meth:`PendingWgrad.finish` and
    :func:`fusedres.ops.bn.bn_bwd_reduce` in one launch (after the first level of a two-level sum,
    when there are that many tiles) — the same results as the two apart."""
    psum, psumx = bn_bwd_chunks(psum, psumx)
    T, C = psum.shape
    s = torch.empty(C, device=psum.device, dtype=torch.float32)
    sx = torch.empty_like(s)
    w_programs = pending.programs()
    launch(
        wgrad_bn_reduce_kernel, (w_programs + cdiv(C, FINALIZE_BLOCK_C),),
        *pending.args(),
        w_programs, psum, psumx, s, sx, T, C,
        S=pending.S, BLOCK=_WGRAD_REDUCE_BLOCK, BLOCK_T=FINALIZE_BLOCK_T, BLOCK_C=FINALIZE_BLOCK_C,
    )
    return pending.dw, s, sx
