"""torchvision ResNet-50, converted by ``fusedres.convert`` vs the original: inference and
training-step images/s at batch 64, bf16, channels_last, 224x224.

    PYTHONPATH=. python3 benchmarks/resnet50.py --out DIR [--commit SHA]

Writes ``resnet50.json`` / ``resnet50.md`` after every measurement, so a run cut short keeps
what it measured. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torchvision
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fusedres  # noqa: E402
from fusedres.testing import rel_error  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default=os.environ.get("FUSEDRES_COMMIT", "unknown"))
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/resnet50.py needs a CUDA device; nothing measured.")
        return 0
    device, dtype, cl = torch.device("cuda"), torch.bfloat16, torch.channels_last
    torch.manual_seed(0)
    original = torchvision.models.resnet50().to(device, dtype).to(memory_format=cl)
    converted = fusedres.convert(original)
    x = torch.randn(args.batch, 3, 224, 224, device=device, dtype=dtype).contiguous(memory_format=cl)
    result = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
        "commit": args.commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": args.batch, "dtype": "bfloat16", "rows": [],
    }
    os.makedirs(args.out, exist_ok=True)

    def save() -> None:
        with open(os.path.join(args.out, "resnet50.json"), "w") as f:
            json.dump(result, f, indent=1)
        lines = [f"# torchvision ResNet-50, converted vs original — {result['device']}", "",
                 f"torch {result['torch']}, triton {result['triton']}, commit {result['commit']}, {result['date']}; "
                 f"batch {args.batch}, bf16, channels_last, 224x224; median of do_bench.", "",
                 "| pass | fused img/s | original img/s | speedup | note |", "|---|---|---|---|---|"]
        for r in result["rows"]:
            lines.append(f"| {r['pass']} | {r['fused_img_s']:.0f} | {r['eager_img_s']:.0f} | "
                         f"{r['speedup']:.2f} | {r.get('note', '')} |")
        with open(os.path.join(args.out, "resnet50.md"), "w") as f:
            f.write("\n".join(lines) + "\n")

    original.eval()
    converted.eval()
    with torch.no_grad():
        err = rel_error(converted(x).float(), original(x).float())
        fused_ms = do_bench(lambda: converted(x), warmup=5, rep=30, return_mode="median")
        eager_ms = do_bench(lambda: original(x), warmup=5, rep=30, return_mode="median")
    result["rows"].append({"pass": "inference (eval, no_grad)", "fused_img_s": args.batch / fused_ms * 1e3,
                           "eager_img_s": args.batch / eager_ms * 1e3, "speedup": eager_ms / fused_ms,
                           "note": f"output rel. difference {err:.2e}"})
    print(result["rows"][-1], flush=True)
    save()

    original.train()
    converted.train()

    def step(model: torch.nn.Module):
        def run() -> None:
            model(x).float().square().mean().backward()
        return run

    params = list(original.parameters()) + list(converted.parameters())
    fused_ms = do_bench(step(converted), warmup=3, rep=30, grad_to_none=params, return_mode="median")
    eager_ms = do_bench(step(original), warmup=3, rep=30, grad_to_none=params, return_mode="median")
    result["rows"].append({"pass": "training step (fwd+bwd)", "fused_img_s": args.batch / fused_ms * 1e3,
                           "eager_img_s": args.batch / eager_ms * 1e3, "speedup": eager_ms / fused_ms})
    print(result["rows"][-1], flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
