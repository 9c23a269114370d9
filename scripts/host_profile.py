"""Where the host time of a fused block training step goes, on a GPU: cProfile of N steps of a
CIFAR bottleneck block (bf16, channels_last) on each convolution route, with the GPU kept busy
only by the steps themselves (a synchronize at the end). Prints the wall time per step, the
launches per step, and the functions with the most own time — Triton's launch path
(``JITFunction.run``, the binder, the driver launcher) against ours and PyTorch's.

    PYTHONPATH=. python3 scripts/host_profile.py [STEPS]

About half a minute on a warm Triton cache; meant for the start of a GPU session (NOTES log #4).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import torch

import fusedres
from fusedres import PreActBottleneck
from fusedres.ops import route


def main() -> int:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    cl = torch.channels_last
    block = PreActBottleneck(64, 16).cuda().to(torch.bfloat16).to(memory_format=cl)
    x = torch.randn(128, 64, 32, 32, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {__import__('triton').__version__}")
    for backend in ("triton", "cudnn"):
        with route.force(backend):
            for _ in range(5):
                block(x).backward(dy)
            torch.cuda.synchronize()
            before = sum(fusedres.launch_counts.values())
            t0 = time.perf_counter()
            for _ in range(steps):
                block(x).backward(dy)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / steps
            launches = (sum(fusedres.launch_counts.values()) - before) / steps
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(steps):
                block(x).backward(dy)
            torch.cuda.synchronize()
            prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(f"\n== {backend} route: {wall * 1e3:.3f} ms per step (no profiler), {launches:.0f} Triton launches "
              f"per step, {wall * 1e6 / max(launches, 1):.0f} us of step per launch")
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
