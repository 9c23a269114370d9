"""Tile configurations of the convolution kernels, in one place.

A configuration is chosen from the channel counts, kernel size and dtype only — never
from the batch or image size — so a new image size never picks a new kernel. Every
configuration the choosers can return is listed by :func:`all_conv_configs`, and the
offline-compile test builds each of them for every supported GPU architecture.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConvConfig:
    """Tile sizes of one implicit-GEMM launch (GEMM M × N, reduce K)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class RowConfig:
    """Tile of the per-channel kernels: BLOCK_M pixels × BLOCK_C channels."""

    block_m: int
    block_c: int
    num_warps: int


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _gemm_config(gemm_n: int, reduce_c: int, dtype: torch.dtype) -> ConvConfig:
    """Tile for a GEMM whose N dimension is ``gemm_n`` channels and whose K is built of
    ``reduce_c``-channel slices (times the kernel taps)."""
    wide = dtype == torch.float32
    block_n = _pow2_clamp(gemm_n, 16, 64 if wide else 128)
    block_k = _pow2_clamp(reduce_c, 16, 32 if wide else 64)
    # fp32 tiles hold twice the registers: 128x128 (and 128x64 on sm_80) spilled; 64-row tiles don't.
    block_m = 64 if wide else 128
    # 128x64 tiles at 4 warps spill on sm_80-89 (255 registers: the prologue's address math).
    num_warps = 8 if (block_n >= 64 and not wide) else 4
    # fp32 tiles take twice the shared memory: two stages keep sm_86/sm_89 (99 KB) in reach.
    num_stages = 2 if (wide and block_n >= 64) else 3
    return ConvConfig(block_m, block_n, block_k, num_warps, num_stages)


@functools.cache  # called per launch: a lookup instead of a new dataclass
def fprop_config(cin: int, cout: int, ksize: int, stride: int, dtype: torch.dtype) -> ConvConfig:
    """Output pixels × Cout, reduced over taps × Cin."""
    return _gemm_config(cout, cin, dtype)


@functools.cache  # called per launch: a lookup instead of a new dataclass
def dgrad_config(cin: int, cout: int, ksize: int, stride: int, dtype: torch.dtype) -> ConvConfig:
    """Input pixels × Cin, reduced over taps × Cout."""
    return _gemm_config(cin, cout, dtype)


@functools.cache  # called per launch: a lookup instead of a new dataclass
def wgrad_config(cin: int, cout: int, ksize: int, stride: int, dtype: torch.dtype) -> ConvConfig:
    """Cout × Cin per tap, reduced over output pixels."""
    wide = dtype == torch.float32
    block_m = _pow2_clamp(cout, 16, 64)
    block_n = _pow2_clamp(cin, 16, 64)
    block_k = 32 if wide else 64
    num_warps = 4
    return ConvConfig(block_m, block_n, block_k, num_warps, 2 if wide else 3)


STATS_CONFIG = RowConfig(block_m=128, block_c=32, num_warps=4)
APPLY_CONFIG = RowConfig(block_m=64, block_c=32, num_warps=4)
FINALIZE_BLOCK_T = 64
FINALIZE_BLOCK_C = 32
#: Above this many partial tiles, finalize and the backward sums reduce in two levels (chunks of
#: FINALIZE_BLOCK_T tiles in parallel, then the chunks) instead of one serial loop per channel block.
TWO_LEVEL_TILES = 4 * FINALIZE_BLOCK_T

_CHANNELS = (3, 16, 32, 64, 128, 256, 512)


def all_conv_configs() -> dict[str, set[tuple[ConvConfig, torch.dtype]]]:
    """Every (config, dtype) the choosers above can return, per kernel role."""
    out: dict[str, set[tuple[ConvConfig, torch.dtype]]] = {"fprop": set(), "dgrad": set(), "wgrad": set()}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for cin in _CHANNELS:
            for cout in _CHANNELS:
                out["fprop"].add((fprop_config(cin, cout, 3, 1, dtype), dtype))
                out["dgrad"].add((dgrad_config(cin, cout, 3, 1, dtype), dtype))
                out["wgrad"].add((wgrad_config(cin, cout, 3, 1, dtype), dtype))
    return out


