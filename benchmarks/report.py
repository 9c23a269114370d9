"""Summarise saved benchmark runs into summary.json, summary.md and speedups.png.

    python benchmarks/report.py [--results benchmarks/results] [--out benchmarks/results]

Reads every ``<results>/<device>/run-*.json`` written by ``pytest benchmarks/ --benchmark-only``
and the per-script files of the earlier measurements, ``<results>/<device>/layers.json``,
``blocks.json`` and ``resnet50.json``. Interpreter smoke runs are left out (they say nothing about speed). Where one
(device, suite, case, dtype, pass) was measured more than once, the newest row is kept.

speedup = baseline ms / fused ms, so > 1 means the fused code is faster; eager is PyTorch eager
(cuDNN), compile is that same eager code under ``torch.compile``. Rows of the pass
``train step, CUDA graph`` are training steps replayed from CUDA graphs (fused and eager; compile
= ``mode="reduce-overhead"``); summary.md sets each beside the plain training step of the same
case (launch overhead = plain ms - graph ms). Run files cut short (a timeout: killed, or
interrupted) are read like the others, their source marked "(cut short)". Needs only the
standard library; the chart needs matplotlib (without it the chart is skipped with a message).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any

RUN_FORMAT = "fusedres-bench-run/1"
SMOKE_MODE = "interpreter-smoke"
#: pytest's exit status of a session stopped by SIGINT / KeyboardInterrupt (pytest.ExitCode.INTERRUPTED).
INTERRUPTED = 2
SUITES = ("layers", "blocks", "networks")
TRAIN_PASS = "train step (fwd+bwd)"
#: The training step replayed from CUDA graphs (benchmarks/cases.py GRAPH).
GRAPH_PASS = "train step, CUDA graph"
#: The fields of every summary row, in order.
FIELDS = (
    "suite", "case", "dtype", "pass", "fused_ms", "eager_ms", "compile_ms", "speedup_vs_eager", "speedup_vs_compile",
    "fused_peak_mb", "eager_peak_mb", "fused_tflops", "fused_share_of_floor", "fused_first_call_s",
    "eager_first_call_s", "compile_first_call_s", "compile_note", "device", "torch", "triton", "commit", "date",
    "source", "error",
)
#: Files of the scripts that preceded the suite (benchmarks/layers.py, blocks.py, resnet50.py).
LEGACY_FILES = ("layers.json", "blocks.json", "resnet50.json")
#: resnet50.json's pass names -> the suite's, so that the suite's newer rows replace them.
RESNET50_PASSES = {"training step (fwd+bwd)": "train step (fwd+bwd)", "inference (eval, no_grad)": "eval forward"}
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def _num(value: Any) -> float | None:
    """A finite float, or None (missing values, and the NaN that older files wrote for failures)."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _summary_row(raw: dict[str, Any], env: dict[str, Any], source: str, **overrides: Any) -> dict[str, Any]:
    merged = {**env, **raw, **overrides}
    row = {name: merged.get(name) for name in FIELDS}
    for name in ("fused_ms", "eager_ms", "compile_ms", "fused_peak_mb", "eager_peak_mb", "fused_tflops",
                 "fused_share_of_floor", "fused_first_call_s", "eager_first_call_s", "compile_first_call_s"):
        row[name] = _num(row[name])
    row["speedup_vs_eager"] = _ratio(row["eager_ms"], row["fused_ms"])
    row["speedup_vs_compile"] = _ratio(row["compile_ms"], row["fused_ms"])
    row["source"] = source
    return row


def _env(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc.get(k) for k in ("device", "torch", "triton", "commit", "date")}


