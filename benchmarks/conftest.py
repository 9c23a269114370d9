"""pytest set-up of the benchmark suite (``pytest benchmarks/ --benchmark-only``).

- Mode: on a CUDA machine the real shapes are timed; without one, TRITON_INTERPRET=1 is set
  here, before ``triton`` is first imported, and the suite runs in interpreter smoke mode (tiny
  shapes, rows labelled as saying nothing about speed, the run file written to a temporary
  folder and never under benchmarks/results/).
- ``--quick`` (or ``-m quick``) selects the quick subset (see ``cases.py``).
- ``--results-dir DIR``: where CUDA run files go, as ``DIR/<device-slug>/run-<date>-<commit>.json``
  (default: benchmarks/results).
- Every test wraps its whole measurement in ``benchmark.pedantic(..., rounds=1)`` so that
  pytest-benchmark's ``--benchmark-only`` selects it and its row lands in ``extra_info``
  (``--benchmark-json`` keeps them). pytest-benchmark's own table would only show the harness's
  wall time, compilation included, so it is replaced by the suite's rows at the end.
"""

from __future__ import annotations

import os
import sys
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


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fusedres benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="only the quick subset (bf16 kernel roles, block training steps, ResNet-164 step)")
    group.addoption("--results-dir", default=str(ROOT / "benchmarks" / "results"),
                    help="root of the CUDA run files (default: benchmarks/results)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "quick: part of the --quick benchmark subset")
    config.stash[_SESSION] = harness.BenchSession(
        ROOT, Path(config.getoption("--results-dir")), quick=config.getoption("--quick"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--quick"):
        return
    deselected = [item for item in items if item.get_closest_marker("quick") is None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("quick") is not None]


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_group_stats(config: pytest.Config, benchmarks: list, group_by: str) -> list:
    """No pytest-benchmark table: its numbers are harness wall time, not kernel time."""
    return []


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config) -> harness.BenchSession:
    """The session's mode, environment, ceilings and rows."""
    return pytestconfig.stash[_SESSION]


@pytest.fixture
def measure_case(benchmark: Any, bench: harness.BenchSession) -> Callable[..., dict[str, Any]]:
    """``measure_case(**kwargs)``: :func:`harness.measure` under ``benchmark.pedantic``; records the
    row (pytest-benchmark extra_info and the run file) and fails the test if an implementation
    raised."""

    def run(**kwargs: Any) -> dict[str, Any]:
        row, errors = benchmark.pedantic(harness.measure, args=(bench,), kwargs=kwargs, rounds=1, iterations=1)
        benchmark.extra_info.update(row)
        bench.add(row)
        if errors:
            pytest.fail("; ".join(errors), pytrace=False)
        return row

    return run


def pytest_sessionfinish(session: pytest.Session) -> None:
    session.config.stash[_SESSION].write()


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
    ceil = bench.ceilings
    tr.write_line(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
                  f"ceilings {ceil['bf16_matmul_tflops']:.0f} TFLOP/s bf16 matmul, {ceil['copy_gbps']:.0f} GB/s copy")
    tr.write_line("median ms (do_bench); speedup = baseline / fused: vs eager, vs torch.compile")
    for row in bench.rows:
        tr.write_line(harness.format_row(row))
    tr.write_line(f"run file: {bench.written}")
