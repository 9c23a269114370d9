"""Make the per-architecture convolution dispatch table (fusedres/ops/dispatch/sm_XX.json) from a
measured layer benchmark: for each layer and role, Triton (with its fusion) against cuDNN plus
the elementwise pass that the cuDNN route adds.

    python benchmarks/make_dispatch.py benchmarks/results/h200/layers.json --arch sm_90

Roles and what is compared (times measured on the card; the extra pass is its bytes over the
card's measured copy bandwidth):

- fprop: Triton fprop with the BN-ReLU prologue vs cuDNN fprop + one BN-ReLU apply pass
  (read x, write the activation);
- dgrad: Triton dgrad with the BN-ReLU-backward epilogue vs cuDNN dgrad + one pass reading the
  gradient and x and writing dz;
- wgrad: Triton wgrad recomputing the activation vs cuDNN wgrad + one BN-ReLU apply pass.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SHAPE = re.compile(r"(\d+)x\d+ (\d+)->(\d+)(?: s(\d+))? (\d+)\^2 N(\d+)")
#: (triton role row, cuDNN baseline row, elementwise passes over the convolution's input, in tensor traffic)
_ROLES = {"fprop": ("fprop+bnrelu", "fprop", 2), "dgrad": ("dgrad+bnbwd", "dgrad", 3),
          "wgrad": ("wgrad+bnrelu", "wgrad+bnrelu", 2)}


def table(doc: dict) -> dict:
    bw = doc["ceilings"]["copy_tbps"] * 1e12  # bytes/s
    rows = {(r["shape"], r["role"]): r for r in doc["rows"] if not r.get("error")}
    layers = []
    for shape in sorted({s for s, _ in rows}):
        k, cin, cout, stride, hw, n = _SHAPE.fullmatch(shape).groups()
        k, cin, cout, stride, hw, n = int(k), int(cin), int(cout), int(stride or 1), int(hw), int(n)
        ohw = (hw + 2 * (k // 2) - k) // stride + 1
        elem = 2 if doc["rows"][0]["dtype"] in ("bfloat16", "float16") else 4
        in_bytes = n * hw * hw * cin * elem
        for role, (triton_row, cudnn_row, passes) in _ROLES.items():
            t, c = rows.get((shape, triton_row)), rows.get((shape, cudnn_row))
            if t is None or c is None:
                continue
            extra_ms = passes * in_bytes / bw * 1e3
            triton_ms, cudnn_ms = t["fused_ms"], c["baseline_ms"] + extra_ms
            layers.append({
                "role": role, "ksize": k, "stride": stride, "cin": cin, "cout": cout,
                "pixels": n * (hw * hw if role == "dgrad" else ohw * ohw), "shape": shape, "dtype": t["dtype"],
                "triton_ms": round(triton_ms, 4), "cudnn_ms": round(cudnn_ms, 4),
                "cudnn_extra_pass_ms": round(extra_ms, 4),
                "backend": "triton" if triton_ms <= cudnn_ms else "cudnn",
            })
    return {"source": {k: doc.get(k) for k in ("device", "torch", "triton", "commit", "date")},
            "rule": __doc__.split("\n\n")[2].strip(), "layers": layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layers_json", type=Path)
    ap.add_argument("--arch", required=True, help="e.g. sm_90 (H100/H200)")
    args = ap.parse_args()
    out = ROOT / "fusedres" / "ops" / "dispatch" / f"{args.arch}.json"
    doc = table(json.loads(args.layers_json.read_text()))
    out.write_text(json.dumps(doc, indent=1) + "\n")
    for r in doc["layers"]:
        print(f"{r['shape']:<26} {r['role']:<6} triton {r['triton_ms']:.3f} ms  cudnn {r['cudnn_ms']:.3f} ms"
              f"  -> {r['backend']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
