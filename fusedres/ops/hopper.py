"""The sm_90 convolution engine: activations and weights through TMA tensor descriptors, wgmma.

:mod:`fusedres.ops.conv` is the portable engine (pointer loads, any strides, any architecture);
this module is the Hopper one, with the same launcher contract; :mod:`fusedres.ops.route` picks
between them (and cuDNN) in one place. Built so far: fprop, dgrad at stride 1
(:func:`conv_dgrad`) and wgrad (:func:`conv_wgrad`), contracts below.

Layout contract of :func:`conv_fprop` (what :func:`unsupported` checks; the route falls back to
the pointer engine, with the reason, wherever one does not hold):

- ``x`` is (N, C, H, W) channels_last with C a multiple of 16 and 16-byte aligned strides and
  address: a 4-D descriptor over its NHWC memory, box [1, BH, BW, BK] per filter tap, whose
  out-of-range coordinates (the zero padding, the tile's overhang) the copy engine fills with 0.
  With the BN-ReLU prologue a 16-bit ``x`` is read through its uint32 view (channel pairs).
- ``weight`` is (Cout, Cin, R, S) channels_last: its memory is the K-major [Cout, R*S*Cin]
  matrix a 2-D descriptor reads (``fusedres._fused.memory.kernel_weight`` caches that copy per
  parameter version).
- Stride 1 with any kernel size and padding, or a 1x1 kernel without padding at any stride (the
  projection shortcut: a descriptor over the strided view ``x[:, :, ::s, ::s]``).
- fp16/bf16, or fp32 where TF32 is allowed (wgmma has no full-fp32 product).
- ``scale``/``shift``/``residual``/``out_shift``/``out_relu``/``stats`` as in
  :func:`fusedres.ops.conv.conv_fprop`. The statistics partials come out per image
  (``tile_rows = OH*OW``), the layout :func:`fusedres.ops.bn.bn_finalize` merges.

The GEMM is computed transposed (swap-AB): out^T[Cout, pixels] = W[Cout, K] . act^T[K, pixels].
The BN-ReLU'd activation is then dot's right operand, which Triton stores to shared memory for an
asynchronous wgmma (as its left operand it would feed wgmma from registers and wait for every
one), and wgmma's N is the pixel count (128) whatever Cout is, so 16- and 32-channel layers run
HGMMA.64x128 with the weight rows past Cout zero-filled instead of HGMMA.64x16 or mma.sync.

:func:`conv_dgrad` (stride 1; :func:`unsupported_dgrad` names what it does not take) is the
same engine run on dy: da[n, ih, iw, c] = sum_{r,s,k} dy[n, ih + PAD - r, iw + PAD - s, k] *
w[k, c, r, s] is the stride-1 convolution of dy (padding R-1-PAD, S-1-PAD; negative for a kernel
narrower than its padding) with the transposed, spatially flipped weight wf[c, r', s', k] =
w[k, c, R-1-r', S-1-s'], whose K-major [Cin, R*S*K] memory :func:`dgrad_weight` caches per
parameter version. ``dy`` must be dense channels_last at a 16-byte aligned address with K a
multiple of 16; Cin may be anything (weight rows past it are zero-filled, dz stores are masked);
``x``/``add`` of the epilogue are read through their strides. The epilogue is the pointer
kernel's (:func:`fusedres.ops.conv.dgrad_epilogue`) on the transposed accumulator, with the
per-rectangle partial sums of the BatchNorm backward reduced by the launch's last program
(``sums_ticket``) exactly as there: the same contract, ``(psum, psumx)`` or a ``Sums``; with the
BatchNorm backward on 16-bit ``x``/``add`` laid out as dz and every channel of the tile real, a
lighter one with that contract (:func:`_dgrad_bn_bwd_pairs`, ``PAIRS``).

:func:`conv_wgrad` (stride 1, or a 1x1 without padding at any stride; up to 3x3;
:func:`unsupported_wgrad`) reads R + S boxes per pixel rectangle for its R*S taps: a program holds
one fp32 accumulator per tap (all R*S, up to 9, or whole filter rows of them) for a 64-channel
block of Cout and a block of Cin, and per rectangle (x rows by dy columns) of its split loads one
dy box per filter row r, shifted by r (wgmma's A, dy^T; pixels are the GEMM's K), and one
activation box per filter column s, shifted by s (B, the BN-ReLU recomputed once in registers and
masked to 0 outside the image); tap (r, s) multiplies the two. Shifting dy by whole rows lets the
copy engine's zero fill stand for the padding rows; only the columns need the mask.
``dy`` and ``x`` must be dense channels_last, 16-byte aligned, with 16-byte rows of
channels (Cin and Cout otherwise anything: boxes past them are zero-filled, stores masked). The
split-K partials go to :func:`fusedres.ops.conv.conv_wgrad`'s workspace and are merged in split
order by the last split's ticket, or returned as its :class:`~fusedres.ops.conv.PendingWgrad`:
the same bits either way, every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .._runtime import cdiv, launch, sm_count
from . import bn as bn_ops
from .bn import _last_ticket, chan_merge, finalize_channels, pixels, relu, relu_passes, sums_ticket
from .configs import (
    FINALIZE_BLOCK_C,
    FINALIZE_BLOCK_T,
    TWO_LEVEL_TILES,
    HopperConfig,
    HopperWgradConfig,
    hopper_block_k,
    hopper_dgrad_config,
    hopper_fprop_config,
    hopper_wgrad_config,
)
from .conv import PendingWgrad, conv_out_size, dgrad_epilogue, input_precision
from .weights import cached_layout


@triton.jit
def _inside(ohs, ows, dh, dw, H, W):
    """Whether pixel (ohs + dh, ows + dw) is in the H x W image (unsigned: a row or column
    before the image compares as past it)."""
    ih = (ohs + dh).to(tl.uint32, bitcast=True)
    iw = (ows + dw).to(tl.uint32, bitcast=True)
    return (ih < H.to(tl.uint32)) & (iw < W.to(tl.uint32))


@triton.jit
def _top_half(t):
    """Rows [0, R/2) of an R x M tile."""
    top, _ = tl.split(t.reshape(2, t.shape[0] // 2, t.shape[1]).permute(1, 2, 0))
    return top


@triton.jit
def _pad_value(sc, dtype: tl.constexpr, PAIRS: tl.constexpr):
    """Per channel, the bits of an input value v whose activation relu(v * sc + sh) is 0 wherever
    :func:`_pad_value_exact` holds: -Inf times the sign of sc (the product is -Inf, and so is
    its sum with a shift below +Inf), 0 where sc is 0 (then the activation is relu(sh), 0 for a
    shift of at most 0). As ``dtype`` bits, in channel pairs with PAIRS (the uint32 view)."""
    kx = tl.where(sc > 0, float("-inf"), tl.where(sc < 0, float("inf"), 0.0))
    if PAIRS:
        bits = kx.to(dtype).to(tl.uint16, bitcast=True).to(tl.uint32)
        lo, hi = tl.split(bits.reshape(bits.shape[0] // 2, 2))
        pad = lo | (hi << 16)
    else:
        pad = kx.to(tl.uint32, bitcast=True)
    return pad


@triton.jit
def _pad_value_exact(sc, sh):
    """Whether :func:`_pad_value` gives activation 0 in every channel of the slice: scale not NaN,
    and a shift of at most 0, or one below +Inf (not NaN) with a nonzero scale."""
    ok = (sc == sc) & ((sh <= 0) | ((sc != 0) & (sh < float("inf"))))
    return tl.min(ok.to(tl.int32), axis=0) != 0


@triton.jit
def _bn(u, sc, sh, dtype: tl.constexpr, PAIRS: tl.constexpr):
    """x * sc + sh in fp32 from the bits ``u`` (uint32) of a box of x (PAIRS: channel pairs of a 16-bit
    x, :func:`_unpack_pairs`)."""
    if PAIRS:
        lo, hi = _unpack_pairs(u, dtype)
        sc_lo, sc_hi = _split_pairs(sc)
        sh_lo, sh_hi = _split_pairs(sh)
        y = tl.join(lo * sc_lo[None, :] + sh_lo[None, :], hi * sc_hi[None, :] + sh_hi[None, :])
        y = y.reshape(u.shape[0], u.shape[1] * 2)
    else:
        y = u.to(tl.float32, bitcast=True) * sc[None, :] + sh[None, :]
    return y


@triton.jit
def _fprop_loop(acc, x_desc, w_desc, scale_ptr, shift_ptr, n, oh0, ow0, k0, ohs, ows, H, W, OH, OW,
                NUM_C: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr, PROLOGUE: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, MASK: tl.constexpr, FALLBACK: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """The main loop of :func:`hopper_fprop_kernel` over taps and channel slices, ``acc`` += W . act^T.
    The padding of a tap that reaches past the image for a stored pixel comes out 0 after the
    activation (not relu(shift)): MASK 1 by :func:`_pad_value` in the rows outside (one select
    per 32-bit word of x before the transform), MASK 2 by the unsigned min of each element's
    fp32 bits (any scale and shift); in both, the other taps (most taps of most rectangles)
    branch around it. MASK 3: a select on the rounded tile at every tap (any scale and shift,
    the fewest registers). MASK 0: none (no prologue: the copy engine's zero is the padding; no
    padding: a tap leaves the image only for the overhang, whose outputs are never stored).
    FALLBACK: the loop of a program whose BatchNorm has no pad value, in one stage (its buffers
    then fit in the other loop's shared memory)."""
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    C: tl.constexpr = NUM_C * BLOCK_K
    # With the prologue a 16-bit activation comes in through a uint32 view, two adjacent
    # channels per element: unpacking a bf16 pair is a shift and an AND (widening 16-bit loads,
    # the compiler spends PRMT + IMAD on every odd channel).
    PAIRS: tl.constexpr = PROLOGUE and w_desc.dtype.primitive_bitwidth == 16
    offs_k = tl.arange(0, BLOCK_K)
    # One channel slice (C <= 64): the prologue's vectors are loaded once, not per tap. With the
    # pad value (one slice too) they are loaded in the loop, where LLVM hoists them all the same:
    # so written, the 8x32 tile at 255 registers does not spill on Triton 3.6 (8 bytes otherwise).
    HOIST: tl.constexpr = NUM_C == 1 and MASK != 1
    if PROLOGUE and HOIST:
        sc = tl.load(scale_ptr + offs_k)
        sh = tl.load(shift_ptr + offs_k)
    if MASK == 1 or MASK == 2:
        # Filter rows r in [r_lo, r_hi] (columns s in [s_lo, s_hi]) read inside the image for
        # every stored pixel of the rectangle.
        r_lo = PAD - oh0
        r_hi = H + PAD - tl.minimum(oh0 + BLOCK_H, OH)
        s_lo = PAD - ow0
        s_hi = W + PAD - tl.minimum(ow0 + BLOCK_W, OW)
    for kk in tl.range(0, R * S * NUM_C, num_stages=1 if FALLBACK else None):
        rs = kk // NUM_C
        c0 = (kk - rs * NUM_C) * BLOCK_K
        r = rs // S
        s = rs - r * S
        if PROLOGUE:
            if not HOIST:
                sc = tl.load(scale_ptr + c0 + offs_k)
                sh = tl.load(shift_ptr + c0 + offs_k)
            if PAIRS:
                v = x_desc.load([n, oh0 + r - PAD, ow0 + s - PAD, c0 // 2]).reshape(BLOCK_M, BLOCK_K // 2)
            else:
                v = x_desc.load([n, oh0 + r - PAD, ow0 + s - PAD, c0]).reshape(BLOCK_M, BLOCK_K)
            u = v.to(tl.uint32, bitcast=True)
            masked = False
            if MASK == 1 or MASK == 2:
                masked = (r < r_lo) | (r > r_hi) | (s < s_lo) | (s > s_hi)
            if MASK == 1:
                if masked:
                    pad = _pad_value(sc, w_desc.dtype, PAIRS)
                    u = tl.where(_inside(ohs, ows, r - PAD, s - PAD, H, W)[:, None], u, pad[None, :])
            y = _bn(u, sc, sh, w_desc.dtype, PAIRS)
            if MASK == 2:
                if masked:
                    keep = tl.where(_inside(ohs, ows, r - PAD, s - PAD, H, W), 0xFFFFFFFF, 0).to(tl.uint32)
                    # The unsigned min of the fp32 bits with all ones (inside) or 0 (padding): one
                    # instruction per element (a select here is moved past the rounding to 16
                    # bits by the compiler: PRMT + SEL + PRMT per pair).
                    y = tl.minimum(y.to(tl.uint32, bitcast=True), keep[:, None]).to(tl.float32, bitcast=True)
            a = relu(y).to(w_desc.dtype)
            if MASK == 3:
                a = tl.where(_inside(ohs, ows, r - PAD, s - PAD, H, W)[:, None], a, 0.0)
        else:
            a = x_desc.load([n, oh0 + r - PAD, ow0 + s - PAD, c0]).reshape(BLOCK_M, BLOCK_K)
        # Without the prologue the padding is exact as loaded, and both operands go from shared
        # memory to wgmma untouched.
        acc = tl.dot(w_desc.load([k0, rs * C + c0]), tl.trans(a), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def hopper_fprop_kernel(
    x_desc, w_desc, out_ptr, res_ptr, scale_ptr, shift_ptr, oshift_ptr, pmean_ptr, pm2_ptr,
    H, W, OH, OW, K, TILES_H, TILES_W,
    son, soc, soh, sow,
    srn, src, srh, srw,
    counter_ptr, imean_ptr, im2_ptr, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, rmean_out_ptr, rvar_out_ptr,
    batches_ptr, stats_ptr, momentum, eps,
    NUM_C: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STATS: tl.constexpr,
    OUT_SHIFT: tl.constexpr, OUT_RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr, PAD_MASK: tl.constexpr,
    TICKET: tl.constexpr, UPDATE_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EPI_N: tl.constexpr,
):
    """out[n, oh, ow, k] = sum_{r,s,c} act(x)[n, oh + r - PAD, ow + s - PAD, c] * w[k, r, s, c] (+ epilogue).

    Program (t, j) computes output channels [j*BLOCK_N, (j+1)*BLOCK_N) of the BLOCK_H x BLOCK_W
    pixel rectangle t (row-major over the images' tile grids, TILES_H x TILES_W per image).
    The input has NUM_C slices of BLOCK_K channels (with PROLOGUE, a 16-bit x_desc reads uint32
    channel pairs, BLOCK_K // 2 per box). With STATS it writes the mean and M2 of the
    rectangle's pixels inside the image, row t of the partials. PAD_MASK: how the prologue keeps
    the padding at 0, :func:`_fprop_loop`'s MASK (1: the pad value where :func:`_pad_value_exact`
    holds, else 3).

    With TICKET (and STATS) the launch also finalizes the statistics, as the two launches after
    it would (:func:`hopper_stats_merge_kernel`, then :func:`fusedres.ops.bn.bn_finalize` over
    the images; same helpers, same order, same bits): the last rectangle of image n of a
    channel block merges the image's rectangles into row n of ``imean/im2`` (with one rectangle
    per image, its partials are the image's), and the last image of the channel block finalizes
    over the images into ``stats`` and the running statistics. Counters: (channel blocks,
    images) for the images, then one per channel block (:func:`fusedres.ops.bn._last_ticket`
    says why each last program sees the rows it merges).


    EPI_N < BLOCK_N (16 or 32, when Cout is at most that and the tile has a single column block):
    the epilogue runs on the accumulator's first EPI_N rows only, the others being the weight
    rows past Cout that the copy engine zero-filled.
    """
    pid = tl.program_id(0)
    per_image = TILES_H * TILES_W
    n = pid // per_image
    th = (pid - n * per_image) // TILES_W
    oh0 = th * BLOCK_H
    ow0 = (pid - n * per_image - th * TILES_W) * BLOCK_W
    k0 = tl.program_id(1) * BLOCK_N
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    rows = tl.arange(0, BLOCK_M)
    ohs = oh0 + rows // BLOCK_W
    ows = ow0 + rows % BLOCK_W

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if PROLOGUE and PAD > 0 and PAD_MASK == 1:
        # A program whose BatchNorm has a pad value for every channel (:func:`_pad_value_exact`:
        # all but a zero scale with a positive shift, or NaN / +Inf; one channel slice) masks by
        # it; any other takes the select on the rounded tile in a loop of its own.
        offs_c = tl.arange(0, BLOCK_K)
        if _pad_value_exact(tl.load(scale_ptr + offs_c), tl.load(shift_ptr + offs_c)):
            acc = _fprop_loop(acc, x_desc, w_desc, scale_ptr, shift_ptr, n, oh0, ow0, k0, ohs, ows, H, W, OH, OW,
                              NUM_C, PAD, R, S, PROLOGUE, INPUT_PRECISION, 1, False, BLOCK_H, BLOCK_W, BLOCK_K)
        else:
            acc = _fprop_loop(acc, x_desc, w_desc, scale_ptr, shift_ptr, n, oh0, ow0, k0, ohs, ows, H, W, OH, OW,
                              NUM_C, PAD, R, S, PROLOGUE, INPUT_PRECISION, 3, True, BLOCK_H, BLOCK_W, BLOCK_K)
    else:
        acc = _fprop_loop(acc, x_desc, w_desc, scale_ptr, shift_ptr, n, oh0, ow0, k0, ohs, ows, H, W, OH, OW,
                          NUM_C, PAD, R, S, PROLOGUE, INPUT_PRECISION, PAD_MASK if PROLOGUE and PAD > 0 else 0,
                          False, BLOCK_H, BLOCK_W, BLOCK_K)

    # Cout <= 32 on the 64-row tile: the residual load, the store and the statistics would run on
    # 64 rows of which 16 or 32 are real, four or two times the epilogue's instructions per
    # stored element; one exchange through shared memory gives each thread the real rows' values
    # alone.
    if EPI_N < BLOCK_N:
        acc = _top_half(acc)
    if EPI_N * 2 < BLOCK_N:
        acc = _top_half(acc)
    offs_n = k0 + tl.arange(0, EPI_N)
    n_ok = offs_n < K
    pix_ok = (ohs < OH) & (ows < OW)
    mask = n_ok[:, None] & pix_ok[None, :]
    n64 = n.to(tl.int64)
    oh64 = ohs.to(tl.int64)
    ow64 = ows.to(tl.int64)
    ch64 = offs_n.to(tl.int64)[:, None]
    if HAS_RESIDUAL:
        r_ptrs = res_ptr + (n64 * srn + oh64 * srh + ow64 * srw)[None, :] + ch64 * src
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    if OUT_SHIFT:
        acc += tl.load(oshift_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    if OUT_RELU:
        acc = relu(acc)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (n64 * son + oh64 * soh + ow64 * sow)[None, :] + ch64 * soc, y, mask=mask)
    if STATS:
        # Statistics of the stored (rounded) values, over the rectangle's pixels inside the image.
        count = (tl.minimum(OH - oh0, BLOCK_H) * tl.minimum(OW - ow0, BLOCK_W)).to(tl.float32)
        v = tl.where(mask, y.to(tl.float32), 0.0)
        mean = tl.sum(v, axis=1) / count
        d = tl.where(mask, v - mean[:, None], 0.0)
        row = pid.to(tl.int64) * K
        tl.store(pmean_ptr + row + offs_n, mean, mask=n_ok)
        tl.store(pm2_ptr + row + offs_n, tl.sum(d * d, axis=1), mask=n_ok)
        if TICKET:
            col = tl.program_id(1)
            n_cols = tl.num_programs(1)
            images = tl.num_programs(0) // per_image
            if per_image == 1:  # one rectangle per image: its partials are the image's
                if _last_ticket(counter_ptr + col, images):
                    finalize_channels(pmean_ptr, pm2_ptr, images, K, images * OH * OW, OH * OW, offs_n, n_ok,
                                      weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, rmean_out_ptr, rvar_out_ptr,
                                      batches_ptr, col == 0, stats_ptr,
                                      momentum, eps, True, UPDATE_RUNNING, HAS_WEIGHT, HAS_BIAS, BLOCK_T)
            elif _last_ticket(counter_ptr + col * images + n, per_image):
                i_mean, i_m2 = _merge_image(pmean_ptr, pm2_ptr, n, K, OH, OW, TILES_H, TILES_W, offs_n, n_ok,
                                            BLOCK_H, BLOCK_W, BLOCK_T)
                tl.store(imean_ptr + n * K + offs_n, i_mean, mask=n_ok)
                tl.store(im2_ptr + n * K + offs_n, i_m2, mask=n_ok)
                if _last_ticket(counter_ptr + n_cols * images + col, images):
                    finalize_channels(imean_ptr, im2_ptr, images, K, images * OH * OW, OH * OW, offs_n, n_ok,
                                      weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, rmean_out_ptr, rvar_out_ptr,
                                      batches_ptr, col == 0, stats_ptr,
                                      momentum, eps, True, UPDATE_RUNNING, HAS_WEIGHT, HAS_BIAS, BLOCK_T)


@triton.jit
def hopper_dgrad_kernel(
    dy_desc, w_desc, dz_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr,
    H, W, C, TILES_H, TILES_W,
    szn, szc, szh, szw,
    sxn, sxc, sxh, sxw,
    san, sac, sah, saw,
    counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr,
    NUM_K: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    BN_BWD: tl.constexpr, HAS_ADD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TICKET: tl.constexpr, TWO_LEVEL: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EPI_N: tl.constexpr, PAIRS: tl.constexpr,
):
    """da[n, ih, iw, c] = sum_{r',s',k} dy[n, ih + r' - PAD_H, iw + s' - PAD_W, k] * wf[c, r', s', k]
    (the flipped weight, PAD_H = R-1-padding), then :func:`fusedres.ops.conv.dgrad_epilogue`
    on the accumulator's first EPI_N rows (16 or 32 when Cin fits in them: the fprop's EPI_N), or
    with PAIRS :func:`_dgrad_bn_bwd_pairs` (``x_ptr``/``add_ptr`` then point to uint32 channel
    pairs, with dz's strides: ``sx*``/``sa*`` unused).

    Program (t, j) computes input channels [j*BLOCK_N, (j+1)*BLOCK_N) of the BLOCK_H x BLOCK_W
    input-pixel rectangle t (row-major over the images' tile grids, TILES_H x TILES_W per image),
    reducing over the taps and NUM_K slices of BLOCK_K output channels: per iteration one dy box
    (the copy engine zero-fills rows and columns outside dy) and one weight box, both straight
    from shared memory into an asynchronous wgmma. Row t of the partial sums is the rectangle's.
    """
    pid = tl.program_id(0)
    per_image = TILES_H * TILES_W
    n = pid // per_image
    th = (pid - n * per_image) // TILES_W
    ih0 = th * BLOCK_H
    iw0 = (pid - n * per_image - th * TILES_W) * BLOCK_W
    c0 = tl.program_id(1) * BLOCK_N
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    K: tl.constexpr = NUM_K * BLOCK_K

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kk in range(0, R * S * NUM_K):
        rs = kk // NUM_K
        k0 = (kk - rs * NUM_K) * BLOCK_K
        r = rs // S
        s = rs - r * S
        a = dy_desc.load([n, ih0 + r - PAD_H, iw0 + s - PAD_W, k0]).reshape(BLOCK_M, BLOCK_K)
        acc = tl.dot(w_desc.load([c0, rs * K + k0]), tl.trans(a), acc, input_precision=INPUT_PRECISION)

    # The pointer kernel's epilogue on the (pixels x channels) tile, without the weight rows past
    # Cin <= 32 (as the fprop's).
    if EPI_N < BLOCK_N:
        acc = _top_half(acc)
    if EPI_N * 2 < BLOCK_N:
        acc = _top_half(acc)
    rows = tl.arange(0, BLOCK_M)
    ihs = ih0 + rows // BLOCK_W
    iws = iw0 + rows % BLOCK_W
    offs_n = c0 + tl.arange(0, EPI_N)
    n_ok = offs_n < C
    row_ok = (ihs < H) & (iws < W)
    if PAIRS:
        # The pixels past the image read the image's last row / column: every use of those values
        # is masked, and the loads go unpredicated (no zero fill of the registers first).
        off = (n.to(tl.int64) * szn + tl.minimum(ihs, H - 1).to(tl.int64) * szh
               + tl.minimum(iws, W - 1).to(tl.int64) * szw)
        _dgrad_bn_bwd_pairs(tl.trans(acc), off, row_ok, c0, offs_n, n_ok, pid, C,
                            dz_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr,
                            counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr,
                            HAS_ADD, TICKET, TWO_LEVEL, BLOCK_T)
    else:
        dgrad_epilogue(tl.trans(acc), n.to(tl.int64), ihs.to(tl.int64), iws.to(tl.int64), offs_n, n_ok,
                       row_ok[:, None] & n_ok[None, :], pid, C,
                       dz_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr,
                       szn, szc, szh, szw, sxn, sxc, sxh, sxw, san, sac, sah, saw,
                       counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr,
                       tl.program_id(1), tl.num_programs(1), tl.num_programs(0),
                       BN_BWD, HAS_ADD, TICKET, TWO_LEVEL, BLOCK_T)


@triton.jit
def _unpack_pairs(u, dtype: tl.constexpr):
    """The two 16-bit values of each uint32 of ``u`` as fp32: (even channels, odd channels). A bf16
    is the top half of its fp32, so each is one shift or one AND (a 16-bit load widened element by
    element takes PRMT + IMAD for every odd channel)."""
    if dtype == tl.bfloat16:
        lo = (u << 16).to(tl.float32, bitcast=True)
        hi = (u & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        lo = u.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (u >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _split_pairs(v):
    """(even, odd) channels of the last dimension of ``v``."""
    return tl.split(v.reshape(v.shape[:-1] + [v.shape[-1] // 2, 2]))


@triton.jit
def _bn_bwd_half(da, xv, sc, sh, mu, row_ok, dtype: tl.constexpr):
    """The BatchNorm-ReLU backward of one parity of channels: dz rounded to ``dtype`` (0 where the
    ReLU blocks and in the rows past the image), and the terms of the sums of dz and of
    dz * (x - mean), taken from the rounded dz as :func:`fusedres.ops.bn.relu_bn_bwd_tile` does."""
    dz = tl.where(row_ok[:, None] & relu_passes(xv * sc[None, :] + sh[None, :]), da, 0.0).to(dtype)
    dzf = dz.to(tl.float32)
    return dz, dzf, dzf * tl.where(row_ok[:, None], xv - mu[None, :], 0.0)


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _dgrad_bn_bwd_pairs(
    acc, off, row_ok, c0, offs_n, n_ok, tile, C,
    dz_ptr, x_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr,
    counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr,
    HAS_ADD: tl.constexpr, TICKET: tl.constexpr, TWO_LEVEL: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """:func:`fusedres.ops.conv.dgrad_epilogue` with BN_BWD (and HAS_ADD) on the (pixels x channels)
    tile ``acc`` when every one of its channels is real and ``x``, ``add`` and ``dz`` are 16-bit
    with the same strides: ``off`` is each pixel's offset (in elements; the pixels past the image
    clamped to it), ``x_ptr``/``add_ptr`` point to the uint32 channel pairs of their tensors.

    Same contract and results but for the rounding of the sums of dz * xhat, taken as
    invstd * sum(dz * (x - mean)): one multiply per channel instead of one per element. (With an
    infinite invstd, eps = 0 over a zero variance, which only eval mode accepts, eager's sum is NaN
    as soon as one term is 0 * inf; this one is not.) What makes
    it lighter (sm_90 SASS, benchmarks/NOTES.md section 3): x and add unpacked from channel pairs,
    pixel offsets computed once for the three tensors, unpredicated loads, the two sums in one
    reduction (one exchange between warps)."""
    P: tl.constexpr = acc.shape[1] // 2
    dtype: tl.constexpr = dz_ptr.dtype.element_ty
    offs_p = tl.multiple_of(c0 // 2, P) + tl.arange(0, P)
    pair_off = (off // 2)[:, None] + offs_p[None, :]
    da_lo, da_hi = _split_pairs(acc)
    if HAS_ADD:
        a_lo, a_hi = _unpack_pairs(tl.load(add_ptr + pair_off).to(tl.uint32, bitcast=True), dtype)
        da_lo += a_lo
        da_hi += a_hi
    x_lo, x_hi = _unpack_pairs(tl.load(x_ptr + pair_off).to(tl.uint32, bitcast=True), dtype)
    sc_lo, sc_hi = _split_pairs(tl.load(scale_ptr + offs_n))
    sh_lo, sh_hi = _split_pairs(tl.load(shift_ptr + offs_n))
    mu_lo, mu_hi = _split_pairs(tl.load(mean_ptr + offs_n))
    dz_lo, d_lo, dx_lo = _bn_bwd_half(da_lo, x_lo, sc_lo, sh_lo, mu_lo, row_ok, dtype)
    dz_hi, d_hi, dx_hi = _bn_bwd_half(da_hi, x_hi, sc_hi, sh_hi, mu_hi, row_ok, dtype)
    tl.store(dz_ptr + off[:, None] + offs_n[None, :], tl.join(dz_lo, dz_hi).reshape(acc.shape), mask=row_ok[:, None])
    s, sx = tl.reduce((tl.join(d_lo, d_hi).reshape(acc.shape), tl.join(dx_lo, dx_hi).reshape(acc.shape)), 0,
                      _add_pairs)
    tl.store(psum_ptr + tile * C + offs_n, s)
    tl.store(psumx_ptr + tile * C + offs_n, sx * tl.load(invstd_ptr + offs_n))
    if TICKET:
        sums_ticket(psum_ptr, psumx_ptr, tile, tl.program_id(1), tl.num_programs(1), tl.num_programs(0), C,
                    offs_n, n_ok, counter_ptr, csum_ptr, csumx_ptr, sum_ptr, sumx_ptr, TWO_LEVEL, BLOCK_T)


@triton.jit
def _merge_image(pmean_ptr, pm2_ptr, n, K, OH, OW, TILES_H, TILES_W, offs_c, c_ok,
                 BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr):
    """(mean, M2) of image n from its rectangles' partials (a rectangle's count from its place in
    the tile grid), chunk by chunk of BLOCK_T rectangles merged with Chan's formula, each chunk's
    sums taken rectangle after rectangle in order from zero: the rounding does not depend on how
    a kernel spreads the channels over its threads (:func:`fusedres.ops.bn._chunk_mean_m2`), so
    the fprop's last program and :func:`hopper_stats_merge_kernel` give the same bits. Rows are
    read from L2 (``.cg``), where the other programs' stores are visible after a ticket."""
    per_image = TILES_H * TILES_W
    n_a = tl.zeros(offs_c.shape, dtype=tl.float32)
    mean_a = tl.zeros(offs_c.shape, dtype=tl.float32)
    m2_a = tl.zeros(offs_c.shape, dtype=tl.float32)
    for t0 in range(0, per_image, BLOCK_T):
        n_b = 0.0
        s = tl.zeros(offs_c.shape, dtype=tl.float32)
        q = tl.zeros(offs_c.shape, dtype=tl.float32)
        for i in range(BLOCK_T):
            t = t0 + i
            ok = t < per_image
            th = t // TILES_W
            cnt = tl.where(ok, tl.minimum(OH - th * BLOCK_H, BLOCK_H) * tl.minimum(OW - (t - th * TILES_W) * BLOCK_W,
                                                                                   BLOCK_W), 0).to(tl.float32)
            idx = (n * per_image + t).to(tl.int64) * K + offs_c
            s = s + cnt * tl.load(pmean_ptr + idx, mask=ok & c_ok, other=0.0, cache_modifier=".cg")
            q = q + tl.load(pm2_ptr + idx, mask=ok & c_ok, other=0.0, cache_modifier=".cg")
            n_b = n_b + cnt
        mean_b = s / n_b
        d = tl.zeros(offs_c.shape, dtype=tl.float32)
        for i in range(BLOCK_T):
            t = t0 + i
            ok = t < per_image
            th = t // TILES_W
            cnt = tl.where(ok, tl.minimum(OH - th * BLOCK_H, BLOCK_H) * tl.minimum(OW - (t - th * TILES_W) * BLOCK_W,
                                                                                   BLOCK_W), 0).to(tl.float32)
            idx = (n * per_image + t).to(tl.int64) * K + offs_c
            dev = tl.where(ok & c_ok, tl.load(pmean_ptr + idx, mask=ok & c_ok, other=0.0, cache_modifier=".cg")
                           - mean_b, 0.0)
            d = d + cnt * dev * dev
        n_a, mean_a, m2_a = chan_merge(n_a, mean_a, m2_a, n_b, mean_b, q + d)
    return mean_a, m2_a


@triton.jit
def _wgrad_act(x_desc, sc, sh, n, ih0, iw0, c0, rows, H, W, dtype: tl.constexpr, PAD: tl.constexpr,
               PROLOGUE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
               PAIRS: tl.constexpr):
    """The activation of the x box at (ih0, iw0), for every filter row: the BN-ReLU recomputed in
    registers (a 16-bit x through its uint32 view, as the fprop engine's prologue: a shift and an AND
    unpack a bf16 pair), at exactly 0 outside the image where the copy engine's zero fill would give
    relu(shift). Only a box that reaches past the image needs the mask (one branch per box); without
    padding none does: an x pixel past the image then meets dy past its edge, which is zero-filled."""
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    if PAIRS:
        u = x_desc.load([n, ih0, iw0, c0 // 2]).reshape(BLOCK_P, BLOCK_N // 2)
        lo, hi = _unpack_pairs(u.to(tl.uint32, bitcast=True), dtype)
        sc_lo, sc_hi = _split_pairs(sc)
        sh_lo, sh_hi = _split_pairs(sh)
        y = tl.join(lo * sc_lo[None, :] + sh_lo[None, :], hi * sc_hi[None, :] + sh_hi[None, :])
        y = y.reshape(BLOCK_P, BLOCK_N)
    else:
        v = x_desc.load([n, ih0, iw0, c0]).reshape(BLOCK_P, BLOCK_N)
        if PROLOGUE:
            y = v.to(tl.float32) * sc[None, :] + sh[None, :]
    if PROLOGUE:  # without it the copy engine's zero is the activation's
        if PAD > 0:
            if (ih0 + BLOCK_H > H) | (iw0 < 0) | (iw0 + BLOCK_W > W):
                y = tl.where(_inside(ih0 + rows // BLOCK_W, iw0 + rows % BLOCK_W, 0, 0, H, W)[:, None], y, 0.0)
        v = relu(y).to(dtype)
    return v


@triton.jit
def _wgrad_dy(dy_desc, n, ih0, ow0, k0, r, PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """dy^T of filter row ``r`` for the x rows from ih0: x row ih meets dy row ih + PAD - r, a box the
    copy engine zero-fills outside dy (no mask: the rows' padding terms vanish)."""
    return tl.trans(dy_desc.load([n, ih0 + PAD - r, ow0, k0]).reshape(BLOCK_P, BLOCK_M))


@triton.jit
def _pick(i: tl.constexpr, v0, v1, v2):
    """v0, v1 or v2 by a compile-time index."""
    v = v0
    if i == 1:
        v = v1
    if i == 2:
        v = v2
    return v


@triton.jit
def _wgrad_tap(acc, i: tl.constexpr, d0, d1, d2, a0, a1, a2, S: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc += dy^T . act for the program's tap ``i``: the dy box of its filter row, the activation
    box of its filter column."""
    return tl.dot(_pick(i // S, d0, d1, d2), _pick(i % S, a0, a1, a2), acc, input_precision=INPUT_PRECISION)


@triton.jit
def _wgrad_store_tap(acc, ws_tile, tap, C, tile_ok):
    tl.store(ws_tile + tap * C, acc, mask=tile_ok)


@triton.jit
def hopper_wgrad_kernel(
    dy_desc, x_desc, scale_ptr, shift_ptr, ws_ptr, counter_ptr, dw_ptr,
    H, W, OW, C, K, TILES_H, TILES_W, TILES, TILES_PER_SPLIT,
    swk, swc, swr, sws,
    R: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, TAPS: tl.constexpr,
    PROLOGUE: tl.constexpr, INPUT_PRECISION: tl.constexpr, TICKET: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """ws[split, k, r, s, c] = sum over the split's rectangles of dy[ih + PAD - r, ow, k] * act(x)[ih, ow + s - PAD, c].

    The sum of dy[oh, ow] * act[oh + r - PAD, ow + s - PAD] over dy's pixels, taken over x's rows
    ih = oh + r - PAD instead (act is 0 outside x; dy's rows outside it are zero-filled) and dy's
    columns ow. Program (i, j, split): output channels [i*BLOCK_M, +BLOCK_M) x input channels of
    block j // (R*S/TAPS) x the TAPS taps of group j % (R*S/TAPS) (whole filter rows; all R*S when
    TAPS = R*S), over the rectangles [split*TILES_PER_SPLIT, +TILES_PER_SPLIT), row-major over the
    images' grids of BLOCK_H x rows by BLOCK_W dy columns. Per rectangle one dy box
    [BLOCK_H*BLOCK_W, BLOCK_M] per filter row (wgmma's A, dy^T) and one activation box per filter
    column (its B) serve the taps: R + S boxes for R*S taps, so that each activation is
    transformed once per filter column, not per tap, and the copies and their barriers are fewer
    (sm_90 SASS, benchmarks/NOTES.md section 3: at 3x3 Cin 32 x Cout 64, 598 instructions per 36
    HGMMA against 1111 with one dy box and nine activation boxes). The pixels are wgmma's K.
    The workspace is the pointer wgrad's, fp32 contiguous (splits, K, R, S, C); with TICKET the
    last split of each tile sums the splits' partials in split order from zero into ``dw``, the
    arithmetic of :func:`fusedres.ops.conv.wgrad_reduce_kernel` (the same bits either way).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    GROUPS: tl.constexpr = (R * S) // TAPS
    cb = pid_n // GROUPS
    tap0 = (pid_n - cb * GROUPS) * TAPS
    r0 = tap0 // S  # a program's taps are whole filter rows
    k0 = pid_m * BLOCK_M
    c0 = cb * BLOCK_N
    BLOCK_P: tl.constexpr = BLOCK_H * BLOCK_W
    rows = tl.arange(0, BLOCK_P)
    offs_c = c0 + tl.arange(0, BLOCK_N)
    c_ok = offs_c < C
    if PROLOGUE:
        sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
        sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    else:
        sc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        sh = sc
    per_image = TILES_H * TILES_W
    t_start = split * TILES_PER_SPLIT
    t_end = tl.minimum(TILES, t_start + TILES_PER_SPLIT)
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    acc4 = acc0
    acc5 = acc0
    acc6 = acc0
    acc7 = acc0
    acc8 = acc0
    n = t_start // per_image
    th = (t_start - n * per_image) // TILES_W
    ih0 = th * BLOCK_H
    ow0 = (t_start - n * per_image - th * TILES_W) * BLOCK_W
    for _ in range(t_start, t_end):
        # each activation box (filter column s) serves the program's filter rows, each dy box (row r)
        # the filter columns: R + S boxes per rectangle for the R*S taps
        a0 = _wgrad_act(x_desc, sc, sh, n, ih0, ow0 - PAD, c0, rows, H, W, dy_desc.dtype, PAD, PROLOGUE,
                        BLOCK_H, BLOCK_W, BLOCK_N, PAIRS)
        a1 = a0
        a2 = a0
        if S > 1:
            a1 = _wgrad_act(x_desc, sc, sh, n, ih0, ow0 + 1 - PAD, c0, rows, H, W, dy_desc.dtype, PAD, PROLOGUE,
                            BLOCK_H, BLOCK_W, BLOCK_N, PAIRS)
        if S > 2:
            a2 = _wgrad_act(x_desc, sc, sh, n, ih0, ow0 + 2 - PAD, c0, rows, H, W, dy_desc.dtype, PAD, PROLOGUE,
                            BLOCK_H, BLOCK_W, BLOCK_N, PAIRS)
        d0 = _wgrad_dy(dy_desc, n, ih0, ow0, k0, r0, PAD, BLOCK_P, BLOCK_M)
        d1 = d0
        d2 = d0
        if TAPS > S:
            d1 = _wgrad_dy(dy_desc, n, ih0, ow0, k0, r0 + 1, PAD, BLOCK_P, BLOCK_M)
        if TAPS > 2 * S:
            d2 = _wgrad_dy(dy_desc, n, ih0, ow0, k0, r0 + 2, PAD, BLOCK_P, BLOCK_M)
        acc0 = _wgrad_tap(acc0, 0, d0, d1, d2, a0, a1, a2, S, INPUT_PRECISION)
        if TAPS > 1:
            acc1 = _wgrad_tap(acc1, 1, d0, d1, d2, a0, a1, a2, S, INPUT_PRECISION)
        if TAPS > 2:
            acc2 = _wgrad_tap(acc2, 2, d0, d1, d2, a0, a1, a2, S, INPUT_PRECISION)
        if TAPS > 3:
            acc3 = _wgrad_tap(acc3, 3, d0, d1, d2, a0, a1, a2, S, INPUT_PRECISION)
        if TAPS > 4:
            acc4 = _wgrad_tap(acc4, 4, d0, d1, d2, a0, a1, a2, S, INPUT_PRECISION)
        if TAPS > 5:
            acc5 = _wgrad_tap(acc5, 5, d0, d1, d2, a0, a1, a2, S, INPUT_PRECISION)
        if TAPS > 6:
            acc6 = _wgrad_tap(acc6, 6, d0, d1, d2, a0, a1, a2, S, INPUT_PRECISION)
        if TAPS > 7:
            acc7 = _wgrad_tap(acc7, 7, d0, d1, d2, a0, a1, a2, S, INPUT_PRECISION)
        if TAPS > 8:
            acc8 = _wgrad_tap(acc8, 8, d0, d1, d2, a0, a1, a2, S, INPUT_PRECISION)
        # the next rectangle, row-major over the images' tile grids: stepped, not divided out of
        # the rectangle index (sm_90, Triton 3.8, 3x3 64->64: 667 -> 598 instructions per iteration)
        ow0 += BLOCK_W
        row_done = (ow0 >= OW).to(tl.int32)
        ow0 -= row_done * ow0
        ih0 += row_done * BLOCK_H
        image_done = (ih0 >= H).to(tl.int32)
        ih0 -= image_done * ih0
        n += image_done

    RSC = R * S * C
    offs_k = k0 + tl.arange(0, BLOCK_M)
    k64 = offs_k.to(tl.int64)[:, None]
    tile_ok = (offs_k < K)[:, None] & c_ok[None, :]
    ws_tile = ws_ptr + split.to(tl.int64) * K * RSC + k64 * RSC + offs_c[None, :]
    _wgrad_store_tap(acc0, ws_tile, tap0, C, tile_ok)
    if TAPS > 1:
        _wgrad_store_tap(acc1, ws_tile, tap0 + 1, C, tile_ok)
    if TAPS > 2:
        _wgrad_store_tap(acc2, ws_tile, tap0 + 2, C, tile_ok)
    if TAPS > 3:
        _wgrad_store_tap(acc3, ws_tile, tap0 + 3, C, tile_ok)
    if TAPS > 4:
        _wgrad_store_tap(acc4, ws_tile, tap0 + 4, C, tile_ok)
    if TAPS > 5:
        _wgrad_store_tap(acc5, ws_tile, tap0 + 5, C, tile_ok)
    if TAPS > 6:
        _wgrad_store_tap(acc6, ws_tile, tap0 + 6, C, tile_ok)
    if TAPS > 7:
        _wgrad_store_tap(acc7, ws_tile, tap0 + 7, C, tile_ok)
    if TAPS > 8:
        _wgrad_store_tap(acc8, ws_tile, tap0 + 8, C, tile_ok)
    if TICKET:
        # the ordering argument of fusedres.ops.bn._last_ticket: every split's workspace tiles are
        # stored before its release, and read from L2 after the last split's acquire
        splits = tl.num_programs(2)
        if _last_ticket(counter_ptr + pid_m * tl.num_programs(1) + pid_n, splits):
            total = K * RSC
            for i in tl.static_range(TAPS):
                tap = tap0 + i
                r = tap // S
                s = tap - r * S
                ptrs = ws_ptr + k64 * RSC + tap * C + offs_c[None, :]
                red = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for _ in range(0, splits):  # split after split from zero, as _wgrad_reduce_block
                    red += tl.load(ptrs, mask=tile_ok, other=0.0, cache_modifier=".cg")
                    ptrs += total
                dw_ptrs = dw_ptr + k64 * swk + offs_c[None, :] * swc + r * swr + s * sws
                tl.store(dw_ptrs, red.to(dw_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def hopper_stats_merge_kernel(
    pmean_ptr, pm2_ptr, K, OH, OW, TILES_H, TILES_W, out_mean_ptr, out_m2_ptr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (n, c) merges image n's rectangle partials (mean, M2) into row n of the output
    partials (:func:`_merge_image`), the layout :func:`fusedres.ops.bn.bn_finalize` merges."""
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < K
    mean, m2 = _merge_image(pmean_ptr, pm2_ptr, n, K, OH, OW, TILES_H, TILES_W, offs_c, c_ok,
                            BLOCK_H, BLOCK_W, BLOCK_T)
    tl.store(out_mean_ptr + n * K + offs_c, mean, mask=c_ok)
    tl.store(out_m2_ptr + n * K + offs_c, m2, mask=c_ok)


def _launch_options(cfg: HopperConfig) -> dict[str, int]:
    """Triton's launch options for ``cfg``: warps, stages and, where the tile sets one, the cap on
    registers per thread (``maxnreg``; absent otherwise, so ptxas chooses as it always did)."""
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.max_regs:
        options["maxnreg"] = cfg.max_regs
    return options


def _tma_ready(t: torch.Tensor) -> bool:
    """Whether a channels_last tensor is what a descriptor reads: dense NHWC memory (strides then
    follow from the shape), 16-byte aligned address and rows of channels (TMA's rules)."""
    return (t.is_contiguous(memory_format=torch.channels_last) and t.data_ptr() % 16 == 0
            and t.shape[1] * t.element_size() % 16 == 0)


def unsupported(x: torch.Tensor, weight: torch.Tensor, *, stride: int, padding: int) -> str | None:
    """Why :func:`conv_fprop` cannot take this convolution (a reason the route reports), or None."""
    C = x.shape[1]
    K, _, R, S = weight.shape
    if x.dtype == torch.float32 and input_precision(x.dtype) == "ieee":
        return "fp32 without TF32 (torch.backends.cudnn.allow_tf32 is False): wgmma has no fp32 product"
    if not hopper_block_k(C, x.dtype):
        return f"Cin={C} is not a multiple of 16: no whole TMA box of channels per tap"
    if stride != 1 and (R, S, padding) != (1, 1, 0):
        return f"stride {stride} with a {R}x{S} kernel (padding {padding}): a TMA box reads a dense window"
    if not _tma_ready(x):
        return f"x is not dense channels_last at a 16-byte aligned address (strides {tuple(x.stride())})"
    if not _tma_ready(weight):
        return (f"weight is not dense channels_last (K-major) at a 16-byte aligned address "
                f"(strides {tuple(weight.stride())})")
    return None


def _pad_mask(cfg: HopperConfig, cin: int, epi_n: int) -> int:
    """The fprop's PAD_MASK for ``cfg`` (:func:`_fprop_loop`'s MASK). The fp32 min's branch keeps
    the tile's fp32 values live across it, so it takes at most 64 per thread (the 16x16-pixel,
    64-channel tile's 128 spilled next to its 128-register accumulator). Past that the pad
    value, whose branch keeps only the 32-bit words of x live, where its builds were found not
    to spill: one channel slice, two stages, the epilogue on all rows (the 64-channel 8x32 tile);
    else the select on the rounded tile at every tap (sm_90 builds with the pad value: over two
    slices the per-slice vectors and pad values spilled 128-152 bytes per thread on 3.8; the
    16x16 tile at three stages 4 bytes on 3.6)."""
    if cfg.block_h * cfg.block_w * cfg.block_k <= 64 * 32 * cfg.num_warps:
        return 2
    return 1 if cin == cfg.block_k and cfg.num_stages == 2 and epi_n == cfg.block_n else 3


def _epilogue_rows(cout: int, block_n: int) -> int:
    """The fprop epilogue's rows (``EPI_N``): 16 or 32 when ``cout`` fits in them and the tile has
    more (64 rows, the least a warpgroup's wgmma has), else the tile's ``block_n``."""
    for rows in (16, 32):
        if cout <= rows < block_n:
            return rows
    return block_n


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
    finalize: bn_ops.Finalize | None = None,
    config: HopperConfig | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, int] | bn_ops.Finalize | None]:
    """:func:`fusedres.ops.conv.conv_fprop` on the sm_90 engine (same arguments and results;
    the statistics partials are per image). With ``finalize`` (and ``stats``, and
    :data:`fusedres.ops.bn.TICKETS` on) the launch also finalizes the statistics into it and
    returns it, as the pointer engine does, except above TWO_LEVEL_TILES images (where
    :func:`fusedres.ops.bn.bn_finalize` merges chunks of images first): the per-image partials
    come back then. A ValueError when :func:`unsupported` names a reason."""
    reason = unsupported(x, weight, stride=stride, padding=padding)
    if reason is not None:
        raise ValueError(f"fusedres.ops.hopper.conv_fprop: {reason}")
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    OH, OW = conv_out_size(H, R, stride, padding), conv_out_size(W, S, stride, padding)
    cfg = config or hopper_fprop_config(C, K, R, stride, x.dtype)
    if C % cfg.block_k:
        raise ValueError(f"fusedres.ops.hopper.conv_fprop: Cin={C} is not a multiple of block_k={cfg.block_k}")
    if out is None:
        out = torch.empty((N, K, OH, OW), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    pixels(N, OH, OW)
    # NHWC memory as the descriptor sees it, strides from the shape (a size-1 dimension's stride
    # may be anything in a dense tensor); a strided 1x1 reads the strided view at stride 1.
    xh, xw = cdiv(H, stride), cdiv(W, stride)
    prologue = scale is not None
    # The kernel reads a 16-bit activation it transforms as uint32 pairs of channels (PAIRS).
    xv, pair = (x.permute(0, 2, 3, 1).view(torch.int32), 2) if prologue and x.element_size() == 2 else (x, 1)
    x_desc = TensorDescriptor(xv, [N, xh, xw, C // pair],
                              [H * W * C // pair, stride * W * C // pair, stride * C // pair, 1],
                              [1, cfg.block_h, cfg.block_w, cfg.block_k // pair])
    w_desc = TensorDescriptor(weight, [K, R * S * C], [R * S * C, 1], [cfg.block_n, cfg.block_k])
    tiles_h, tiles_w = cdiv(OH, cfg.block_h), cdiv(OW, cfg.block_w)
    tiles = N * tiles_h * tiles_w
    pmean = pm2 = out  # placeholders; never read when STATS is off
    if stats:
        pmean = torch.empty((tiles, K), device=x.device, dtype=torch.float32)
        pm2 = torch.empty_like(pmean)
    res = residual if residual is not None else out
    cols = cdiv(K, cfg.block_n)
    ticket = stats and finalize is not None and bn_ops.TICKETS and N <= TWO_LEVEL_TILES
    f_args: tuple = bn_ops.no_ticket_args(out)[0]
    if ticket:
        f = finalize
        if f.stats.stride() != (K, 1) or f.stats.shape[0] < 4:
            raise ValueError(f"fusedres: a stats buffer of shape {tuple(f.stats.shape)} and strides "
                             f"{f.stats.stride()}; expected (4, {K}) contiguous")
        imean = im2 = pmean
        if tiles_h * tiles_w > 1:
            imean = torch.empty((N, K), device=x.device, dtype=torch.float32)
            im2 = torch.empty_like(imean)
        rm_out, rv_out = f.running_out if f.running_out is not None else (f.running_mean, f.running_var)
        s = f.stats

        def given(t: torch.Tensor | None) -> torch.Tensor:
            return t if t is not None else s

        f_args = (bn_ops.ticket_counters(x.device, cols * (N + 1)), imean, im2, given(f.weight), given(f.bias),
                  given(f.running_mean), given(f.running_var), given(rm_out), given(rv_out),
                  f.batches if f.batches is not None else bn_ops.batch_sink(x.device), s,
                  float(f.momentum), float(f.eps))
    launch(
        hopper_fprop_kernel, (tiles, cols),
        x_desc, w_desc, out, res,
        scale if prologue else out, shift if prologue else out,
        out_shift if out_shift is not None else out,
        pmean, pm2,
        xh, xw, OH, OW, K, tiles_h, tiles_w,
        *out.stride(),
        *res.stride(),
        *f_args,
        NUM_C=C // cfg.block_k, PAD=padding, R=R, S=S,
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, STATS=stats,
        OUT_SHIFT=out_shift is not None, OUT_RELU=out_relu,
        INPUT_PRECISION=input_precision(x.dtype),
        TICKET=ticket, UPDATE_RUNNING=ticket and finalize.running_mean is not None,
        HAS_WEIGHT=ticket and finalize.weight is not None, HAS_BIAS=ticket and finalize.bias is not None,
        BLOCK_T=FINALIZE_BLOCK_T,
        PAD_MASK=_pad_mask(cfg, C, _epilogue_rows(K, cfg.block_n)),
        BLOCK_H=cfg.block_h, BLOCK_W=cfg.block_w, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EPI_N=_epilogue_rows(K, cfg.block_n),
        **_launch_options(cfg),
    )
    if not stats:
        return out, None
    if ticket:
        return out, finalize
    if tiles_h * tiles_w == 1:  # one rectangle per image: its partials are the image's
        return out, (pmean, pm2, OH * OW)
    merged_mean = torch.empty((N, K), device=x.device, dtype=torch.float32)
    merged_m2 = torch.empty_like(merged_mean)
    launch(
        hopper_stats_merge_kernel, (N, cdiv(K, FINALIZE_BLOCK_C)),
        pmean, pm2, K, OH, OW, tiles_h, tiles_w, merged_mean, merged_m2,
        BLOCK_H=cfg.block_h, BLOCK_W=cfg.block_w, BLOCK_T=FINALIZE_BLOCK_T, BLOCK_C=FINALIZE_BLOCK_C,
    )
    return out, (merged_mean, merged_m2, OH * OW)


def _flip_transpose(weight: torch.Tensor) -> torch.Tensor:
    return weight.permute(1, 2, 3, 0).flip(1, 2).contiguous()


def dgrad_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (Cin, R, S, Cout) contiguous copy of ``weight`` (Cout, Cin, R, S) with the taps flipped,
    wf[c, r, s, k] = w[k, c, R-1-r, S-1-s]: the K-major [Cin, R*S*Cout] matrix the dgrad's weight
    descriptor reads. Cached per parameter version (:func:`fusedres.ops.weights.cached_layout`)."""
    return cached_layout(weight, "hopper_dgrad", _flip_transpose)


def unsupported_dgrad(dy: torch.Tensor, weight: torch.Tensor, *, stride: int, padding: int) -> str | None:
    """Why :func:`conv_dgrad` cannot take this input gradient (a reason the route reports), or None."""
    K = dy.shape[1]
    if stride != 1:
        return f"stride {stride}: the pointer engine's dgrad by input parity takes it"
    if dy.dtype == torch.float32 and input_precision(dy.dtype) == "ieee":
        return "fp32 without TF32 (torch.backends.cudnn.allow_tf32 is False): wgmma has no fp32 product"
    if not hopper_block_k(K, dy.dtype):
        return f"Cout={K} is not a multiple of 16: no whole TMA box of dy channels per tap"
    if not _tma_ready(dy):
        return f"dy is not dense channels_last at a 16-byte aligned address (strides {tuple(dy.stride())})"
    return None


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
    config: HopperConfig | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | bn_ops.Sums | None]:
    """:func:`fusedres.ops.conv.conv_dgrad` on the sm_90 engine (same arguments and results; the
    partial sums are per pixel rectangle, one row each, and ``reduce_sums`` reduces them in the
    launch as there). A ValueError when :func:`unsupported_dgrad` names a reason."""
    reason = unsupported_dgrad(dy, weight, stride=stride, padding=padding)
    if reason is not None:
        raise ValueError(f"fusedres.ops.hopper.conv_dgrad: {reason}")
    N, C, H, W = input_shape
    K, _, R, S = weight.shape
    _, _, OH, OW = dy.shape
    cfg = config or hopper_dgrad_config(C, K, R, stride, dy.dtype)
    if K % cfg.block_k:
        raise ValueError(f"fusedres.ops.hopper.conv_dgrad: Cout={K} is not a multiple of block_k={cfg.block_k}")
    dz = torch.empty((N, C, H, W), device=dy.device, dtype=dy.dtype, memory_format=torch.channels_last)
    pixels(N, H, W)
    wf = dgrad_weight(weight)
    dy_desc = TensorDescriptor(dy, [N, OH, OW, K], [OH * OW * K, OW * K, K, 1],
                               [1, cfg.block_h, cfg.block_w, cfg.block_k])
    w_desc = TensorDescriptor(wf, [C, R * S * K], [R * S * K, 1], [cfg.block_n, cfg.block_k])
    tiles_h, tiles_w = cdiv(H, cfg.block_h), cdiv(W, cfg.block_w)
    grid = (N * tiles_h * tiles_w, cdiv(C, cfg.block_n))
    sums = None
    t_args, t_flags = (dz,) * 5, dict(TICKET=False, TWO_LEVEL=False, BLOCK_T=FINALIZE_BLOCK_T)
    if bn is not None:
        x, scale, shift, mean, invstd = bn
        psum = torch.empty((grid[0], C), device=dy.device, dtype=torch.float32)
        psumx = torch.empty_like(psum)
        sums = (psum, psumx)
        if reduce_sums and bn_ops.TICKETS:
            sums, t_args, t_flags = bn_ops.sums_ticket_args(grid[0], grid[1], C, dy.device)
    else:
        x = dz
        scale = shift = mean = invstd = psum = psumx = dz
    a = add if add is not None else dz
    epi_n = _epilogue_rows(C, cfg.block_n)
    # The lighter BatchNorm-backward epilogue (_dgrad_bn_bwd_pairs): every channel of every column
    # block real, x and add 16-bit with dz's strides (channels_last dense) at 4-byte aligned addresses.
    pairs = (bn is not None and dy.element_size() == 2 and C % epi_n == 0
             and all(t.dtype == dz.dtype and t.stride() == dz.stride() and t.data_ptr() % 4 == 0 for t in (x, a)))
    x_strides, a_strides = x.stride(), a.stride()
    if pairs:
        x, a = (t.permute(0, 2, 3, 1).view(torch.int32) for t in (x, a))
    launch(
        hopper_dgrad_kernel, grid,
        dy_desc, w_desc, dz, x, a, scale, shift, mean, invstd, psum, psumx,
        H, W, C, tiles_h, tiles_w,
        *dz.stride(),
        *x_strides,
        *a_strides,
        *t_args,
        NUM_K=K // cfg.block_k, PAD_H=R - 1 - padding, PAD_W=S - 1 - padding, R=R, S=S,
        BN_BWD=bn is not None, HAS_ADD=add is not None, INPUT_PRECISION=input_precision(dy.dtype), **t_flags,
        BLOCK_H=cfg.block_h, BLOCK_W=cfg.block_w, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EPI_N=epi_n, PAIRS=pairs,
        **_launch_options(cfg),
    )
    return dz, sums


def unsupported_wgrad(dy: torch.Tensor, x: torch.Tensor, weight_like: torch.Tensor, *, stride: int,
                      padding: int) -> str | None:
    """Why :func:`conv_wgrad` cannot take this weight gradient (a reason the route reports), or None."""
    _, _, R, S = weight_like.shape
    if stride != 1 and (R, S, padding) != (1, 1, 0):
        return f"stride {stride} with a {R}x{S} kernel (padding {padding}): a TMA box reads a dense window"
    if R > 3 or S > 3:
        return (f"a {R}x{S} kernel: more than 3 filter rows or columns (one dy box per row, one activation box "
                f"per column)")
    if x.dtype == torch.float32 and input_precision(x.dtype) == "ieee":
        return "fp32 without TF32 (torch.backends.cudnn.allow_tf32 is False): wgmma has no fp32 product"
    if dy.dtype != x.dtype:
        return f"dy is {dy.dtype} and x {x.dtype}: one wgmma operand type"
    if not _tma_ready(dy):
        return (f"dy is not dense channels_last at a 16-byte aligned address with 16-byte rows of channels "
                f"(Cout={dy.shape[1]}, strides {tuple(dy.stride())})")
    if not _tma_ready(x):
        return (f"x is not dense channels_last at a 16-byte aligned address with 16-byte rows of channels "
                f"(Cin={x.shape[1]}, strides {tuple(x.stride())})")
    return None


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
    config: HopperWgradConfig | None = None,
    defer_reduce: bool = False,
) -> torch.Tensor | PendingWgrad:
    """:func:`fusedres.ops.conv.conv_wgrad` on the sm_90 engine: the same arguments, results and
    workspace (fp32 (splits, K, R, S, C)), so that without the ticket (or with ``defer_reduce`` and
    the ticket off) the same :class:`~fusedres.ops.conv.PendingWgrad` comes back. ``splits``
    counts pixel-rectangle ranges. A ValueError when :func:`unsupported_wgrad` names a reason."""
    reason = unsupported_wgrad(dy, x, weight_like, stride=stride, padding=padding)
    if reason is not None:
        raise ValueError(f"fusedres.ops.hopper.conv_wgrad: {reason}")
    N, C, H, W = x.shape
    K, _, R, S = weight_like.shape
    _, _, OH, OW = dy.shape
    cfg = config or hopper_wgrad_config(C, K, R, stride, x.dtype)
    if (R * S) % cfg.taps or cfg.taps % S:
        raise ValueError(f"fusedres.ops.hopper.conv_wgrad: taps={cfg.taps} is not a whole number of the {R}x{S} "
                         f"kernel's filter rows")
    pixels(N, OH, OW)
    # A strided 1x1 reads the strided view of x at stride 1 (as the fprop engine).
    xh, xw = cdiv(H, stride), cdiv(W, stride)
    # Rectangles of x rows by dy columns: the kernel shifts dy by filter rows, x by filter columns.
    tiles_h, tiles_w = cdiv(xh, cfg.block_h), cdiv(OW, cfg.block_w)
    rects = N * tiles_h * tiles_w
    grid01 = cdiv(K, cfg.block_m) * cdiv(C, cfg.block_n) * (R * S // cfg.taps)
    if splits is None:
        splits = max(1, min(cdiv(2 * sm_count(x.device), grid01), cdiv(rects, 4)))
    per_split = cdiv(rects, splits)
    splits = cdiv(rects, per_split)
    # With the prologue a 16-bit x is read through its uint32 view (channel pairs; PAIRS).
    pairs = scale is not None and x.element_size() == 2
    xv, pair = (x.permute(0, 2, 3, 1).view(torch.int32), 2) if pairs else (x, 1)
    x_desc = TensorDescriptor(xv, [N, xh, xw, C // pair],
                              [H * W * C // pair, stride * W * C // pair, stride * C // pair, 1],
                              [1, cfg.block_h, cfg.block_w, cfg.block_n // pair])
    dy_desc = TensorDescriptor(dy, [N, OH, OW, K], [OH * OW * K, OW * K, K, 1],
                               [1, cfg.block_h, cfg.block_w, cfg.block_m])
    ws = torch.empty((splits, K, R, S, C), device=x.device, dtype=torch.float32)
    dw = torch.empty_like(weight_like)
    ticket = bn_ops.TICKETS
    grid = (cdiv(K, cfg.block_m), cdiv(C, cfg.block_n) * (R * S // cfg.taps), splits)
    counters = bn_ops.ticket_counters(x.device, grid[0] * grid[1]) if ticket else ws
    prologue = scale is not None
    launch(
        hopper_wgrad_kernel, grid,
        dy_desc, x_desc, scale if prologue else ws, shift if prologue else ws, ws, counters, dw,
        xh, xw, OW, C, K, tiles_h, tiles_w, rects, per_split,
        *dw.stride(),
        R=R, S=S, PAD=padding, TAPS=cfg.taps,
        PROLOGUE=prologue, INPUT_PRECISION=input_precision(x.dtype), TICKET=ticket,
        BLOCK_H=cfg.block_h, BLOCK_W=cfg.block_w, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAIRS=pairs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if ticket:
        return dw
    pending = PendingWgrad(ws, dw, splits, S)
    return pending if defer_reduce else pending.finish()
