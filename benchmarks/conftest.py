"""pytest set-up of the benchmark suite (``pytest benchmarks/ --benchmark-only``).

- Mode: on a CUDA machine the real shapes are timed; without one, TRITON_INTERPRET=1 is set
  here, before ``triton`` is first imported, and the suite runs in interpreter smoke mode (tiny
  shapes, rows labelled as saying nothing about speed, the run file written to a temporary
  folder and never under benchmarks/results/).
- ``--quick`` (or ``-m quick``) selects the quick subset (see ``cases.py``).
- ``--results-dir DIR``: where CUDA run files go, as ``DIR/<device-slug>/run-<date>-<commit>.json``
  (default: benchmarks/results). The file is rewritten after every row, so a session stopped by
  a timeout (``timeout -s INT`` lets pytest finish the session) keeps every row measured.
- ``--no-compile`` (or ``FUSEDRES_BENCH_COMPILE=0``): no torch.compile column (it costs about
  as much compile time as all the rest); ``--compile-cap-s S`` (or
  ``FUSEDRES_BENCH_COMPILE_CAP_S=S``): give up on a compilation that runs past S seconds.
- Order: the tests run in the order of :data:`ORDER` (block training steps first, the CUDA
  graph rows last), whatever the files' names, so that a time-boxed run measures the most
  important rows first.
- Every test wraps its whole measurement in ``benchmark.pedantic(..., rounds=1)`` so that
  pytest-benchmark's ``--benchmark-only`` selects it and its row lands in ``extra_info``
  (``--benchmark-json`` keeps them). pytest-benchmark's own table would only show the harness's
  wall time, compilation included, so it is replaced by the suite's rows at the end.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # time the working tree's fusedres, whatever is installed

import harness  # noqa: E402
import pytest  # noqa: E402

_SESSION = pytest.StashKey[harness.BenchSession]()
_START = time.monotonic()
#: Test functions in the order they run (stable within each: the parametrisation's order).
ORDER = ("test_block", "test_block_graph", "test_layer", "test_network", "test_network_graph")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fusedres benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="only the quick subset (bf16 block training steps, kernel roles, ResNet-164 step, "
                         "CUDA-graph steps of the CIFAR bottleneck blocks)")
    group.addoption("--results-dir", default=str(ROOT / "benchmarks" / "results"),
                    help="root of the CUDA run files (default: benchmarks/results)")
    group.addoption("--no-compile", action="store_true", default=False,
                    help="no torch.compile column (also FUSEDRES_BENCH_COMPILE=0)")
    group.addoption("--compile-cap-s", type=float, default=None,
                    help="give up on a torch.compile first call (compilation) after this many seconds "
                         "(also FUSEDRES_BENCH_COMPILE_CAP_S; default: no cap)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "quick: part of the --quick benchmark subset")
    cap = config.getoption("--compile-cap-s")
    config.stash[_SESSION] = harness.BenchSession(
        ROOT, Path(config.getoption("--results-dir")), quick=config.getoption("--quick"),
        compile_enabled=not config.getoption("--no-compile") and harness.env_flag("FUSEDRES_BENCH_COMPILE", True),
        compile_cap_s=cap if cap and cap > 0 else harness.env_seconds("FUSEDRES_BENCH_COMPILE_CAP_S"))


def _rank(item: pytest.Item) -> int:
    name = getattr(item, "originalname", None) or item.name.split("[")[0]
    return ORDER.index(name) if name in ORDER else len(ORDER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--quick"):
        deselected = [item for item in items if item.get_closest_marker("quick") is None]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if item.get_closest_marker("quick") is not None]
    items.sort(key=_rank)  # stable: each test's parametrisation order is kept


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_group_stats(config: pytest.Config, benchmarks: list, group_by: str) -> list:
    """No pytest-benchmark table: its numbers are harness wall time, not kernel time."""
    return []


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config) -> harness.BenchSession:
    """The session's mode, environment, ceilings and rows."""
    return pytestconfig.stash[_SESSION]


@pytest.fixture
def measure_case(benchmark: Any, bench: harness.BenchSession,
                 pytestconfig: pytest.Config) -> Callable[..., dict[str, Any]]:
    """``measure_case(**kwargs)``: :func:`harness.measure` under ``benchmark.pedantic``; records the
    row (pytest-benchmark extra_info and the run file, rewritten at once; on CUDA also one line on
    the terminal) and fails the test if an implementation raised."""

    def run(**kwargs: Any) -> dict[str, Any]:
        row, errors = benchmark.pedantic(harness.measure, args=(bench,), kwargs=kwargs, rounds=1, iterations=1)
        benchmark.extra_info.update(row)
        bench.add(row)
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        if bench.mode == harness.MODE_CUDA and reporter is not None:
            reporter.write_line(f"\n[{time.monotonic() - _START:6.0f} s] {harness.format_row(row)}")
        if errors:
            pytest.fail("; ".join(errors), pytrace=False)
        return row

    return run


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_SESSION].write(exitstatus=exitstatus)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    bench = config.stash[_SESSION]
    if not bench.rows:
        return
    tr = terminalreporter
    tr.section("fusedres benchmarks")
    if bench.mode != harness.MODE_CUDA:
        tr.write_line(f"{harness.MODE_SMOKE}: {len(bench.rows)} rows went through the harness; {harness.SMOKE_NOTE}, "
                      "so no timings are shown.")
        tr.write_line(f"run file (temporary, not a result): {bench.written}")
        return
    env = bench.env
    ceil = bench.ceilings or {}
    ceilings = (f"ceilings {ceil['bf16_matmul_tflops']:.0f} TFLOP/s bf16 matmul, {ceil['copy_gbps']:.0f} GB/s copy"
                if ceil.get("bf16_matmul_tflops") and ceil.get("copy_gbps") else f"no ceilings ({ceil.get('error')})")
    tr.write_line(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; {ceilings}; "
                  f"torch.compile {'on' if bench.compile else 'off'}"
                  + (f", capped at {bench.compile_cap_s:g} s" if bench.compile and bench.compile_cap_s else ""))
    tr.write_line("median ms (do_bench's method); speedup = baseline / fused: vs eager, vs torch.compile")
    for row in bench.rows:
        tr.write_line(harness.format_row(row))
    tr.write_line(f"run file: {bench.written}")