def rows_from_file(path: Path, source: str) -> tuple[list[dict[str, Any]], str | None]:
    """Summary rows of one saved file, or ([], why it was left out)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [], f"{source}: unreadable ({type(e).__name__}: {e})"
    env = _env(doc)
    if path.name.startswith("run-"):
        if doc.get("format") != RUN_FORMAT:
            return [], f"{source}: not a {RUN_FORMAT} file"
        if doc.get("mode") != "cuda":
            return [], f"{source}: {doc.get('mode')} run (says nothing about speed)"
        # rewritten after every row: "finished" stays false if the session was killed; a SIGINT
        # (gpu_check.sh's timeouts) lets pytest finish with exit status 2 (interrupted)
        if doc.get("finished") is False or doc.get("exitstatus") == INTERRUPTED:
            source += " (cut short)"
        return [_summary_row(r, env, source) for r in doc["rows"]], None
    if path.name == "layers.json":  # benchmarks/layers.py: one role per row against a cuDNN baseline
        return [_summary_row(r, env, source, suite="layers", case=r["shape"], **{"pass": r["role"]},
                             eager_ms=r["baseline_ms"]) for r in doc["rows"]], None
    if path.name == "resnet50.json":  # benchmarks/resnet50.py: images/s of converted vs original
        case = f"torchvision resnet50 converted vs original 224^2 N{doc['batch']}"
        return [_summary_row(r, env, source, suite="networks", case=case, dtype=doc["dtype"],
                             **{"pass": RESNET50_PASSES.get(r["pass"], r["pass"])},
                             fused_ms=doc["batch"] / r["fused_img_s"] * 1e3,
                             eager_ms=doc["batch"] / r["eager_img_s"] * 1e3) for r in doc["rows"]], None
    # blocks.json, from benchmarks/blocks.py
    return [_summary_row(r, env, source, suite="blocks") for r in doc["rows"]], None


def load(results: Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """All summary rows under ``results`` (newest per key), the files read, and the files left out."""
    found: list[tuple[str, list[dict[str, Any]]]] = []
    sources: list[str] = []
    skipped: list[str] = []
    for device_dir in sorted(p for p in results.iterdir() if p.is_dir()):
        files = sorted(device_dir.glob("run-*.json")) + [device_dir / n for n in LEGACY_FILES]
        for path in files:
            if not path.is_file():
                continue
            source = str(path.relative_to(results))
            rows, why = rows_from_file(path, source)
            if why:
                skipped.append(why)
                continue
            sources.append(rows[0]["source"] if rows else source)
            if rows:
                found.append((rows[0]["date"] or "", rows))
    latest: dict[tuple, dict[str, Any]] = {}
    for _, rows in sorted(found, key=lambda item: item[0]):  # oldest first: newer rows overwrite
        for row in rows:
            latest[(row["device"], row["suite"], row["case"], row["dtype"], row["pass"])] = row
    order = {s: i for i, s in enumerate(SUITES)}
    rows = sorted(latest.values(), key=lambda r: (r["device"] or "", order.get(r["suite"], len(SUITES))))
    return rows, sources, skipped


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def to_markdown(rows: list[dict[str, Any]], sources: list[str], skipped: list[str], chart: bool) -> str:
    """The summary as markdown: one table per card."""
    lines = [
        "# fusedres benchmarks — summary",
        "",
        "speedup = baseline ms / fused ms (> 1: fused is faster). eager = PyTorch eager (cuDNN, channels_last, "
        "same dtype); compile = the same eager code under `torch.compile` (default mode). Times are medians of "
        "`triton.testing.do_bench`'s method (L2 flushed before each call, gradients set to None); "
        "peak = `torch.cuda.max_memory_allocated` above the inputs during one step; "
        "floor = max(FLOPs / bf16 matmul peak, compulsory bytes / copy bandwidth), both measured on the card. "
        f"`{GRAPH_PASS}` rows replay the step from CUDA graphs (fused and eager); their compile column is "
        "`torch.compile(mode=\"reduce-overhead\")`. compile 1st s = the compiled code's first call "
        "(compilation) in seconds.",
        "",
        f"Sources: {', '.join(f'`{s}`' for s in sources) or 'none'}.",
    ]
    if any(Path(s).name in LEGACY_FILES for s in sources):
        lines.append("")
        lines.append("`layers.json`, `blocks.json` and `resnet50.json` come from the scripts that preceded the suite: "
                     "they have no torch.compile timings, their `fprop+bnrelu` baseline also computed the batch "
                     "statistics (the suite gives both sides the same statistics), and resnet50.json's training "
                     "loss was a mean square (the suite's is cross-entropy).")
    if skipped:
        lines.append("")
        lines.append(f"Left out: {'; '.join(skipped)}.")
    if chart:
        lines += ["", "![speedups](speedups.png)"]
    for device in dict.fromkeys(r["device"] for r in rows):
        dev_rows = [r for r in rows if r["device"] == device]
        versions = sorted({f"torch {r['torch']}, triton {r['triton']}" for r in dev_rows})
        commits = sorted({str(r["commit"]) for r in dev_rows})
        dates = sorted(str(r["date"]) for r in dev_rows)
        lines += [
            "",
            f"## {device}",
            "",
            f"{'; '.join(versions)}; commits {', '.join(commits)}; measured {dates[0][:10]} to {dates[-1][:10]}.",
            "",
            "| suite | case | dtype | pass | fused ms | eager ms | compile ms | vs eager | vs compile "
            "| fused peak MB | eager peak MB | fused TFLOP/s | % of floor | compile 1st s |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in dev_rows:
            share = None if r["fused_share_of_floor"] is None else 100 * r["fused_share_of_floor"]
            lines.append(
                f"| {r['suite']} | {r['case']} | {r['dtype']} | {r['pass']} | {_fmt(r['fused_ms'], '.3f')} "
                f"| {_fmt(r['eager_ms'], '.3f')} | {_fmt(r['compile_ms'], '.3f')} "
                f"| {_fmt(r['speedup_vs_eager'], '.2f')} | {_fmt(r['speedup_vs_compile'], '.2f')} "
                f"| {_fmt(r['fused_peak_mb'], '.0f')} | {_fmt(r['eager_peak_mb'], '.0f')} "
                f"| {_fmt(r['fused_tflops'], '.1f')} | {_fmt(share, '.1f')} "
                f"| {_fmt(r['compile_first_call_s'], '.0f')} |"
                + (f" error: {r['error']}" if r["error"] else "")
            )
        lines += _graph_table(dev_rows)
    return "\n".join(lines) + "\n"


def _overhead(plain: float | None, graph: float | None) -> str:
    """Launch overhead: plain - graph ms, and its share of the plain time."""
    if plain is None or graph is None:
        return "—"
    return f"{plain - graph:.3f} ({100 * (plain - graph) / plain:.0f}%)"


def _graph_table(dev_rows: list[dict[str, Any]]) -> list[str]:
    """One card's CUDA-graph rows beside the plain training steps of the same cases."""
    plain = {(r["suite"], r["case"], r["dtype"]): r for r in dev_rows if r["pass"] == TRAIN_PASS}
    graphs = [r for r in dev_rows if r["pass"] == GRAPH_PASS]
    if not graphs:
        return []
    lines = [
        "",
        "### Launch overhead (CUDA graphs)",
        "",
        "Training steps replayed from CUDA graphs beside the same steps launched from Python: overhead = "
        "launched ms - graph ms (share of the launched time). graph vs eager = eager graph ms / fused graph ms; "
        "vs reduce-overhead = `torch.compile(mode=\"reduce-overhead\")` ms / fused graph ms.",
        "",
        "| suite | case | dtype | fused ms | fused graph ms | fused overhead ms | eager ms | eager graph ms "
        "| eager overhead ms | graph vs eager | reduce-overhead ms | vs reduce-overhead |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in graphs:
        p = plain.get((g["suite"], g["case"], g["dtype"]), {})
        lines.append(
            f"| {g['suite']} | {g['case']} | {g['dtype']} | {_fmt(p.get('fused_ms'), '.3f')} "
            f"| {_fmt(g['fused_ms'], '.3f')} | {_overhead(p.get('fused_ms'), g['fused_ms'])} "
            f"| {_fmt(p.get('eager_ms'), '.3f')} | {_fmt(g['eager_ms'], '.3f')} "
            f"| {_overhead(p.get('eager_ms'), g['eager_ms'])} | {_fmt(g['speedup_vs_eager'], '.2f')} "
            f"| {_fmt(g['compile_ms'], '.3f')} | {_fmt(g['speedup_vs_compile'], '.2f')} |"
        )
    return lines


def _label(row: dict[str, Any]) -> str:
    return f"{row['suite']}: {row['case']} | {row['pass']} | {row['dtype']}"


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Horizontal bars of the speedups vs eager and vs torch.compile per case, one colour per card.
    Returns False (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from matplotlib.ticker import FixedLocator, NullFormatter

    labels = list(dict.fromkeys(_label(r) for r in rows))
    devices = list(dict.fromkeys(r["device"] for r in rows))
    index = {label: i for i, label in enumerate(labels)}
    height = 0.8 / max(len(devices), 1)
    values = [r[k] for r in rows for k in ("speedup_vs_eager", "speedup_vs_compile") if r[k]]
    span = 1.15 * max([2.0] + [max(v, 1 / v) for v in values])
    ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if 1 / span <= t <= span]
    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(16, 1.5 + 0.3 * len(labels)))
    for ax, key, title in ((axes[0], "speedup_vs_eager", "fused vs eager PyTorch"),
                           (axes[1], "speedup_vs_compile", "fused vs torch.compile")):
        drawn = False
        for d, device in enumerate(devices):
            pts = [(index[_label(r)], r[key]) for r in rows if r["device"] == device and r[key] is not None]
            if pts:  # bars grow from 1: right of it the fused code is faster, left of it slower
                ax.barh([i + (d - (len(devices) - 1) / 2) * height for i, _ in pts], [v - 1 for _, v in pts],
                        left=1, height=height, label=device, color=f"C{d}")
                drawn = True
        if not drawn:
            ax.text(1, len(labels) / 2, "no timings in these runs", ha="center", va="center")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(1 / span, span)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.set_xticklabels([f"{t:g}x" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{title}\n(baseline ms / fused ms; > 1: fused faster)")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.legend(loc="upper left", fontsize=8, title="card")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="folder of <device>/run-*.json (default: benchmarks/results)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the summary (default: --results)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"report: no results folder {args.results}", file=sys.stderr)
        return 1
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    rows, sources, skipped = load(args.results)
    for why in skipped:
        print(f"left out {why}")
    summary = {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sources": sources, "skipped": skipped, "rows": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    chart = bool(rows) and plot(rows, out / "speedups.png")
    if rows and not chart:
        print("matplotlib is not installed: speedups.png not written (pip install matplotlib)")
    (out / "summary.md").write_text(to_markdown(rows, sources, skipped, chart))
    print(f"{len(rows)} rows from {len(sources)} files -> {out / 'summary.json'}, {out / 'summary.md'}"
          + (f", {out / 'speedups.png'}" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
