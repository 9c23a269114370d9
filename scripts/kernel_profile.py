"""Where the GPU time of a block training step goes: torch.profiler (CUDA activity) over a few
steps of the issue's headline blocks — the 64/16 CIFAR bottleneck at N=128 and the 64-channel 56²
basic block at N=256, bf16, channels_last — fused on each convolution route and eager. Prints,
per configuration, the GPU time and the kernel count per step and the kernels with the most GPU
time (name, calls per step, µs per call, share), so that each fused kernel can be set against
its floor (benchmarks/floors.py) and against eager's kernels for the same work.

    PYTHONPATH=. python3 scripts/kernel_profile.py [STEPS]

Half a minute to a minute on a warm Triton cache (NOTES §4 item 1a).
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fusedres import PreActBasicBlock, PreActBottleneck
from fusedres.ops import route

CASES = [
    ("PreActBottleneck 64/16 32^2 N128", lambda fused: PreActBottleneck(64, 16, fused=fused), (128, 64, 32, 32)),
    ("PreActBasicBlock 64ch 56^2 N256", lambda fused: PreActBasicBlock(64, 64, fused=fused), (256, 64, 56, 56)),
]


def _device_time(evt) -> float:
    t = getattr(evt, "self_device_time_total", None)
    return float(t if t is not None else evt.self_cuda_time_total)


def profile_case(name: str, make, shape, fused: bool, backend: str | None, steps: int) -> None:
    cl = torch.channels_last
    torch.manual_seed(0)
    block = make(fused).cuda().to(torch.bfloat16).to(memory_format=cl)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl).requires_grad_(True)
    dy = torch.randn_like(x) if block(x).shape == x.shape else None
    params = list(block.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        y = block(x)
        y.backward(dy if dy is not None else torch.ones_like(y))

    ctx = route.force(backend) if backend else _nullcontext()
    with ctx:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if _device_time(e) > 0]
    total = sum(_device_time(e) for e in rows)
    kernels = sum(e.count for e in rows)
    label = "eager" if not fused else f"fused, {backend or 'dispatch table'} route"
    print(f"\n== {name}, {label}: {total / steps:.1f} us of GPU time per step, "
          f"{kernels / steps:.1f} kernels per step")
    for e in sorted(rows, key=_device_time, reverse=True)[:14]:
        t = _device_time(e)
        print(f"  {t / steps:9.1f} us/step {e.count / steps:5.1f} calls {t / max(e.count, 1):8.1f} us/call "
              f"{100 * t / total:5.1f}%  {e.key[:110]}")


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> int:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {__import__('triton').__version__}; "
          f"training steps, bf16 channels_last, {steps} profiled steps each")
    for name, make, shape in CASES:
        for fused, backend in ((False, None), (True, None), (True, "triton"), (True, "cudnn")):
            try:
                profile_case(name, make, shape, fused, backend, steps)
            except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
                print(f"\n== {name}, fused={fused} {backend}: FAILED {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
