"""Our own host time per block training step, on this CPU, with every Triton launch stubbed out.

What a fused step costs the host besides Triton's launcher and the driver: our Python (module
checks, specs, BatchNorm sequence, launchers, grids, allocations) and PyTorch's autograd around
it. The kernels never run (``launch`` records nothing and returns), so the numbers say nothing
about the GPU; they are what ``benchmarks/NOTES.md`` reports as "our Python per step".

    python scripts/host_cpu.py [--block bottleneck|basic] [--steps 200] [--repeats 5]
    python scripts/host_cpu.py --against /path/to/other/checkout    # interleaved A/B
    python scripts/host_cpu.py --against /path/to/other/checkout --pairs 15    # + per-pair ratios

The block is a 64/16 ``PreActBottleneck`` (or a 64-channel ``PreActBasicBlock``) in fp32 on a
small CPU input, channels_last, on the Triton route, its input the output of a previous fused
block (as inside a network: the statistics hand-off applies). Each repeat times ``--steps``
training steps (gradients set to None first) and forwards alone; the best repeat is reported.
With ``--against``, the same measurement runs in a subprocess on the other checkout, the two
alternating repeat by repeat, so that a loaded machine slows both alike. Times are the thread's
CPU time (``time.thread_time``), not wall time: time spent waiting for a core on a shared machine
is not counted (what sharing still costs — caches — the interleaving evens out). ``--pairs N``
keeps one worker process per checkout and alternates N more measurements between them, then
prints the median of the per-pair ratios (this/other): on a loaded machine the best-of-5 figures
of two runs can disagree by more than the effect, the median ratio of many adjacent pairs less so.

``--network N`` times the block as a network runs it instead: N copies in a ``PreActSequential``
(linked: each block's last convolution finalizes the next block's first BatchNorm, so no block but
the first runs a statistics launch of its own), the step of the whole divided by N. ``--floor``
adds the same measurement with the fused chain's own work taken out: its forward only allocates
what it returns and saves (``Chain.fake_forward``), its backward only the gradients — what is left
is the block's module call, the autograd Function with its inputs and saved tensors, autograd's
backward and the allocations, the floor any Python implementation of this structure pays.
``--proxies`` times stand-ins of two other structures instead (``benchmarks/NOTES.md`` §2): a
chain replayed from launch templates, and one autograd Function per stage instead of per block.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch


@contextlib.contextmanager
def stubbed() -> Iterator[None]:
    """Triton launches do nothing, and CPU tensors take the fused path (as CUDA tensors would)."""
    from fusedres import _runtime
    from fusedres.ops import bn, conv, route

    def launch(kernel, grid, *args, **kwargs) -> None:  # noqa: ANN001 - the launcher's signature
        return None

    with contextlib.ExitStack() as stack:
        for module in (_runtime, conv, bn):
            stack.enter_context(mock.patch.object(module, "launch", launch))
        stack.enter_context(mock.patch.object(_runtime, "triton_enabled", lambda device: True))
        stack.enter_context(route.force("triton"))
        yield


def _models(kind: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    import fusedres

    cl = torch.channels_last
    torch.manual_seed(0)
    if kind == "bottleneck":
        first, block = fusedres.PreActBottleneck(64, 16), fusedres.PreActBottleneck(64, 16)
    else:
        first, block = fusedres.PreActBasicBlock(64, 64), fusedres.PreActBasicBlock(64, 64)
    # small enough that no buffer leaves malloc's heap (as the caching allocator serves a GPU step)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=cl)
    return first.to(memory_format=cl), block.to(memory_format=cl), x


@contextlib.contextmanager
def floor() -> Iterator[None]:
    """The fused chain's forward and backward reduced to their allocations (see the module doc)."""
    from fusedres._fused import preact

    def forward(spec, t, running_out, batches=None):  # noqa: ANN001, ANN202 - Chain.forward's signature
        return preact.Chain.fake_forward(spec, t)

    def backward(spec, t, saved, dout, needs):  # noqa: ANN001, ANN202 - Chain.backward's signature
        return [torch.empty_like(v) if need and v is not None else None for v, need in zip(t, needs)]

    with mock.patch.object(preact.Chain, "forward", staticmethod(forward)), \
            mock.patch.object(preact.Chain, "backward", staticmethod(backward)):
        yield


def _timed(fns: dict, steps: int) -> dict[str, float]:
    out = {}
    for name, fn in fns.items():
        for _ in range(5):
            fn()
        t0 = time.thread_time()
        for _ in range(steps):
            fn()
        out[name] = (time.thread_time() - t0) / steps * 1e6
    return out


