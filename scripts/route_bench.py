"""Block training steps on a GPU: fused (convolutions as the measured dispatch table routes them)
vs eager PyTorch, each timed as launched from Python and replayed as a CUDA graph
(``torch.cuda.make_graphed_callables``: forward and backward captured, no host overhead).

    PYTHONPATH=. python3 scripts/route_bench.py OUT.json

bf16, channels_last; one step is forward + backward(dy) with the input requiring grad. Times
are medians of ``triton.testing.do_bench``; each row is written to OUT.json as soon as it is
measured, so a timeout keeps what was measured. A short script for a short device budget; the
full comparison (with torch.compile) is ``pytest benchmarks/ --benchmark-only``.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

from fusedres import PreActBasicBlock, PreActBottleneck
from fusedres.ops import route
from fusedres.testing import set_fused

CASES = [
    ("PreActBottleneck 64/16ch 32^2 N128", lambda: PreActBottleneck(64, 16), (128, 64, 32, 32)),
    ("PreActBottleneck 128/32ch 16^2 N128", lambda: PreActBottleneck(128, 32), (128, 128, 16, 16)),
    ("PreActBottleneck 256/64ch 8^2 N128", lambda: PreActBottleneck(256, 64), (128, 256, 8, 8)),
    ("PreActBasicBlock 64ch 56^2 N256", lambda: PreActBasicBlock(64, 64), (256, 64, 56, 56)),
    ("PreActBasicBlock 128ch 28^2 N256", lambda: PreActBasicBlock(128, 128), (256, 128, 28, 28)),
    ("PreActBasicBlock 256ch 14^2 N256", lambda: PreActBasicBlock(256, 256), (256, 256, 14, 14)),
    ("PreActBasicBlock 512ch 7^2 N256", lambda: PreActBasicBlock(512, 512), (256, 512, 7, 7)),
]


def _ms(fn, grads) -> float:
    return float(do_bench(fn, warmup=10, rep=40, grad_to_none=grads, return_mode="median"))


def _peak_mb(fn, grads) -> float:
    for t in grads:  # as after zero_grad(): the step allocates its gradients, as in do_bench's timed calls
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(build, shape) -> dict:
    cl = torch.channels_last
    torch.manual_seed(0)
    fused = build().cuda().to(torch.bfloat16).to(memory_format=cl).train()
    eager = set_fused(copy.deepcopy(fused), False)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl).requires_grad_()
    with torch.no_grad():
        dy = torch.randn_like(eager(x)).contiguous(memory_format=cl)
    row = {}
    for name, model in (("fused", fused), ("eager", eager)):
        grads = [x, *model.parameters()]

        def step(m=model):
            m(x).backward(dy)

        for _ in range(3):
            step()
        row[f"{name}_ms"] = _ms(step, grads)
        row[f"{name}_peak_mb"] = _peak_mb(step, grads)
        try:
            graphed = torch.cuda.make_graphed_callables(copy.deepcopy(model), (x,), num_warmup_iters=3)

            def gstep(g=graphed):
                g(x).backward(dy)

            gstep()
            # the graphed module's parameter gradients too: left set, every replay's backward would add
            # into them with one eager kernel per parameter (launch overhead the graph is there to remove)
            row[f"{name}_graph_ms"] = _ms(gstep, [x, *graphed.parameters()])
        except Exception as e:  # reported, not hidden
            row[f"{name}_graph_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def main() -> int:
    out = sys.argv[1]
    env = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "commit": os.environ.get("FUSEDRES_COMMIT", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "routes": {r: route.choose(r, torch.device("cuda"), 64, 64, 3, 1, 802816) for r in route.ROLES},
    }
    rows = []
    print(f"{env['device']} torch {env['torch']} triton {env['triton']}; bf16 channels_last train step, ms")
    print(f"{'case':<38} {'fused':>7} {'eager':>7} {'x':>5} | graph: {'fused':>7} {'eager':>7} {'x':>5} | peak MB f/e")
    for label, build, shape in CASES:
        try:
            r = measure(build, shape)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        r = {"case": label, **r}
        rows.append(r)
        with open(out, "w") as f:
            json.dump({**env, "rows": rows}, f, indent=1)

        def g(k, r=r):
            return r.get(k) or float("nan")

        print(f"{label:<38} {g('fused_ms'):7.3f} {g('eager_ms'):7.3f} {g('eager_ms') / g('fused_ms'):5.2f} | "
              f"{g('fused_graph_ms'):7.3f} {g('eager_graph_ms'):7.3f} {g('eager_graph_ms') / g('fused_graph_ms'):5.2f}"
              f" | {g('fused_peak_mb'):.0f}/{g('eager_peak_mb'):.0f} {r.get('error') or ''}"
              f"{r.get('fused_graph_error') or ''}", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
