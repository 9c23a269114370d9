"""Measurement and bookkeeping of the benchmark suite (the pytest files in this folder use it).

Timing, on CUDA: each implementation's first call is timed on its own (``<impl>_first_call_s``:
Triton compilation, torch.compile, cuDNN heuristics, CUDA-graph capture), then it is called
twice more and timed by ``triton.testing.do_bench``'s method (:func:`bench_ms`): CUDA events
around every call, the L2 cache cleared before each, the median kept. Inputs are rotated among a
few copies where one set would fit in L2. Gradients are set to None before every call, as a
training loop's ``zero_grad`` would (do_bench itself does so only in its timed loop, which a
``mode="reduce-overhead"`` step does not survive: see :func:`bench_ms`).

torch.compile: ``FUSEDRES_BENCH_COMPILE=0`` (or ``--no-compile``) leaves the compile column
out; ``FUSEDRES_BENCH_COMPILE_CAP_S=S`` (or ``--compile-cap-s S``) gives up on a compiled
implementation whose first call (the compilation) runs past S seconds, with a note in its row.

Without CUDA the suite runs in *interpreter smoke* mode: the same code paths at tiny shapes
with the Triton interpreter on the CPU, one call per implementation, whose wall time is the row's
figure (a second call would only double CI's time: the steady-state paths it would take — cached
weights and launch plans, the next input copy — are the unit tests' to check). Such rows carry
``"mode": "interpreter-smoke"`` and a note that they say nothing about speed.

Each measured case becomes one row (fused, eager and torch.compile timings side by side, with
achieved TFLOP/s and GB/s against the card's measured ceilings); a :class:`BenchSession`
collects the rows and (re)writes one run file,
``<results>/<device-slug>/run-<date>-<commit>.json``, after every row (atomically: a temporary
file, then ``os.replace``), so that a session stopped by a timeout keeps what it measured.
"""

from __future__ import annotations

import datetime
import gc
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import triton

MODE_CUDA = "cuda"
MODE_SMOKE = "interpreter-smoke"
SMOKE_NOTE = "Triton interpreter on the CPU: exercises the harness, says nothing about speed"
RUN_FORMAT = "fusedres-bench-run/1"
#: Every row's timings come from the same three implementations, in this order.
IMPLS = ("fused", "eager", "compile")

_WARMUP_CALLS = 3  # untimed calls before bench_ms (the first one timed apart): compilation, cuDNN heuristics
_GRAPH_WARMUP_CALLS = 3  # eager calls on a side stream before a CUDA graph is captured
_MAX_COPIES = 4
#: Why the compile column is empty in smoke mode.
SMOKE_COMPILE_NOTE = "not run in interpreter smoke mode: inductor on the CPU would be slow"


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment variable: 0/false/no/off or 1/true/yes/on (anything else: ``default``)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return default


def env_seconds(name: str) -> float | None:
    """A positive number of seconds from the environment, or None (unset, empty, 0 or not a number)."""
    try:
        value = float(os.environ.get(name, "") or 0)
    except ValueError:
        return None
    return value if value > 0 else None


def mode() -> str:
    """:data:`MODE_CUDA` when a GPU is visible, else :data:`MODE_SMOKE`."""
    return MODE_CUDA if torch.cuda.is_available() else MODE_SMOKE