def measure(kind: str, steps: int, network: int = 0, bare: bool = False) -> dict[str, float]:
    """µs per training step and per forward of ``block``, one repeat (``network``: per block of a
    linked ``PreActSequential`` of that many; ``bare``: under :func:`floor`)."""
    with floor() if bare else contextlib.nullcontext():
        return _measure_network(kind, steps, network) if network else _measure_block(kind, steps)


def _measure_network(kind: str, steps: int, n: int) -> dict[str, float]:
    import fusedres

    first, _, x = _models(kind)
    net = fusedres.PreActSequential(first, *[_models(kind)[1] for _ in range(n - 1)])
    params = list(net.parameters())
    x.requires_grad_(True)
    with stubbed():
        dy = torch.randn_like(net(x))

        def step() -> None:
            for p in params:
                p.grad = None
            x.grad = None
            net(x).backward(dy)

        out = _timed({"step": step, "forward": lambda: net(x)}, steps)
    return {k: v / n for k, v in out.items()}


def _measure_block(kind: str, steps: int) -> dict[str, float]:
    first, block, x = _models(kind)
    params = list(block.parameters())
    with stubbed():
        with torch.no_grad():
            h = first(x)  # hands its output statistics to ``block``
        h.requires_grad_(True)
        dy = torch.randn_like(h)

        def step() -> None:
            for p in params:
                p.grad = None
            h.grad = None
            with torch.no_grad():
                first(x)  # re-arm the hand-off slot, as the previous block of a network does
            block(h).backward(dy)

        def forward() -> None:
            with torch.no_grad():
                first(x)
            block(h)

        def first_only() -> None:
            with torch.no_grad():
                first(x)

        out = _timed({"step": step, "forward": forward, "previous block": first_only}, steps)
    # the previous block's no-grad forward is part of every timed call: take it out
    return {"step": out["step"] - out["previous block"], "forward": out["forward"] - out["previous block"]}


# --------------------------------------------------------------------------------------------
# Proxies of two other structures (--proxies): what their own host time could be, measured on
# stand-ins with this step's tensor sizes (no fusedres code runs)


def _best_median(fn, steps: int, repeats: int = 5) -> tuple[float, float]:  # noqa: ANN001
    for _ in range(20):
        fn()
    res = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(steps):
            fn()
        res.append((time.thread_time() - t0) / steps * 1e6)
    return min(res), statistics.median(res)


def replay_proxy(steps: int) -> tuple[float, float]:
    """µs (best, median) of a replayed bottleneck step's own work: the 14 allocations of its
    sizes, then 10 stubbed launches of 40 arguments each from prebuilt templates with 8 tensor
    slots filled per call (a chain whose launches were recorded once per plan key)."""
    def launch(kernel, grid, *args, **kwargs) -> None:  # noqa: ANN001
        return None

    cl = torch.channels_last
    templates = [(object(), (k + 1, 2), [7] * 40, [(5 * i, k + i) for i in range(8)], {"BLOCK_M": 64, "num_warps": 4})
                 for k in range(10)]
    inputs = [torch.empty(4) for _ in range(20)]
    shapes = [((2, 16, 8, 8), True)] * 6 + [((4, 64), False)] * 8

    def step() -> list:
        fresh = [torch.empty(s, memory_format=cl) if four_d else torch.empty(s) for s, four_d in shapes]
        ts = inputs + fresh
        for kernel, grid, args, slots, kwargs in templates:
            a = list(args)
            for i, slot in slots:
                a[i] = ts[slot]
            launch(kernel, grid, *a, **kwargs)
        return fresh

    return _best_median(step, steps)


