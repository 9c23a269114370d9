"""benchmarks/report.py: saved runs (the suite's run files and the earlier layers.json) become
summary.json, summary.md and speedups.png; interpreter smoke runs are left out; CUDA-graph rows
are set beside the plain training steps. Also: the suite's run file is rewritten after every
row (benchmarks/harness.py), so a run cut short still leaves a file the report reads."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"
FIELDS = ("case", "dtype", "pass", "fused_ms", "eager_ms", "compile_ms", "speedup_vs_eager", "speedup_vs_compile",
          "fused_peak_mb", "eager_peak_mb", "device", "torch", "triton", "commit", "date")
ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0"}


def _run_file(mode: str, commit: str, date: str, rows: list[dict]) -> dict:
    return {"format": "fusedres-bench-run/1", "mode": mode, **ENV, "commit": commit, "date": date, "quick": True,
            "ceilings": None, "rows": [{**ENV, "commit": commit, "date": date, **r} for r in rows]}


def _row(case: str, fused: float, eager: float, compile_ms: float | None, **extra: object) -> dict:
    return {"suite": "blocks", "case": case, "dtype": "bfloat16", "pass": "train step (fwd+bwd)", "fused_ms": fused,
            "eager_ms": eager, "compile_ms": compile_ms, "fused_peak_mb": 100.0, "eager_peak_mb": 150.0,
            "error": None, **extra}


GRAPH = "train step, CUDA graph"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved results for one card (two runs, one superseding a row of the other, an earlier-script
    layers.json, and a smoke run) summarised into <tmp>/out."""
    tmp_path = tmp_path_factory.mktemp("report")
    results = tmp_path / "results"
    card = results / "h100-80gb-hbm3"
    card.mkdir(parents=True)
    old = _run_file("cuda", "aaaaaaa", "2026-11-01T10:00:00+00:00",
                    [_row("block A", 2.0, 1.0, 1.5), _row("block B", 1.0, 2.0, None)])
    new = _run_file("cuda", "bbbbbbb", "2026-11-02T10:00:00+00:00", [
        _row("block A", 1.0, 1.5, 1.2, compile_first_call_s=42.4),
        _row("block A", 0.8, 1.0, 1.2, **{"pass": GRAPH, "fused_peak_mb": None, "eager_peak_mb": None}),
    ])
    new["finished"] = False  # cut short by a timeout: still read
    smoke = _run_file("interpreter-smoke", "ccccccc", "2026-11-03T10:00:00+00:00", [_row("block A", 500.0, 1.0, None)])
    (card / "run-20261101-100000-aaaaaaa.json").write_text(json.dumps(old))
    (card / "run-20261102-100000-bbbbbbb.json").write_text(json.dumps(new))
    (card / "run-20261103-100000-ccccccc.json").write_text(json.dumps(smoke))
    layers = {**ENV, "commit": "9999999", "date": "2026-10-01T00:00:00+00:00", "ceilings": {}, "rows": [
        {"shape": "3x3 64->64 56^2 N256", "role": "fprop", "dtype": "bfloat16", "fused_ms": 0.2, "baseline_ms": 0.1,
         "fused_tflops": 200.0, "error": None},
        {"shape": "3x3 64->64 56^2 N256", "role": "dgrad", "dtype": "bfloat16", "fused_ms": float("nan"),
         "baseline_ms": float("nan"), "fused_tflops": float("nan"), "error": "RuntimeError: boom"},
    ]}
    (card / "layers.json").write_text(json.dumps(layers))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPORT), "--results", str(results), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_summary_json(report: Path) -> None:
    summary = json.loads((report / "summary.json").read_text())
    rows = {(r["suite"], r["case"], r["pass"]): r for r in summary["rows"]}
    assert len(rows) == len(summary["rows"]) == 5  # block A (newest) and its graph row, block B, two layer roles
    for row in summary["rows"]:
        assert set(FIELDS) <= set(row)
    a = rows[("blocks", "block A", "train step (fwd+bwd)")]
    assert (a["commit"], a["fused_ms"], a["eager_ms"], a["compile_ms"]) == ("bbbbbbb", 1.0, 1.5, 1.2)
    assert a["compile_first_call_s"] == 42.4
    g = rows[("blocks", "block A", GRAPH)]
    assert g["fused_ms"] == 0.8 and g["speedup_vs_eager"] == pytest.approx(1.25)
    assert a["speedup_vs_eager"] == pytest.approx(1.5) and a["speedup_vs_compile"] == pytest.approx(1.2)
    assert a["device"] == ENV["device"] and a["torch"] == ENV["torch"] and a["triton"] == ENV["triton"]
    b = rows[("blocks", "block B", "train step (fwd+bwd)")]
    assert b["compile_ms"] is None and b["speedup_vs_compile"] is None and b["speedup_vs_eager"] == pytest.approx(2)
    fprop = rows[("layers", "3x3 64->64 56^2 N256", "fprop")]
    assert fprop["eager_ms"] == 0.1 and fprop["speedup_vs_eager"] == pytest.approx(0.5)
    failed = rows[("layers", "3x3 64->64 56^2 N256", "dgrad")]
    assert failed["fused_ms"] is None and failed["speedup_vs_eager"] is None and failed["error"]
    assert any("interpreter-smoke" in s for s in summary["skipped"])
    assert not any("ccccccc" in s for s in summary["sources"])
    assert "h100-80gb-hbm3/run-20261102-100000-bbbbbbb.json (cut short)" in summary["sources"]
    assert a["source"].endswith("(cut short)") and b["source"] == "h100-80gb-hbm3/run-20261101-100000-aaaaaaa.json"