def device_slug(name: str) -> str:
    """Folder name for a card: ``"NVIDIA H200"`` -> ``"h200"``, ``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``."""
    name = re.sub(r"^nvidia\s+", "", name.strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def git_commit(root: Path) -> str:
    """``FUSEDRES_COMMIT`` if set, else the short HEAD of ``root`` (``-dirty`` when the tree has
    changes), else ``"unknown"`` (a copy of the tree without ``.git``)."""
    env = os.environ.get("FUSEDRES_COMMIT")
    if env:
        return env
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


_L2_FLUSH_BYTES = 256 * 2**20  # what triton.testing.do_bench writes to clear the L2 cache
_MIN_REPEATS = 5


def bench_ms(fn: Callable[[], object], grads: Sequence[torch.Tensor] = (), warmup_ms: float = 25.0,
             rep_ms: float = 100.0) -> float:
    """Median milliseconds of ``fn`` on the current CUDA device, by ``triton.testing.do_bench``'s
    method (triton 3.6 to 3.8): one call; five calls, each after an L2 flush, to estimate the
    time; ``warmup_ms`` of untimed calls; then ``rep_ms`` of calls, each after an L2 flush, with
    CUDA events around it. Two differences: at least :data:`_MIN_REPEATS` timed calls (do_bench
    times a 60 ms step only once or twice), and ``grads`` are set to None before *every* call,
    outside the events. do_bench resets ``grad_to_none`` only in its timed loop, so its other
    calls accumulate into ``.grad``; under ``torch.compile(mode="reduce-overhead")`` a ``.grad``
    allocated by a CUDA graph is overwritten by the next replay, and accumulating into it is an
    error ("accessing gradient tensor output of CUDAGraphs that has been overwritten").
    """
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def call(flush_first: bool) -> None:
        _clear(grads)
        if flush_first:
            flush.zero_()
        fn()

    call(False)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        call(True)
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        call(False)
    n = max(_MIN_REPEATS, int(rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        _clear(grads)
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return float(statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)))


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """The card's measured floors: a bf16 8192³ matmul (TFLOP/s) and a 1 GiB device copy (GB/s,
    bytes read + written)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = bench_ms(lambda: a @ b)
    src = torch.empty(2**30, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    return {"bf16_matmul_tflops": 2 * 8192**3 / mm_ms / 1e9, "copy_gbps": 2 * 2**30 / copy_ms / 1e6}


class BenchSession:
    """One pytest session of the suite: where it runs, the rows measured, and the run file.

    Args:
        root: the repository root (for the commit).
        results_root: the run file goes to ``results_root/<device-slug>/``; ignored in smoke
            mode, which writes to a fresh temporary folder instead.
        quick: whether this is the ``--quick`` subset (recorded in the run file).
        compile_enabled: measure the torch.compile column (CUDA only).
        compile_cap_s: give up on a compiled implementation whose first call runs longer.
    """

    def __init__(self, root: Path, results_root: Path, *, quick: bool, compile_enabled: bool = True,
                 compile_cap_s: float | None = None) -> None:
        self.mode = mode()
        self.quick = quick
        #: whether the torch.compile column is measured at all (never in smoke mode)
        self.compile = compile_enabled and self.mode == MODE_CUDA
        #: give up on a compiled implementation whose first call runs past this many seconds
        self.compile_cap_s = compile_cap_s
        self._compile_wanted = compile_enabled
        self.exitstatus: int | None = None
        self.device = torch.device("cuda" if self.mode == MODE_CUDA else "cpu")
        self.rows: list[dict[str, Any]] = []
        self.written: Path | None = None
        if self.mode == MODE_CUDA:
            name = torch.cuda.get_device_name(self.device)
            self.l2_bytes = torch.cuda.get_device_properties(self.device).L2_cache_size
        else:
            name = "CPU (Triton interpreter)"
            self.l2_bytes = 0
        self.env: dict[str, Any] = {
            "mode": self.mode,
            "device": name,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "commit": git_commit(root),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self.results_root = results_root
        self._ceilings: dict[str, Any] | None = None
        self._run_file: Path | None = None

    @property
    def ceilings(self) -> dict[str, Any] | None:
        """Measured once per session, at first use; None in smoke mode. Should the measurement
        fail, both values are None and ``"error"`` says why (the rows then have no floor)."""
        if self.mode != MODE_CUDA:
            return None
        if self._ceilings is None:
            try:
                self._ceilings = measure_ceilings(self.device)
            except Exception as e:  # no floors is better than no rows
                self._ceilings = {"bf16_matmul_tflops": None, "copy_gbps": None,
                                  "error": f"{type(e).__name__}: {e}"[:400]}
            gc.collect()
            torch.cuda.empty_cache()  # give back the ceilings' 2.3 GB buffers
        return self._ceilings

    def compile_note(self) -> str | None:
        """Why the torch.compile column is not measured in this session, or None when it is."""
        if self.mode != MODE_CUDA:
            return SMOKE_COMPILE_NOTE
        if not self.compile:
            return "not run: torch.compile switched off (FUSEDRES_BENCH_COMPILE=0 or --no-compile)"
        return None

    def copies(self, nbytes: int) -> int:
        """How many copies of an input set of ``nbytes`` to rotate so that consecutive calls never
        find their inputs in L2, even between bench_ms's cache flushes (2 in smoke mode, to
        exercise the rotation)."""
        if self.mode != MODE_CUDA:
            return 2
        return max(1, min(_MAX_COPIES, math.ceil(2 * self.l2_bytes / max(nbytes, 1))))

    def add(self, row: dict[str, Any]) -> None:
        """Record a row and rewrite the run file with it."""
        self.rows.append(row)
        self.write()

    def run_file(self) -> Path:
        """The session's run file (the same path for every write of the session)."""
        if self._run_file is None:
            slug = device_slug(self.env["device"])
            stamp = self.env["date"].replace("-", "").replace(":", "").replace("T", "-").split("+")[0]
            if self.mode == MODE_CUDA:
                folder = self.results_root / slug
            else:
                folder = Path(tempfile.mkdtemp(prefix="fusedres-bench-smoke-")) / slug
            self._run_file = folder / f"run-{stamp}-{self.env['commit']}.json"
        return self._run_file

    def write(self, exitstatus: int | None = None) -> Path | None:
        """(Re)write the run file atomically (nothing when no row was measured); returns its path.

        ``exitstatus``: pytest's, at the end of the session; until then the file says
        ``"finished": false`` (a file left so was cut short, by a timeout say).
        """
        if exitstatus is not None:
            self.exitstatus = int(exitstatus)
        if not self.rows:
            return None
        path = self.run_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": RUN_FORMAT, **self.env, "quick": self.quick,
               "compile": self._compile_wanted, "compile_cap_s": self.compile_cap_s,
               "finished": self.exitstatus is not None, "exitstatus": self.exitstatus,
               "ceilings": self._ceilings, "rows": self.rows}
        if self.mode != MODE_CUDA:
            doc["note"] = SMOKE_NOTE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)
        self.written = path
        return path