def function_proxy(steps: int, blocks: int = 4) -> dict[str, tuple[float, float]]:
    """µs (best, median) per block of ``blocks`` bottlenecks' autograd floor: one Function per
    block (18 inputs each, as the chain's) against one Function for all, with the same
    allocations (outputs, saved statistics, gradients)."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, n, *t):  # noqa: ANN001, ANN205
            x = t[0]
            saved = [torch.empty_like(x) if i < 3 else torch.empty((4, 64)) for _ in range(n) for i in range(6)]
            ctx.save_for_backward(*[v for v in t if v is not None], *saved)
            ctx.inputs = t
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, dy):  # noqa: ANN001, ANN205
            _ = ctx.saved_tensors  # (unpacked, as a real backward does)
            return (None, *[torch.empty_like(v) if need else None
                            for v, need in zip(ctx.inputs, ctx.needs_input_grad[1:])])

    def block_inputs() -> list:
        t = []
        for cin, cout, k in ((64, 16, 1), (16, 16, 3), (16, 64, 1)):
            t += [torch.randn(cout, cin, k, k, requires_grad=True), torch.randn(cin, requires_grad=True),
                  torch.randn(cin, requires_grad=True), torch.zeros(cin), torch.ones(cin)]
        return t

    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    per_block = [block_inputs() for _ in range(blocks)]
    params = [v for b in per_block for v in b if v.requires_grad]
    dy = torch.randn_like(x)

    def clear() -> None:
        for p in params:
            p.grad = None
        x.grad = None

    def each() -> None:
        clear()
        h = x
        for b in per_block:
            h = Fn.apply(1, h, None, None, *b)
        h.backward(dy)

    def one() -> None:
        clear()
        Fn.apply(blocks, x, None, None, *[v for b in per_block for v in b]).backward(dy)

    return {name: tuple(v / blocks for v in _best_median(fn, steps))
            for name, fn in (("one Function per block", each), (f"one Function for {blocks} blocks", one))}


def _child(checkout: str, kind: str, steps: int, extra: str = "") -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=checkout)
    env.pop("TRITON_INTERPRET", None)
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import host_cpu; " \
           f"print(json.dumps(host_cpu.measure({kind!r}, {steps}{extra})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pairs(checkouts: list[tuple[str, str]], kind: str, steps: int, pairs: int) -> list[tuple[dict, dict]]:
    """``pairs`` measurements alternated between one long-lived worker per (checkout, extra
    arguments of :func:`measure`)."""
    workers = []
    for checkout, extra in checkouts:
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import host_cpu\n"
                f"for line in sys.stdin:\n    print(json.dumps(host_cpu.measure({kind!r}, {steps}{extra})), "
                f"flush=True)\n")
        env = dict(os.environ, PYTHONPATH=checkout)
        env.pop("TRITON_INTERPRET", None)
        workers.append(subprocess.Popen([sys.executable, "-c", code], cwd=checkout, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE))

    def ask(worker: subprocess.Popen) -> dict:
        worker.stdin.write("\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())

    try:
        rows = [(ask(a), ask(b)) for a, b in [workers] * pairs]
    finally:
        for worker in workers:
            worker.stdin.close()
            worker.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", choices=("bottleneck", "basic"), default="bottleneck")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", metavar="CHECKOUT", help="another checkout, measured interleaved")
    parser.add_argument("--pairs", type=int, default=0,
                        help="with --against (or --floor): then this many pairs from one worker per checkout "
                             "(this and its floor), per-pair ratios")
    parser.add_argument("--network", type=int, default=0, metavar="N",
                        help="per block of a linked PreActSequential of N blocks (needs PreActSequential)")
    parser.add_argument("--floor", action="store_true", help="also the floor: the chain's own work taken out")
    parser.add_argument("--proxies", action="store_true",
                        help="only the stand-ins of two other structures: a replayed chain, one Function per stage")
    args = parser.parse_args()
    if args.proxies:
        best, median = replay_proxy(args.steps * 10)
        print(f"replay proxy (14 allocations, 10 templated launches): best {best:.0f} µs, median {median:.0f} µs")
        for name, (best, median) in function_proxy(args.steps).items():
            print(f"autograd floor, {name}: per block best {best:.0f} µs, median {median:.0f} µs")
        return
    extra = f", network={args.network}" if args.network else ""
    what = f"{args.block}" + (f" in a network of {args.network}" if args.network else "")
    here = str(Path(__file__).resolve().parents[1])
    runs: dict[str, list[dict[str, float]]] = {"this": [], "other": []}
    if args.floor:
        runs["floor"] = []
    for _ in range(args.repeats):
        runs["this"].append(_child(here, args.block, args.steps, extra))
        if args.against:
            runs["other"].append(_child(args.against, args.block, args.steps, extra))
        if args.floor:
            runs["floor"].append(_child(here, args.block, args.steps, extra + ", bare=True"))
    for label, rows in runs.items():
        if rows:
            best = {k: min(r[k] for r in rows) for k in rows[0]}
            where = {"this": here, "other": args.against, "floor": f"{here} (floor)"}[label]
            print(f"{where}: {what} training step {best['step']:.0f} µs, forward {best['forward']:.0f} µs "
                  f"(best of {len(rows)} x {args.steps})")
    if args.pairs and (args.against or args.floor):
        other, label = (args.against, extra), "this/other"
        if not args.against:
            other, label = (here, extra + ", bare=True"), "floor/this"
        rows = _pairs([(here, extra), other], args.block, args.steps, args.pairs)
        if not args.against:
            rows = [(b, a) for a, b in rows]
        for k in ("step", "forward"):
            ratios = sorted(a[k] / b[k] for a, b in rows)
            print(f"{what} {k}, {len(rows)} pairs: {label} median {statistics.median(ratios):.2f} "
                  f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}); medians {statistics.median(a[k] for a, _ in rows):.0f} "
                  f"vs {statistics.median(b[k] for _, b in rows):.0f} µs")


if __name__ == "__main__":
    main()
