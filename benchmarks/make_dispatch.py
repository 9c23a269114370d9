"""Make the per-architecture convolution dispatch table (fusedres/ops/dispatch/sm_XX.json) from a
measured layer benchmark: for each layer and role, Triton (with its fusion) against cuDNN plus
the elementwise pass that the cuDNN route adds — and, where block training steps were measured
on both routes (``scripts/route_bench.py`` with the table's routing and with
``FUSEDRES_CONV_BACKEND=triton``), the faster route of the whole block as CUDA graphs (GPU
time, no host overhead) for every convolution of that block, which overrides the layer rows.

    python benchmarks/make_dispatch.py benchmarks/results/h200/layers.json --arch sm_90 \
        --blocks benchmarks/results/h200/2026-11-26-dispatch/route-{auto,triton}.json

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


_BLOCK = re.compile(r"PreAct(Basic|Bottleneck)\w* (\d+)(?:/(\d+))?ch (\d+)\^2 N(\d+)")


def block_convs(case: str) -> list[tuple[int, int, int, int, int]]:
    """(ksize, stride, cin, cout, out pixels) of each convolution of a measured block case."""
    kind, cin, inner, hw, n = _BLOCK.fullmatch(case).groups()
    cin, hw, n = int(cin), int(hw), int(n)
    px = n * hw * hw
    if kind == "Basic":
        return [(3, 1, cin, cin, px), (3, 1, cin, cin, px)]
    c = int(inner)
    return [(1, 1, cin, c, px), (3, 1, c, c, px), (1, 1, c, 4 * c, px)]


def block_rows(auto: dict, triton: dict) -> list[dict]:
    """Rows for every convolution of each block measured on both routes: the route whose CUDA-graph
    training step was faster (the auto run must have routed these convolutions to cuDNN)."""
    tri = {r["case"]: r for r in triton["rows"]}
    out = []
    for r in auto["rows"]:
        t = tri.get(r["case"])
        if t is None or "fused_graph_ms" not in r or "fused_graph_ms" not in t:
            continue
        backend = "triton" if t["fused_graph_ms"] <= r["fused_graph_ms"] else "cudnn"
        for k, stride, cin, cout, px in block_convs(r["case"]):
            for role in _ROLES:
                out.append({"role": role, "ksize": k, "stride": stride, "cin": cin, "cout": cout, "pixels": px,
                            "shape": f"block {r['case']}", "dtype": "bfloat16",
                            "block_triton_graph_ms": round(t["fused_graph_ms"], 4),
                            "block_cudnn_graph_ms": round(r["fused_graph_ms"], 4), "backend": backend})
    return out


def merge(layers: list[dict], blocks: list[dict]) -> list[dict]:
    """Block rows replace layer rows of the same role and convolution."""
    def key(r: dict) -> tuple:
        return r["role"], r["ksize"], r["stride"], r["cin"], r["cout"], r["pixels"]

    seen = {key(r) for r in blocks}
    return [r for r in layers if key(r) not in seen] + list({key(r): r for r in blocks}.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layers_json", type=Path)
    ap.add_argument("--arch", required=True, help="e.g. sm_90 (H100/H200)")
    ap.add_argument("--blocks", nargs=2, type=Path, metavar=("AUTO_JSON", "TRITON_JSON"),
                    help="route_bench.py results with the table's routing and with Triton forced")
    args = ap.parse_args()
    out = ROOT / "fusedres" / "ops" / "dispatch" / f"{args.arch}.json"
    doc = table(json.loads(args.layers_json.read_text()))
    if args.blocks:
        auto, tri = (json.loads(p.read_text()) for p in args.blocks)
        doc["blocks_source"] = {k: auto.get(k) for k in ("device", "torch", "triton", "commit", "date")}
        doc["layers"] = merge(doc["layers"], block_rows(auto, tri))
    out.write_text(json.dumps(doc, indent=1) + "\n")
    for r in doc["layers"]:
        t, c = r.get("triton_ms", r.get("block_triton_graph_ms")), r.get("cudnn_ms", r.get("block_cudnn_graph_ms"))
        print(f"{r['shape'][:44]:<44} {r['role']:<6} k{r['ksize']} {r['cin']}->{r['cout']} "
              f"triton {t:.3f} ms  cudnn {c:.3f} ms  -> {r['backend']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