def test_summary_markdown(report: Path) -> None:
    md = (report / "summary.md").read_text()
    assert f"## {ENV['device']}" in md
    assert "| suite | case | dtype | pass | fused ms | eager ms | compile ms | vs eager | vs compile |" in md
    assert "| blocks | block A | bfloat16 | train step (fwd+bwd) | 1.000 | 1.500 | 1.200 | 1.50 | 1.20 |" in md
    assert "| 42 |" in md.split("block A | bfloat16 | train step (fwd+bwd)")[1].splitlines()[0]
    assert f"| blocks | block A | bfloat16 | {GRAPH} | 0.800 | 1.000 | 1.200 | 1.25 | 1.50 |" in md
    # the graph row beside the plain step: overhead = plain - graph (share of plain)
    launch = md.split("### Launch overhead (CUDA graphs)")[1]
    assert ("| blocks | block A | bfloat16 | 1.000 | 0.800 | 0.200 (20%) | 1.500 | 1.000 | 0.500 (33%) | 1.25 "
            "| 1.200 | 1.50 |") in launch
    assert "block B" not in launch
    assert "| layers | 3x3 64->64 56^2 N256 | bfloat16 | fprop | 0.200 | 0.100 | — | 0.50 | — |" in md
    assert "ccccccc" not in md.split("Left out")[0]


def test_interrupted_run_is_marked_cut_short(tmp_path: Path) -> None:
    """gpu_check.sh stops a stage with SIGINT: pytest then finishes its session (finished true) with
    exit status 2, and the report marks the run as cut short, as one killed before it finished."""
    card = tmp_path / "results" / "h100-80gb-hbm3"
    card.mkdir(parents=True)
    for commit, day, exitstatus in (("aaaaaaa", 1, 2), ("bbbbbbb", 2, 0)):
        doc = _run_file("cuda", commit, f"2026-11-0{day}T10:00:00+00:00", [_row(f"block {commit}", 1.0, 1.0, None)])
        (card / f"run-2026110{day}-100000-{commit}.json").write_text(
            json.dumps({**doc, "finished": True, "exitstatus": exitstatus}))
    proc = subprocess.run([sys.executable, str(REPORT), "--results", str(tmp_path / "results"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sources = json.loads((tmp_path / "out" / "summary.json").read_text())["sources"]
    assert sources == ["h100-80gb-hbm3/run-20261101-100000-aaaaaaa.json (cut short)",
                       "h100-80gb-hbm3/run-20261102-100000-bbbbbbb.json"]


def test_speedups_png(report: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: report.py writes no chart (pip install matplotlib)")
    png = report / "speedups.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_file_written_after_every_row(tmp_path: Path) -> None:
    """A session's run file exists, complete and atomically replaced, after each row: a session
    killed by a timeout keeps what it measured; the end of the session marks it finished."""
    sys.path.insert(0, str(REPORT.parent))
    try:
        import harness
    finally:
        sys.path.remove(str(REPORT.parent))
    bench = harness.BenchSession(tmp_path, tmp_path / "results", quick=True, compile_enabled=False)
    assert bench.write() is None  # no rows: no file
    bench.add({"case": "a"})
    path = bench.written
    assert path is not None and path.is_file()
    doc = json.loads(path.read_text())
    assert [r["case"] for r in doc["rows"]] == ["a"] and doc["finished"] is False and doc["compile"] is False
    bench.add({"case": "b"})
    assert bench.written == path and [r["case"] for r in json.loads(path.read_text())["rows"]] == ["a", "b"]
    bench.write(exitstatus=2)  # e.g. interrupted
    doc = json.loads(path.read_text())
    assert doc["finished"] is True and doc["exitstatus"] == 2 and len(doc["rows"]) == 2
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
