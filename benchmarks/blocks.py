"""One training step (forward + backward) and peak memory of the pre-activation blocks, fused vs
their eager twins (``fused=False``, cuDNN), bf16, channels_last.

    PYTHONPATH=. python3 benchmarks/blocks.py --out DIR [--commit SHA]

Writes ``blocks.json`` and ``blocks.md`` into ``--out``. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fusedres import PreActBasicBlock, PreActBottleneck  # noqa: E402
from fusedres.testing import set_fused  # noqa: E402

# (name, block factory, input shape)
CASES = [
    ("PreActBasicBlock 64ch 56^2 N64", lambda: PreActBasicBlock(64, 64), (64, 64, 56, 56)),
    ("PreActBottleneck 64/16ch 32^2 N128", lambda: PreActBottleneck(64, 16), (128, 64, 32, 32)),
]


def _step(block: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def run() -> None:
        out = block(x)
        out.backward(dy)
    return run


def _peak_mb(fn, device: torch.device) -> float:
    """Peak memory allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run(commit: str) -> dict:
    device = torch.device("cuda")
    dtype = torch.bfloat16
    rows = []
    for name, make, shape in CASES:
        torch.manual_seed(0)
        fused = make().to(device, dtype).to(memory_format=torch.channels_last)
        eager = set_fused(copy.deepcopy(fused), False)
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        with torch.no_grad():
            dy = torch.randn_like(fused(x)).contiguous(memory_format=torch.channels_last)
        row = {"case": name, "dtype": "bfloat16", "pass": "train step (fwd+bwd)"}
        for impl, block in (("fused", fused), ("eager", eager)):
            fn = _step(block, x, dy)
            row[f"{impl}_ms"] = float(do_bench(fn, warmup=25, rep=100, grad_to_none=[x, *block.parameters()],
                                               return_mode="median"))
            row[f"{impl}_peak_mb"] = _peak_mb(fn, device)
        row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
        row["peak_ratio"] = row["fused_peak_mb"] / row["eager_peak_mb"]
        rows.append(row)
        print(f"{name:<36} fused {row['fused_ms']:.3f} ms  eager {row['eager_ms']:.3f} ms  "
              f"speedup {row['speedup_vs_eager']:.2f}  peak {row['fused_peak_mb']:.0f} / {row['eager_peak_mb']:.0f} MB",
              flush=True)
    return {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
        "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    lines = [
        f"# Pre-activation blocks, one training step — {result['device']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, commit {result['commit']}, {result['date']}; "
        "bf16, channels_last; median of do_bench; peak = max_memory_allocated above the inputs during one step.",
        "",
        "| case | fused ms | eager ms | speedup vs eager | fused peak MB | eager peak MB | peak ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['fused_ms']:.3f} | {r['eager_ms']:.3f} | {r['speedup_vs_eager']:.2f} | "
                     f"{r['fused_peak_mb']:.0f} | {r['eager_peak_mb']:.0f} | {r['peak_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default=os.environ.get("FUSEDRES_COMMIT", "unknown"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/blocks.py needs a CUDA device; nothing measured.")
        return 0
    result = run(args.commit)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "blocks.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "blocks.md"), "w") as f:
        f.write(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