@dataclass(frozen=True)
class HopperConfig:
    """Tile of the sm_90 (TMA + wgmma) convolution engine, :mod:`fusedres.ops.hopper`: a
    ``block_h`` x ``block_w`` rectangle of output pixels (one TMA box per filter tap) by
    ``block_n`` output channels, reduced in ``block_k``-channel slices; ``max_regs``, when not 0,
    caps the registers per thread (ptxas ``.maxnreg``) so that a given number of CTAs fits per SM."""

    block_h: int
    block_w: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    max_regs: int = 0


def hopper_block_k(cin: int, dtype: torch.dtype) -> int:
    """The channel slice of one TMA box: the largest power of two up to 64 (32 for fp32, whose
    tiles take twice the shared memory) that divides ``cin``, so that no box reaches past a tap's
    channels into the next tap's weights. 0 when that is under 16 (no tensor-core K step)."""
    top = 32 if dtype == torch.float32 else 64
    k = top
    while k >= 16 and cin % k:
        k //= 2
    return k if k >= 16 else 0


@functools.cache  # called per launch: a lookup instead of a new dataclass
def hopper_fprop_config(cin: int, cout: int, ksize: int, stride: int, dtype: torch.dtype) -> HopperConfig:
    """Output channels (wgmma's M: 64 per warpgroup, rows past Cout zero-filled by the copy
    engine) x a pixel rectangle (wgmma's N), reduced over taps x Cin.

    From the sm_90 SASS (benchmarks/NOTES.md section 3): Cout >= 128 takes two warpgroups that
    share one transformed activation tile (80 instructions per HGMMA.64x128); Cout 64 one; Cout
    <= 32 (the padded rows cost tensor cycles, not instructions) a 16x16 rectangle, HGMMA.64x256,
    so that the per-iteration cost of the copies and barriers is spread over twice the pixels
    (16-bit only: in fp32 that tile spills, 140 bytes per thread).
    512 channels come in 7x7 images in ResNets: an 8x8 rectangle covers 49 of 64 pixels where
    8x16 would cover 49 of 128. Where Cin is a multiple of 64 (16-bit: 64-channel slices) that
    rectangle takes 256 output channels: each warpgroup issues two HGMMA.64x64 per K step
    against the same transformed activation tile, so the per-iteration work (TMA issue,
    barriers, the BN-ReLU transform) feeds 8 HGMMAs instead of 4: 204/214 instructions per
    iteration at 7x7 (Triton 3.8/3.6) where 128 channels took 201/211 for 4 (issue cap 125%/120%
    instead of 64%/61%). Two stages (81 KB of shared memory; a third 32 KB weight box makes 121
    KB: one CTA per SM) and at most 128 registers (147/130 at images of several rectangles,
    taken by the epilogue's addresses; capped: no spill, the same loop) keep two CTAs per SM.
    fp32 (TF32) keeps 128 channels: 256 held 185-190 registers. The 16-bit 3x3 128-channel tile is
    capped at 128 registers too (3.8: 142, 163 with the statistics ticket, at 28x28: one CTA per
    SM; capped: no spill, the same loop, the ticket's 293 -> 301 instructions per iteration); not
    fp32, whose 8x16 tile then spills 316 bytes per thread, nor a 1x1 (4-8 bytes of spill at
    stride 2 and with the ticket).
    A 16-bit 1x1 with at most 32 input channels and Cout >= 128 (the CIFAR bottleneck's 1x1
    32->128) has one K step and no loop: the ~500 instructions of address arithmetic, barriers and
    copy setup before its HGMMA are paid per tile, so it takes a 16x16 rectangle on one
    warpgroup (64 rows, Cout / 64 programs per rectangle; HGMMA.64x256): 128 output elements per
    thread instead of the 8x16 x 128 tile's 64. sm_90 SASS, 1x1 32->128 bf16 with every fusion,
    Triton 3.8 / 3.6: 17.0 / 16.8 instructions per output element (the 8x16 x 128 tile: 19.6 /
    19.8), 225 / 221 registers x 128 threads: two CTAs per SM, no spill, 22 KB. On two
    warpgroups (128 rows) that rectangle takes 225 / 221 registers x 256 threads (one CTA per SM);
    capped at 168 it spills 528 bytes, at 128 ptxas refuses it (154 needed).
    A 16-bit 3x3 with 33-64 output channels and at most 64 input ones takes an 8x32 rectangle
    (HGMMA.64x256, two stages: 80 KB, 255 registers, two CTAs per SM): a program with one m64
    warpgroup spends 4 tensor cycles per activation element it transforms whatever the
    rectangle, so only a wider one spreads the per-iteration copies, barriers and bookkeeping
    (~110 instructions per thread) over more of them. With the padding mask by a pad value
    (``hopper._pad_value``) a tap that needs it takes at best 344 instructions for 4 HGMMA.64x128
    at 8x16 (74%), 562 / 564 for 4 HGMMA.64x256 at 8x32 (91%; Triton 3.8 / 3.6). Its overhang at images
    narrower than 32 (8x8: 1/4 of the pixels computed are stored, 1/2 at 8x16) is the price. Over
    two channel slices the pad value spilled (see ``hopper.conv_fprop``): 8x16 there."""
    block_k = hopper_block_k(cin, dtype)
    wide = dtype == torch.float32
    if ksize == 1 and cin <= 32 and cout >= 128 and not wide:
        return HopperConfig(16, 16, 64, block_k, 4, 2)
    if 32 < cout <= 64 and ksize == 3 and cin <= 64 and dtype != torch.float32:
        return HopperConfig(8, 32, 64, hopper_block_k(cin, dtype), 4, 2)
    return _hopper_tile(cin, cout, ksize, dtype)