def rotating(calls: Sequence[Callable[[], object]]) -> Callable[[], None]:
    """One callable that runs ``calls`` in turn, one per invocation (input rotation)."""
    it = itertools.cycle(calls)

    def call() -> None:
        next(it)()

    return call


def compiled(obj: Any, mode: str | None = None) -> Any:
    """``torch.compile(obj, mode=mode)`` (None: the default mode) from a clean compile cache (so
    earlier cases cannot push this one into dynamic shapes or past the recompile limit)."""
    torch._dynamo.reset()
    return torch.compile(obj, dynamic=False, mode=mode)


def cudagraph_skips() -> int:
    """How many times inductor has declined to CUDA-graph a compiled graph in this process
    (``mode="reduce-overhead"`` then runs without graphs; the reason goes to the log)."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled yet (and no import in smoke mode)
        return 0
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:  # a torch without the counter
        return 0


def cuda_graphed(session: BenchSession, calls: Sequence[Callable[[], object]],
                 grads: Sequence[torch.Tensor] = ()) -> Callable[[], None]:
    """One callable that replays a CUDA graph of each of ``calls`` in turn (input rotation), so
    that the timing leaves out the CPU's launch overhead.

    Captured at the first call (so that a failure lands in the row, and the capture in
    ``<impl>_first_call_s``): each call runs :data:`_GRAPH_WARMUP_CALLS` times eagerly on a side
    stream (compilation, cuDNN/cuBLAS workspaces), then is captured with the ``grads`` set to
    None, as after ``zero_grad()`` (a replay writes fresh gradients into the graph's memory
    instead of accumulating). The graphs share one memory pool; they are replayed one at a time,
    in the order they were captured. In smoke mode the calls run as they are (no graphs).
    """
    replays: list[Callable[[], object]] = []
    graphs: list[Any] = []  # keeps the graphs (and their memory) alive as long as the callable
    order: Iterator[Callable[[], object]] | None = None

    def capture() -> None:
        if session.mode != MODE_CUDA:
            replays.extend(calls)
            return
        current = torch.cuda.current_stream(session.device)
        side = torch.cuda.Stream(session.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for fn in calls:
                for _ in range(_GRAPH_WARMUP_CALLS):
                    _clear(grads)
                    fn()
        current.wait_stream(side)
        torch.cuda.synchronize(session.device)
        pool = None
        for fn in calls:
            graph = torch.cuda.CUDAGraph()
            _clear(grads)
            with torch.cuda.graph(graph, pool=pool):
                fn()
            pool = graph.pool()
            graphs.append(graph)
            replays.append(graph.replay)

    def call() -> None:
        nonlocal order
        if order is None:
            capture()
            order = itertools.cycle(replays)
            return
        next(order)()

    return call


def _clear(grads: Iterable[torch.Tensor]) -> None:
    for t in grads:
        t.grad = None


class FirstCallOverCap(Exception):
    """Raised (from SIGALRM) in the main thread when a capped first call runs too long."""


class _Cap:
    """``with _Cap(seconds):`` raises :class:`FirstCallOverCap` in the main thread once
    ``seconds`` have passed (no cap: None, outside the main thread, or without SIGALRM).

    Python runs the handler between bytecodes of the main thread, so work in C++ is interrupted
    only when it returns to Python: torch.compile's tracing and forward compilation stop on
    time; the backward's compilation (run by the autograd engine's device thread while the main
    thread waits in ``backward()``) is waited for. ``fired`` tells afterwards whether the cap was
    hit, also if the exception was swallowed or wrapped on the way out (dynamo wraps errors).
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.fired = False
        self._armed = bool(seconds) and hasattr(signal, "setitimer") \
            and threading.current_thread() is threading.main_thread()
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.fired = True
        raise FirstCallOverCap(f"first call ran past the {self.seconds:g} s cap")

    def __enter__(self) -> _Cap:
        if self._armed:
            self._old = signal.signal(signal.SIGALRM, self._handler)
            signal.setitimer(signal.ITIMER_REAL, float(self.seconds))  # type: ignore[arg-type]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)


