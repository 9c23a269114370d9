#!/usr/bin/env python3
"""The sm_90 engine on a GPU: same results as the pointer engine, and its time beside the
pointer engine's and cuDNN's, for fprop (the cuDNN route: BN-ReLU pass + conv + statistics pass)
the stride-1 dgrad (the cuDNN route: conv backward + BN-ReLU-backward pass) and the wgrad (the
cuDNN route: BN-ReLU pass + conv backward).

    python3 scripts/hopper_fprop_bench.py [reps] [fprop|dgrad|wgrad|both|all]

("both" = fprop and dgrad, "all" = the three.)

Shapes: DESIGN.md section 5 (bf16, N=256) and the CIFAR bottleneck's three convolutions (N=128,
32x32), each fused and plain. Fused fprop: BN-ReLU prologue, statistics of the output, + residual
where the block has one; fused dgrad: the BatchNorm-ReLU backward (mask from x, dz, the sums
reduced in the launch); fused wgrad: the BN-ReLU recomputed, the splits merged in the launch.
Prints one line per shape and role: relative difference against the
pointer engine (output, and the statistics or sums; MISMATCH above 2e-2 fails the run), median
microseconds of each engine (triton.testing.do_bench), and the engine ``FUSEDRES_CONV_ENGINE=auto``
picks.
"""

from __future__ import annotations

import sys

import torch
import triton

from fusedres.ops import configs, conv, hopper, route

SHAPES = [  # (label, N, Cin, Cout, H, ksize, residual)
    ("3x3 64->64 56^2", 256, 64, 64, 56, 3, True),
    ("3x3 128 28^2", 256, 128, 128, 28, 3, True),
    ("3x3 512 7^2", 256, 512, 512, 7, 3, True),
    ("1x1 64->16 32^2", 128, 64, 16, 32, 1, False),
    ("3x3 16->16 32^2", 128, 16, 16, 32, 3, False),
    ("1x1 16->64 32^2", 128, 16, 64, 32, 1, True),
    # the second CIFAR stage: the 1x1 32->128 fprop's one-warpgroup 16x16 tile, the pair epilogue
    ("1x1 128->32 16^2", 128, 128, 32, 16, 1, False),
    ("3x3 32->32 16^2", 128, 32, 32, 16, 3, False),
    ("1x1 32->128 16^2", 128, 32, 128, 16, 1, True),
]