def _hopper_tile(cin: int, cout: int, ksize: int, dtype: torch.dtype) -> HopperConfig:
    """:func:`hopper_fprop_config` but for its one-K-step 1x1 rule and its 3x3 64-channel rectangle:
    the dgrad's tile (:func:`hopper_dgrad_config`) for the same channel counts."""
    block_k = hopper_block_k(cin, dtype)
    wide = dtype == torch.float32
    if cout <= 32 and not wide:
        return HopperConfig(16, 16, 64, block_k, 4, 3)
    if cout <= 64:
        return HopperConfig(8, 16, 64, block_k, 4, 3)
    if cout >= 512 and block_k == 64:
        return HopperConfig(8, 8, 256, block_k, 8, 2, max_regs=128)
    return HopperConfig(8, 8 if cout >= 512 else 16, 128, block_k, 8, 3, max_regs=128 if ksize == 3 and not wide else 0)


@functools.cache  # called per launch: a lookup instead of a new dataclass
def hopper_dgrad_config(cin: int, cout: int, ksize: int, stride: int, dtype: torch.dtype) -> HopperConfig:
    """Input channels (wgmma's M, rows past Cin zero-filled) x a rectangle of input pixels,
    reduced over taps x Cout: the stride-1 dgrad is the fprop of dy (Cout channels in) with the
    flipped weight (Cin channels out), so it takes :func:`hopper_fprop_config`'s tile for that
    convolution (``block_k`` from Cout; not its one-K-step 1x1 rule for Cin >= 128: the 1x1
    128->32 dgrad's BatchNorm-backward epilogue on that 16x16 x 64 tile held 255 registers and
    spilled 732 bytes per thread, sm_90, bf16, 3.8), the 16x16 rectangle for Cin <= 32 included: its
    BatchNorm-backward epilogue runs on the accumulator's 16 or 32 real rows (``EPI_N``), 162-236
    registers and no spill (sm_90, bf16, Triton 3.8 / 3.6; on all 64 rows that tile held 255 and
    spilled 704-1004 bytes per thread). That rectangle with 64-channel slices (Cout >= 64) takes two
    stages: three buffers of 16x16 x 64 dy and 64 x 64 weights are 120 KB, one CTA per SM.
    Not the fprop's 256-row tile for Cin >= 512: that one amortizes the activation transform of
    the fprop's prologue, which the dgrad does not have (its loop at 128 rows is already 24-25
    instructions per HGMMA.64x64), so it keeps 128 rows in three stages. Nor the fprop's register
    cap: the BatchNorm-backward epilogue holds 186-209 registers (sm_90, 3.8); for the same reason
    the 8x16 rectangle takes 64 rows on 4 warps where the fprop takes 128 on 8 (two CTAs per SM).
    Those counts are with :func:`fusedres.ops.conv.dgrad_epilogue`; the 16-bit layers whose Cin
    fills the tile now take :func:`fusedres.ops.hopper._dgrad_bn_bwd_pairs`, at 156-172 registers
    for the CIFAR shapes and 158 / 163 for 3x3 64->64 (sm_90, bf16, 3.8 / 3.6): whether 128 rows on
    8 warps now fit two CTAs per SM was not measured."""
    cfg = dataclasses.replace(_hopper_tile(cout, cin, ksize, dtype), max_regs=0)
    if cfg.block_n > 128:
        return HopperConfig(cfg.block_h, cfg.block_w, 128, cfg.block_k, cfg.num_warps, 3)
    if cfg.block_n == 128 and cfg.block_h * cfg.block_w == 128:
        # 8 warps x 186 / 253 registers (3.8 / 3.6) at 128 rows: one CTA per SM; 64 rows on 4 warps
        # hold the same loop at two (each dy box then read once per 64 input channels, from L2)
        return HopperConfig(cfg.block_h, cfg.block_w, 64, cfg.block_k, 4, cfg.num_stages)
    if cfg.block_h * cfg.block_w * cfg.block_k > 16 * 16 * 32:
        return HopperConfig(cfg.block_h, cfg.block_w, cfg.block_n, cfg.block_k, cfg.num_warps, 2)
    return cfg


