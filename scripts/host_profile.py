"""Where the host time of a fused block training step goes, on a GPU, and what the direct launch
path (``FUSEDRES_FAST_LAUNCH``) saves: for a CIFAR bottleneck block (64/16 at 32², N=128, bf16,
channels_last) on each convolution route, with Triton's launch path and with the direct one, the
wall time per training step (a synchronize at the end of N steps), the same for the eager block,
and a cProfile of the functions with the most own time (Triton's ``JITFunction.run``, its binder,
the driver launcher, against ours and PyTorch's). Before timing, the direct path's results are
compared with Triton's path bit for bit. On the Triton route also the step with every
convolution's input and weight gradients in launches of their own (``conv.merged_backward(False)``).

    PYTHONPATH=. python3 scripts/host_profile.py [STEPS] [OUT_FILE]

About half a minute on a warm Triton cache; meant for the start of a GPU session (NOTES log #4).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import torch

from fusedres import PreActBottleneck, _runtime
from fusedres.ops import conv as conv_ops
from fusedres.ops import route


def _block(fused: bool) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    cl = torch.channels_last
    torch.manual_seed(0)
    block = PreActBottleneck(64, 16, fused=fused).cuda().to(torch.bfloat16).to(memory_format=cl)
    x = torch.randn(128, 64, 32, 32, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    x.requires_grad_(True)
    return block, x, torch.randn_like(x)


def _stepper(block, x, dy):
    """One training step that starts with the gradients set to None (no accumulation kernels)."""
    params = list(block.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        block(x).backward(dy)

    return step


def _wall(step, steps: int) -> float:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _same_results(block, x, dy) -> bool:
    """One step with Triton's launch path and one with the direct path (after a warm-up step that
    fills the direct path's cache) give bit-identical outputs and gradients."""
    results = []
    for fast in (False, True, True):
        _runtime.FAST_LAUNCH = fast
        x.grad = None
        block.zero_grad(set_to_none=True)
        y = block(x)
        y.backward(dy)
        results.append([y.detach().clone(), x.grad.clone(), *(p.grad.clone() for p in block.parameters())])
    _runtime.FAST_LAUNCH = False
    return all(torch.equal(a, b) for a, b in zip(results[0], results[2]))


def main() -> int:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {__import__('triton').__version__}; "
        f"PreActBottleneck(64, 16) bf16 channels_last, N=128 32x32, training step, {steps} steps")
    eager, ex, edy = _block(False)
    say(f"eager: {_wall(_stepper(eager, ex, edy), steps) * 1e3:.3f} ms per step")
    block, x, dy = _block(True)
    step = _stepper(block, x, dy)
    profiles = []
    for backend in ("triton", "cudnn"):
        with route.force(backend):
            say(f"{backend} route: direct launch path bit-identical to Triton's: {_same_results(block, x, dy)}")
            for fast in (False, True):
                _runtime.FAST_LAUNCH = fast
                before = sum(_runtime.launch_counts.values())
                direct = sum(_runtime.fast_launch_counts.values())
                wall = _wall(step, steps)
                launches = (sum(_runtime.launch_counts.values()) - before) / (steps + 5)
                share = (sum(_runtime.fast_launch_counts.values()) - direct) / max(1.0, launches * (steps + 5))
                say(f"{backend} route, {'direct' if fast else 'Triton'} launches: {wall * 1e3:.3f} ms per step, "
                    f"{launches:.0f} Triton launches per step ({share:.0%} direct), "
                    f"{wall * 1e6 / max(launches, 1):.0f} us of step per launch")
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
                profiles.append(f"\n== cProfile: {backend} route, {'direct' if fast else 'Triton'} launches\n"
                                + out.getvalue())
            _runtime.FAST_LAUNCH = False
            if backend == "triton":  # each convolution's dgrad and wgrad in one launch, against two (NOTES log 15)
                before = sum(_runtime.launch_counts.values())
                with conv_ops.merged_backward(False):
                    wall = _wall(step, steps)
                launches = (sum(_runtime.launch_counts.values()) - before) / (steps + 5)
                say(f"triton route, Triton launches, dgrad and wgrad never merged: {wall * 1e3:.3f} ms per step, "
                    f"{launches:.0f} Triton launches per step")
    for p in profiles:
        say(p)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
