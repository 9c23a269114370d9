"""``python -m fusedres``: a short self-check of the fused kernels against PyTorch.

On a CUDA machine the kernels run on the GPU; elsewhere the command re-runs itself under the
Triton interpreter (``TRITON_INTERPRET=1``) so that the real kernels run on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

_CASES = [
    # (n, c, h, w, cout, ksize, stride, padding, residual)
    (2, 19, 9, 7, 21, 3, 1, 1, True),
    (3, 16, 8, 8, 32, 3, 2, 1, False),
    (2, 24, 7, 9, 40, 1, 1, 0, True),
    (2, 8, 9, 9, 16, 1, 2, 0, False),
]


def _check(device: torch.device) -> int:
    from . import _runtime
    from .testing import check_bn_relu_conv2d

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter"
    print(f"fusedres self-check on {where} (torch {torch.__version__})")
    print(f"{'case':<34} {'dtype':<9} {'mode':<6} {'worst fused err':>16} {'eager err':>10}  result")
    failed = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, c, h, w, cout, k, s, p, res in _CASES:
            for training in (True, False):
                before = _runtime.launch_counts["conv_fprop_kernel"]
                r = check_bn_relu_conv2d(
                    n=n, c=c, h=h, w=w, cout=cout, ksize=k, stride=s, padding=p, dtype=dtype,
                    device=device, training=training, residual=res,
                )
                launched = _runtime.launch_counts["conv_fprop_kernel"] > before
                bad = r.failures(dtype)
                worst = max(r.fused, key=lambda q: r.fused[q] / (2 * r.eager[q] + 1e-12))
                ok = launched and not bad
                failed += not ok
                name = f"{n}x{c}x{h}x{w} -> {cout} k{k} s{s}{' +res' if res else ''}"
                mode = "train" if training else "eval"
                verdict = "ok" if ok else ("FAIL: " + "; ".join(bad) if launched else "FAIL: Triton did not run")
                errs = f"{r.fused[worst]:>16.2e} {r.eager[worst]:>10.2e}"
                print(f"{name:<34} {str(dtype)[6:]:<9} {mode:<6} {errs}  {verdict}")
    print("all checks passed" if not failed else f"{failed} checks FAILED")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedres", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="check", choices=["check"], help="what to run (default: check)")
    parser.parse_args(argv)
    if torch.cuda.is_available():
        return _check(torch.device("cuda"))
    if os.environ.get("TRITON_INTERPRET") != "1":
        env = dict(os.environ, TRITON_INTERPRET="1")
        args = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "fusedres", *args], env)
    return _check(torch.device("cpu"))


if __name__ == "__main__":
    sys.exit(main())