def all_hopper_configs() -> set[tuple[HopperConfig, torch.dtype]]:
    """Every (config, dtype) :func:`hopper_fprop_config` can return for a channel count the engine takes."""
    return {
        (hopper_fprop_config(cin, cout, 3, 1, dtype), dtype)
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
        for cin in _CHANNELS
        for cout in _CHANNELS
        if hopper_block_k(cin, dtype)
    }


@dataclass(frozen=True)
class HopperWgradConfig:
    """Tile of the sm_90 weight gradient (:func:`fusedres.ops.hopper.conv_wgrad`): ``block_m``
    output channels (wgmma's M; dy rows past Cout zero-filled) x ``block_n`` input channels x
    ``taps`` filter taps (whole filter rows, one accumulator each), reduced over rectangles of
    ``block_h`` x rows by ``block_w`` dy columns (wgmma's K: per rectangle one dy box per filter row
    and one activation box per filter column serve the ``taps``)."""

    block_h: int
    block_w: int
    block_m: int
    block_n: int
    taps: int
    num_warps: int
    num_stages: int


@functools.cache  # called per launch: a lookup instead of a new dataclass
def hopper_wgrad_config(cin: int, cout: int, ksize: int, stride: int, dtype: torch.dtype) -> HopperWgradConfig:
    """All R*S taps per program: R*S accumulators of 64 x block_n fp32 on one warpgroup (3x3: 9 x
    64 x 32 / 128 threads = 144 registers), fed per 8x8 rectangle by 3 dy boxes (one per filter row,
    8 KB each in bf16) and 3 activation boxes (one per filter column, 4 KB), two buffers each at
    three stages: 72 KB. sm_90 SASS (benchmarks/NOTES.md section 3), 3x3 Cin 32 x Cout 64, Triton
    3.8 / 3.6: 598 / 553 instructions per 36 HGMMA.64x32x16 (issue cap 96% / 104%), 254 / 231
    registers and 111 / 86 KB of shared memory (3.8 restages each dy box through registers for
    wgmma's A): 2 CTAs/SM. Every Cout takes that tile (Cout / 64 programs per Cin block): two
    warpgroups sharing each transformed activation tile (Cout 128 per CTA: 14.2 / 12.8 instructions
    per HGMMA) held 8 warps x 255 / 238 registers, one CTA per SM, where 64 rows at 96% already
    meet the loop's target at two (the GPU may still prefer the wider tile: it transforms each
    activation half as often). A 1x1 kernel has one accumulator: up to 64 input channels, an 8x16
    rectangle."""
    if ksize == 1:
        return HopperWgradConfig(8, 16, 64, _pow2_clamp(cin, 16, 64), 1, 4, 3)
    # fp32 (TF32) at 32 input channels: 255 registers, 68 bytes of spill and 200 KB (sm_90, 3.8).
    block_n = _pow2_clamp(cin, 16, 16 if dtype == torch.float32 else 32)
    return HopperWgradConfig(8, 8, 64, block_n, ksize * ksize, 4, 3)