def first_call_s(session: BenchSession, fn: Callable[[], object], grads: Sequence[torch.Tensor],
                 cap_s: float | None = None) -> tuple[float, bool]:
    """Wall seconds of the first call of ``fn`` (compilation, capture, heuristics included), and
    whether it ran past ``cap_s`` (then the call was interrupted where it could be; an error it
    raised after the cap fired is not re-raised)."""
    _clear(grads)
    if session.mode == MODE_CUDA:
        torch.cuda.synchronize(session.device)
    start = time.perf_counter()
    cap = _Cap(cap_s)
    try:
        with cap:
            fn()
            if session.mode == MODE_CUDA:
                torch.cuda.synchronize(session.device)
    except Exception:
        if not cap.fired:
            raise
    return time.perf_counter() - start, cap.fired


def time_ms(session: BenchSession, fn: Callable[[], object], grads: Sequence[torch.Tensor]) -> float:
    """Median milliseconds of ``fn`` after its first call (see the module docstring); off CUDA
    the wall time of one call (the suite's smoke rows take their first call's instead)."""
    if session.mode != MODE_CUDA:
        _clear(grads)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(_WARMUP_CALLS - 1):
        _clear(grads)
        fn()
    torch.cuda.synchronize(session.device)
    return bench_ms(fn, grads)


