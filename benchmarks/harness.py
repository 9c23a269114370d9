"""Measurement and bookkeeping of the benchmark suite (the pytest files in this folder use it).

Timing, on CUDA: each implementation is called a few times first (Triton compilation,
torch.compile, cuDNN heuristics), then timed by ``triton.testing.do_bench``: CUDA events
around every call, the L2 cache cleared before each, the median kept. Inputs are rotated
among a few copies where one set would fit in L2. Gradients are set to None before every timed
call, as a training loop's ``zero_grad`` would.

Without CUDA the suite runs in *interpreter smoke* mode: the same code paths at tiny shapes
with the Triton interpreter on the CPU, one untimed and one timed call per implementation.
Such rows carry ``"mode": "interpreter-smoke"`` and a note that they say nothing about speed.

Each measured case becomes one row (fused, eager and torch.compile timings side by side, with
achieved TFLOP/s and GB/s against the card's measured ceilings); a :class:`BenchSession`
collects the rows and writes one run file,
``<results>/<device-slug>/run-<date>-<commit>.json``, at the end of the pytest session.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import json
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import triton
from triton.testing import do_bench

MODE_CUDA = "cuda"
MODE_SMOKE = "interpreter-smoke"
SMOKE_NOTE = "Triton interpreter on the CPU: exercises the harness, says nothing about speed"
RUN_FORMAT = "fusedres-bench-run/1"
#: Every row's timings come from the same three implementations, in this order.
IMPLS = ("fused", "eager", "compile")

_WARMUP_CALLS = 3  # untimed calls before do_bench: Triton/inductor compilation, cuDNN heuristics
_MAX_COPIES = 4


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


def _bench_ms(fn: Callable[[], object], grads: Sequence[torch.Tensor] = ()) -> float:
    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads) or None, return_mode="median"))


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """The card's measured floors: a bf16 8192³ matmul (TFLOP/s) and a 1 GiB device copy (GB/s,
    bytes read + written)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = _bench_ms(lambda: a @ b)
    src = torch.empty(2**30, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = _bench_ms(lambda: dst.copy_(src))
    return {"bf16_matmul_tflops": 2 * 8192**3 / mm_ms / 1e9, "copy_gbps": 2 * 2**30 / copy_ms / 1e6}


class BenchSession:
    """One pytest session of the suite: where it runs, the rows measured, and the run file.

    Args:
        root: the repository root (for the commit).
        results_root: the run file goes to ``results_root/<device-slug>/``; ignored in smoke
            mode, which writes to a fresh temporary folder instead.
        quick: whether this is the ``--quick`` subset (recorded in the run file).
    """

    def __init__(self, root: Path, results_root: Path, *, quick: bool) -> None:
        self.mode = mode()
        self.quick = quick
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
        self._ceilings: dict[str, float] | None = None

    @property
    def ceilings(self) -> dict[str, float] | None:
        """Measured once per session, at first use; None in smoke mode."""
        if self.mode != MODE_CUDA:
            return None
        if self._ceilings is None:
            self._ceilings = measure_ceilings(self.device)
            torch.cuda.empty_cache()  # give back the ceilings' 2.3 GB buffers
        return self._ceilings

    def copies(self, nbytes: int) -> int:
        """How many copies of an input set of ``nbytes`` to rotate so that consecutive calls never
        find their inputs in L2, even between do_bench's cache flushes (2 in smoke mode, to
        exercise the rotation)."""
        if self.mode != MODE_CUDA:
            return 2
        return max(1, min(_MAX_COPIES, math.ceil(2 * self.l2_bytes / max(nbytes, 1))))

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def run_file(self) -> Path:
        slug = device_slug(self.env["device"])
        stamp = self.env["date"].replace("-", "").replace(":", "").replace("T", "-").split("+")[0]
        if self.mode == MODE_CUDA:
            folder = self.results_root / slug
        else:
            folder = Path(tempfile.mkdtemp(prefix="fusedres-bench-smoke-")) / slug
        return folder / f"run-{stamp}-{self.env['commit']}.json"

    def write(self) -> Path | None:
        """Write the run file (nothing when no row was measured); returns its path."""
        if not self.rows:
            return None
        path = self.run_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": RUN_FORMAT, **self.env, "quick": self.quick, "ceilings": self._ceilings,
               "rows": self.rows}
        if self.mode != MODE_CUDA:
            doc["note"] = SMOKE_NOTE
        path.write_text(json.dumps(doc, indent=1) + "\n")
        self.written = path
        return path


def rotating(calls: Sequence[Callable[[], object]]) -> Callable[[], None]:
    """One callable that runs ``calls`` in turn, one per invocation (input rotation)."""
    it = itertools.cycle(calls)

    def call() -> None:
        next(it)()

    return call


def compiled(obj: Any) -> Any:
    """``torch.compile(obj)`` in the default mode, from a clean compile cache (so earlier cases
    cannot push this one into dynamic shapes or past the recompile limit)."""
    torch._dynamo.reset()
    return torch.compile(obj, dynamic=False)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Let fp32 convolutions and matmuls use TF32 (our kernels follow ``cudnn.allow_tf32``)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _clear(grads: Iterable[torch.Tensor]) -> None:
    for t in grads:
        t.grad = None


def time_ms(session: BenchSession, fn: Callable[[], object], grads: Sequence[torch.Tensor]) -> float:
    """Median milliseconds of ``fn`` (see the module docstring); in smoke mode the wall time of
    one call after one untimed call."""
    if session.mode != MODE_CUDA:
        _clear(grads)
        fn()
        _clear(grads)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(_WARMUP_CALLS):
        _clear(grads)
        fn()
    torch.cuda.synchronize(session.device)
    return _bench_ms(fn, grads)


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

    Returns:
        The row and the errors raised by implementations (the row records them too).
    """
    row: dict[str, Any] = {**session.env, "suite": suite, "case": case, "shape": shape, "dtype": dtype,
                           "pass": pass_name, "flops": flops, "min_bytes": min_bytes}
    errors: list[str] = []
    for name in IMPLS:
        impl = impls[name]
        row[f"{name}_ms"] = row[f"{name}_peak_mb"] = None
        if isinstance(impl, str):
            row[f"{name}_note"] = impl
            continue
        try:
            row[f"{name}_ms"] = time_ms(session, impl, grads)
            if peak:
                row[f"{name}_peak_mb"] = peak_mb(session, impl, grads)
        except Exception as e:  # a failed implementation is reported in its row, not hidden
            errors.append(f"{name}: {type(e).__name__}: {e}"[:400])
        finally:
            _clear(grads)
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
    if ceilings is not None:
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
    return (f"{row['case'][:38]:<38} {row['pass'][:20]:<20} {row['dtype']:<12} fused {ms(row['fused_ms'])} "
            f"eager {ms(row['eager_ms'])} compile {ms(row['compile_ms'])} ms  {x(row['speedup_vs_eager'])} "
            f"{x(row['speedup_vs_compile'])}  {tflops} {floor} {peak}".rstrip()
            + (f"  ERROR {row['error']}" if row["error"] else ""))
