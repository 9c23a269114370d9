"""Time each convolution kernel role against cuDNN at the layer shapes of DESIGN.md §5.

    PYTHONPATH=. python3 benchmarks/layers.py --out DIR [--dtype bf16] [--commit SHA]

Rows (bf16, channels_last, one process, one card, median of ``triton.testing.do_bench``):

- ``fprop``        our conv (no fusion)                 vs ``F.conv2d`` (cuDNN)
- ``fprop+bnrelu`` our conv with the BN-ReLU prologue    vs eager BN-apply + ReLU + ``F.conv2d``
- ``dgrad``        our input gradient (no fusion)        vs ``aten.convolution_backward`` (input only)
- ``dgrad+bnbwd``  our input gradient + ReLU mask + BN-backward sums
                                                          vs ``aten.convolution_backward`` + mask + sums
- ``wgrad+bnrelu`` our weight gradient recomputing relu(bn(x)) vs ``aten.convolution_backward`` (weight only)
                                                          on a stored activation
- ``op fwd+bwd``   ``bn_relu_conv2d`` forward + backward  vs its eager reference (``F.batch_norm`` ...)

``speedup`` is baseline time / fused time (> 1: fused is faster). Needs a CUDA device; writes
``layers.json`` and ``layers.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fusedres import bn_relu_conv2d  # noqa: E402
from fusedres.ops import bn as bn_ops  # noqa: E402
from fusedres.ops import conv as conv_ops  # noqa: E402
from fusedres.reference import bn_relu_conv2d_reference  # noqa: E402

# (name, N, Cin, Cout, H=W, ksize, stride) — DESIGN.md §5, plus one stride-2 layer.
SHAPES = [
    ("3x3 64->64 56^2 N256", 256, 64, 64, 56, 3, 1),
    ("3x3 128->128 28^2 N256", 256, 128, 128, 28, 3, 1),
    ("3x3 512->512 7^2 N256", 256, 512, 512, 7, 3, 1),
    ("1x1 64->16 32^2 N128", 128, 64, 16, 32, 1, 1),
    ("3x3 16->16 32^2 N128", 128, 16, 16, 32, 3, 1),
    ("3x3 64->128 s2 56^2 N256", 256, 64, 128, 56, 3, 2),
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bench(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _ceilings(device: torch.device) -> dict[str, float]:
    """Measured bf16 matmul TFLOP/s and device-to-device copy TB/s on this card."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b)
    src = torch.empty(2 * 1024**3 // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    cms = _bench(lambda: dst.copy_(src))
    return {"bf16_tflops": 2 * 8192**3 / ms / 1e9, "copy_tbps": 2 * src.numel() * 2 / cms / 1e9}


def run(dtype: torch.dtype, commit: str) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    ceil = _ceilings(device)
    rows = []
    cl = torch.channels_last
    for name, n, cin, cout, hw, k, s in SHAPES:
        pad = k // 2
        oh = (hw + 2 * pad - k) // s + 1
        x = torch.randn(n, cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=cl)
        w = (torch.randn(cout, cin, k, k, device=device, dtype=dtype) * 0.05).contiguous(memory_format=cl)
        dy = torch.randn(n, cout, oh, oh, device=device, dtype=dtype).contiguous(memory_format=cl)
        g = torch.rand(cin, device=device) + 0.5
        b = torch.randn(cin, device=device)
        rm, rv = torch.zeros(cin, device=device), torch.ones(cin, device=device)
        mean, invstd, scale, shift = bn_ops.bn_finalize(
            bn_ops.bn_stats(x), n * hw * hw, g, b, None, None,
            training=True, momentum=0.1, eps=1e-5, channels=cin, device=device,
        )
        a = torch.relu(x.float() * scale[None, :, None, None] + shift[None, :, None, None]).to(dtype)
        a = a.contiguous(memory_format=cl)
        flops = 2.0 * n * oh * oh * cout * cin * k * k
        esz = x.element_size()

        def conv_bwd(mask: list[bool]) -> object:
            return torch.ops.aten.convolution_backward(
                dy, a, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1, mask)

        def eager_bnrelu_conv() -> object:
            return F.conv2d(F.relu(F.batch_norm(x, None, None, g, b, True, 0.0, 1e-5)), w, None, s, pad)

        def eager_dgrad_bnbwd() -> object:
            da = conv_bwd([True, False, False])[0]
            dz = da * (a > 0)
            xhat = (x.float() - mean[None, :, None, None]) * invstd[None, :, None, None]
            return dz.float().sum((0, 2, 3)), (dz.float() * xhat).sum((0, 2, 3))

        def fused_dgrad_bnbwd() -> object:
            dz, parts = conv_ops.conv_dgrad(dy, w, tuple(x.shape), stride=s, padding=pad,
                                            bn=(x, scale, shift, mean, invstd))
            return bn_ops.bn_bwd_reduce(*parts)

        xg = x.detach().clone().requires_grad_()
        wg = w.detach().clone().requires_grad_()
        gg = g.detach().clone().requires_grad_()
        bg = b.detach().clone().requires_grad_()

        def op_step(impl: Callable[..., torch.Tensor]) -> Callable[[], object]:
            def step() -> object:
                out = impl(xg, wg, gg, bg, rm, rv, training=True, stride=s, padding=pad)
                return torch.autograd.grad(out, (xg, wg, gg, bg), dy)
            return step

        cases = [
            ("fprop", lambda: conv_ops.conv_fprop(x, w, stride=s, padding=pad),
             lambda: F.conv2d(a, w, None, s, pad), flops),
            ("fprop+bnrelu", lambda: conv_ops.conv_fprop(x, w, stride=s, padding=pad, scale=scale, shift=shift),
             eager_bnrelu_conv, flops),
            ("dgrad", lambda: conv_ops.conv_dgrad(dy, w, tuple(x.shape), stride=s, padding=pad),
             lambda: conv_bwd([True, False, False]), flops),
            ("dgrad+bnbwd", fused_dgrad_bnbwd, eager_dgrad_bnbwd, flops),
            ("wgrad+bnrelu", lambda: conv_ops.conv_wgrad(dy, x, w, stride=s, padding=pad, scale=scale, shift=shift),
             lambda: conv_bwd([False, True, False]), flops),
            ("op fwd+bwd", op_step(bn_relu_conv2d), op_step(bn_relu_conv2d_reference), 3 * flops),
        ]
        for role, fused_fn, base_fn, fl in cases:
            try:
                fused_ms = _bench(fused_fn)
                base_ms = _bench(base_fn)
                err = None
            except Exception as e:  # a failed row is reported, not hidden
                fused_ms = base_ms = float("nan")
                err = f"{type(e).__name__}: {e}"[:300]
            min_bytes = esz * (x.numel() + dy.numel() + w.numel())
            row = {
                "shape": name, "role": role, "dtype": str(dtype).replace("torch.", ""),
                "fused_ms": fused_ms, "baseline_ms": base_ms, "speedup": base_ms / fused_ms,
                "fused_tflops": fl / fused_ms / 1e9, "baseline_tflops": fl / base_ms / 1e9,
                "fused_share_of_matmul_peak": fl / fused_ms / 1e9 / ceil["bf16_tflops"],
                "min_io_bytes": min_bytes, "error": err,
            }
            rows.append(row)
            print(f"{name:<26} {role:<13} fused {fused_ms:8.3f} ms  baseline {base_ms:8.3f} ms  "
                  f"speedup {row['speedup']:5.2f}  {row['fused_tflops']:6.1f} TFLOP/s" + (f"  {err}" if err else ""),
                  flush=True)
    return {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ceilings": ceil, "rows": rows,
    }


def to_markdown(result: dict) -> str:
    lines = [
        f"# Kernel roles vs cuDNN — {result['device']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, commit {result['commit']}, {result['date']}; "
        f"measured ceilings: {result['ceilings']['bf16_tflops']:.0f} TFLOP/s bf16 matmul, "
        f"{result['ceilings']['copy_tbps']:.2f} TB/s copy. Median of do_bench; speedup = baseline / fused.",
        "",
        "| shape | role | dtype | fused ms | baseline ms | speedup | fused TFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['role']} | {r['dtype']} | {r['fused_ms']:.3f} | {r['baseline_ms']:.3f} | "
                     f"{r['speedup']:.2f} | {r['fused_tflops']:.1f} |" + (f" {r['error']}" if r["error"] else ""))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for layers.json and layers.md")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--commit", default=os.environ.get("FUSEDRES_COMMIT", "unknown"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/layers.py needs a CUDA device; nothing measured.")
        return 0
    result = run(DTYPES[args.dtype], args.commit)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "layers.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "layers.md"), "w") as f:
        f.write(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