def peak_mb(session: BenchSession, fn: Callable[[], object], grads: Sequence[torch.Tensor]) -> float | None:
    """``torch.cuda.max_memory_allocated`` during one call of ``fn``, above what was allocated
    before it (parameters, inputs); None off CUDA."""
    if session.mode != MODE_CUDA:
        return None
    _clear(grads)
    torch.cuda.synchronize(session.device)
    base = torch.cuda.memory_allocated(session.device)
    torch.cuda.reset_peak_memory_stats(session.device)
    fn()
    torch.cuda.synchronize(session.device)
    return (torch.cuda.max_memory_allocated(session.device) - base) / 2**20


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` (convolutions and matmuls, forward and backward) by
    ``torch.utils.flop_counter``; run it on the eager implementation."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def nbytes(*tensors: torch.Tensor) -> int:
    """Total bytes of ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(
    session: BenchSession,
    *,
    suite: str,
    case: str,
    shape: str,
    dtype: str,
    pass_name: str,
    impls: dict[str, Callable[[], object] | str],
    flops: float,
    min_bytes: int,
    grads: Sequence[torch.Tensor] = (),
    peak: bool = False,
    extra: Callable[[], dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Time each implementation of one case and build its row.

    Args:
        impls: ``"fused"``, ``"eager"``, ``"compile"`` -> the callable to time, or a string
            saying why that implementation is not measured here.
        flops: floating-point operations of one call (for TFLOP/s).
        min_bytes: compulsory traffic of one call: every input read once, every output written
            once (for GB/s and the memory floor).
        grads: tensors whose ``.grad`` is reset before every call.
        peak: also record the peak memory of one call (training steps).
        extra: called after the timings; its fields are added to the row.

    Returns:
        The row and the errors raised by implementations (the row records them too).
    """
    row: dict[str, Any] = {**session.env, "suite": suite, "case": case, "shape": shape, "dtype": dtype,
                           "pass": pass_name, "flops": flops, "min_bytes": min_bytes}
    errors: list[str] = []
    for name in IMPLS:
        impl = impls[name]
        row[f"{name}_ms"] = row[f"{name}_peak_mb"] = row[f"{name}_first_call_s"] = None
        if isinstance(impl, str):
            row[f"{name}_note"] = impl
            continue
        cap = session.compile_cap_s if name == "compile" else None
        try:
            first, over = first_call_s(session, impl, grads, cap)
            row[f"{name}_first_call_s"] = first
            if over:
                row[f"{name}_note"] = (f"not timed: its first call (compilation) was stopped after {first:.0f} s, "
                                       f"past the {cap:g} s cap (FUSEDRES_BENCH_COMPILE_CAP_S)")
                torch._dynamo.reset()
                continue
            # smoke: the first call's time (see the module docstring); CUDA: timed after it
            row[f"{name}_ms"] = first * 1e3 if session.mode != MODE_CUDA else time_ms(session, impl, grads)
            if peak:
                row[f"{name}_peak_mb"] = peak_mb(session, impl, grads)
        except Exception as e:  # a failed implementation is reported in its row, not hidden
            errors.append(f"{name}: {type(e).__name__}: {e}"[:400])
        finally:
            _clear(grads)
    if extra is not None:
        try:
            row.update(extra())
        except Exception as e:
            errors.append(f"extra: {type(e).__name__}: {e}"[:400])
    row["error"] = "; ".join(errors) or None
    _derive(row, session.ceilings)
    if session.mode != MODE_CUDA:
        row["note"] = SMOKE_NOTE
    gc.collect()
    if session.mode == MODE_CUDA:
        torch.cuda.empty_cache()
    return row, errors


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _derive(row: dict[str, Any], ceilings: dict[str, float] | None) -> None:
    """Speedups (baseline ms / fused ms), achieved TFLOP/s and GB/s, and the fused time's share of
    the roofline floor max(flops / matmul peak, bytes / copy bandwidth)."""
    fused = row["fused_ms"]
    row["speedup_vs_eager"] = _ratio(row["eager_ms"], fused)
    row["speedup_vs_compile"] = _ratio(row["compile_ms"], fused)
    for name in IMPLS:
        ms = row[f"{name}_ms"]
        row[f"{name}_tflops"] = _ratio(row["flops"] / 1e9, ms) if row["flops"] else None
        row[f"{name}_gbps"] = _ratio(row["min_bytes"] / 1e6, ms) if row["min_bytes"] else None
    row["floor_ms"] = row["fused_share_of_floor"] = None
    if ceilings is not None and ceilings.get("bf16_matmul_tflops") and ceilings.get("copy_gbps"):
        row["floor_ms"] = max(row["flops"] / ceilings["bf16_matmul_tflops"] / 1e9,
                              row["min_bytes"] / ceilings["copy_gbps"] / 1e6)
        row["fused_share_of_floor"] = _ratio(row["floor_ms"], fused)


def format_row(row: dict[str, Any]) -> str:
    """One terminal line of a CUDA row (never used for smoke rows)."""

    def ms(v: float | None) -> str:
        return f"{v:8.3f}" if v is not None else "       -"

    def x(v: float | None) -> str:
        return f"{v:5.2f}x" if v is not None else "     -"

    tflops = f"{row['fused_tflops']:6.1f} TFLOP/s" if row["fused_tflops"] is not None else ""
    floor = f"{100 * row['fused_share_of_floor']:5.1f}% of floor" if row["fused_share_of_floor"] is not None else ""
    peak = (f"peak {row['fused_peak_mb']:.0f}/{row['eager_peak_mb']:.0f} MB"
            if row["fused_peak_mb"] is not None and row["eager_peak_mb"] is not None else "")
    first = "1st call " + "/".join("-" if row.get(f"{name}_first_call_s") is None
                                   else f"{row[f'{name}_first_call_s']:.1f}" for name in IMPLS) + " s"
    return (f"{row['case'][:38]:<38} {row['pass'][:22]:<22} {row['dtype']:<12} fused {ms(row['fused_ms'])} "
            f"eager {ms(row['eager_ms'])} compile {ms(row['compile_ms'])} ms  {x(row['speedup_vs_eager'])} "
            f"{x(row['speedup_vs_compile'])}  {tflops} {floor} {peak} {first}".rstrip()
            + (f"  ERROR {row['error']}" if row["error"] else ""))