def _time(fn, x: torch.Tensor, w: torch.Tensor, kw: dict, reps: int) -> float:
    """Median milliseconds of ``fn(x, w, **kw)``."""
    return triton.testing.do_bench(lambda: fn(x, w, **kw), rep=reps)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def dgrad(reps: int, dev: torch.device) -> int:
    """The stride-1 dgrad rows; returns the number of mismatches."""
    cl = torch.channels_last
    bad = 0
    for label, n, cin, cout, h, k, _ in SHAPES:
        x = torch.randn(n, cin, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=cl)
        dy = torch.randn(n, cout, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=cl)
        w = (torch.randn(cout, cin, k, k, device=dev, dtype=torch.bfloat16) * 0.05).contiguous(memory_format=cl)
        sc, sh = torch.rand(cin, device=dev) + 0.5, torch.randn(cin, device=dev) * 0.3
        mean, invstd = x.float().mean((0, 2, 3)), x.float().var((0, 2, 3)).add(1e-5).rsqrt()
        shape = tuple(x.shape)
        for fused in (True, False):
            kw = dict(stride=1, padding=k // 2)
            if fused:
                kw.update(bn=(x, sc, sh, mean, invstd), reduce_sums=True)
            dh, sums_h = hopper.conv_dgrad(dy, w, shape, **kw)
            dp, sums_p = conv.conv_dgrad(dy, w, shape, **kw)
            diff = _rel(dh, dp)
            if fused:  # both reduced in the launch (Sums)
                diff = max(diff, _rel(sums_h[0], sums_p[0]), _rel(sums_h[1], sums_p[1]))
            ok = diff < 2e-2
            bad += not ok
            kw["input_shape"] = shape
            with route.force("cudnn"):
                t_cudnn = _time(route.conv_dgrad, dy, w, kw, reps)
            t_h = _time(hopper.conv_dgrad, dy, w, kw, reps)
            t_p = _time(conv.conv_dgrad, dy, w, kw, reps)
            picks = "pointer" if hopper.unsupported_dgrad(dy, w, stride=1, padding=k // 2) else "hopper"
            print(f"dgrad {label:18s} {'fused' if fused else 'plain'}  diff {diff:.1e} {'ok' if ok else 'MISMATCH'}  "
                  f"hopper {1e3 * t_h:8.1f} us  pointer {1e3 * t_p:8.1f} us  cudnn-route {1e3 * t_cudnn:8.1f} us  "
                  f"auto picks {picks}", flush=True)
    return bad


def wgrad(reps: int, dev: torch.device) -> int:
    """The wgrad rows (stride 1); returns the number of mismatches. The two engines split and sum
    the pixels in different orders: equal within rounding, not bitwise."""
    cl = torch.channels_last
    bad = 0
    for label, n, cin, cout, h, k, _ in SHAPES:
        x = torch.randn(n, cin, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=cl)
        dy = torch.randn(n, cout, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=cl)
        w = torch.empty(cout, cin, k, k, device=dev, dtype=torch.bfloat16).contiguous(memory_format=cl)
        sc, sh = torch.rand(cin, device=dev) + 0.5, torch.randn(cin, device=dev) * 0.3
        for fused in (True, False):
            kw = dict(stride=1, padding=k // 2, weight_like=w)
            if fused:
                kw.update(scale=sc, shift=sh)
            dw_h = hopper.conv_wgrad(dy, x, **kw)
            again = hopper.conv_wgrad(dy, x, **kw)
            dw_p = conv.conv_wgrad(dy, x, **kw)
            diff = _rel(dw_h, dw_p)
            ok = diff < 2e-2 and torch.equal(dw_h, again)
            bad += not ok
            with route.force("cudnn"):
                t_cudnn = _time(route.conv_wgrad, dy, x, kw, reps)
            t_h = _time(hopper.conv_wgrad, dy, x, kw, reps)
            t_p = _time(conv.conv_wgrad, dy, x, kw, reps)
            picks = "pointer" if hopper.unsupported_wgrad(dy, x, w, stride=1, padding=k // 2) else "hopper"
            print(f"wgrad {label:18s} {'fused' if fused else 'plain'}  diff {diff:.1e} {'ok' if ok else 'MISMATCH'}  "
                  f"hopper {1e3 * t_h:8.1f} us  pointer {1e3 * t_p:8.1f} us  cudnn-route {1e3 * t_cudnn:8.1f} us  "
                  f"auto picks {picks}", flush=True)
    return bad


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    roles = sys.argv[2] if len(sys.argv) > 2 else "both"
    if roles not in ("fprop", "dgrad", "wgrad", "both", "all"):
        raise SystemExit(f"role must be fprop, dgrad, wgrad, both or all, got {roles!r}")
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}")
    bad = fprop(reps, dev) if roles in ("fprop", "both", "all") else 0
    if roles in ("dgrad", "both", "all"):
        bad += dgrad(reps, dev)
    if roles in ("wgrad", "all"):
        bad += wgrad(reps, dev)
    return 1 if bad else 0


def fprop(reps: int, dev: torch.device) -> int:
    """The fprop rows; returns the number of mismatches."""
    cl = torch.channels_last
    bad = 0
    for label, n, cin, cout, h, k, has_res in SHAPES:
        x = torch.randn(n, cin, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=cl)
        w = (torch.randn(cout, cin, k, k, device=dev, dtype=torch.bfloat16) * 0.05).contiguous(memory_format=cl)
        sc, sh = torch.rand(cin, device=dev) + 0.5, torch.randn(cin, device=dev) * 0.3
        res = torch.randn(n, cout, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=cl)
        for fused in (True, False):
            kw = dict(stride=1, padding=k // 2)
            if fused:
                kw.update(scale=sc, shift=sh, stats=True, residual=res if has_res else None)
            yh, ph = hopper.conv_fprop(x, w, **kw)
            yp, pp = conv.conv_fprop(x, w, **kw)
            diff = ((yh.float() - yp.float()).norm() / yp.float().norm()).item()
            if fused:  # per-image partials against per-tile ones: compare what finalize makes of them
                m_h = (ph[0] * ph[2]).sum(0) / (yh.numel() // cout)
                diff = max(diff, ((m_h - yp.float().mean((0, 2, 3))).abs().max()).item())
            ok = diff < 2e-2
            bad += not ok
            with route.force("cudnn"):
                t_cudnn = _time(route.conv_fprop, x, w, kw, reps)
            t_h = _time(hopper.conv_fprop, x, w, kw, reps)
            t_p = _time(conv.conv_fprop, x, w, kw, reps)
            # the tile the chooser's special rules replaced (8x32 at 64 channels, the 1x1 32->128's
            # 16x16 on one warpgroup), timed beside it: log rows 13-14's predictions
            alt = configs._hopper_tile(cin, cout, k, torch.bfloat16)
            t_alt = "" if alt == configs.hopper_fprop_config(cin, cout, k, 1, torch.bfloat16) else (
                f"  hopper {alt.block_h}x{alt.block_w}x{alt.block_n} "
                f"{1e3 * _time(hopper.conv_fprop, x, w, dict(kw, config=alt), reps):8.1f} us")
            print(f"{label:18s} {'fused' if fused else 'plain'}  diff {diff:.1e} {'ok' if ok else 'MISMATCH'}  "
                  f"hopper {1e3 * t_h:8.1f} us  pointer {1e3 * t_p:8.1f} us  cudnn-route {1e3 * t_cudnn:8.1f} us  "
                  f"auto picks {'pointer' if hopper.unsupported(x, w, stride=1, padding=k // 2) else 'hopper'}{t_alt}",
                  flush=True)
    return bad


if __name__ == "__main__":
    sys.exit(main())
