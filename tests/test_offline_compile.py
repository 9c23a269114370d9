"""Every kernel builds for sm_80/86/89/90 within each architecture's shared memory, no GPU needed.

Runs ``python -m fusedres.ops.offline`` in a subprocess with the Triton interpreter off (the
conftest turns it on in this process when there is no GPU). About two minutes on two cores
with an empty Triton cache; seconds once the cache holds the builds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fusedres.ops.configs import ConvConfig, all_conv_configs

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
# Opt-in maximum of shared memory per block, in bytes: A100; A10/A40/RTX 30; L4/L40/RTX 40; H100/H200;
# MI300 (gfx942, built with --amd when this triton can; a build it cannot make is reported "skipped").
SMEM_LIMITS = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448, "gfx942": 65536}
PER_CHANNEL_KERNELS = {
    "bn_stats_kernel",
    "bn_finalize_kernel",
    "bn_bwd_reduce_kernel",
    "bn_bwd_apply_kernel",
    "wgrad_reduce_kernel",
    "bn_relu_pool_kernel",
    "bn_relu_pool_bwd_kernel",
    "bn_add_relu_kernel",
    "bn_add_relu_bwd_kernel",
}


def test_every_kernel_compiles_within_shared_memory(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-m", "fusedres.ops.offline", "--arch", "80,86,89,90", "--amd", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    report = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"offline compile failed (exit {proc.returncode}):\n{report}"
    rows = json.loads(out.read_text())

    built = {
        (r["role"], ConvConfig(**r["config"]), getattr(torch, r["dtype"]), r["arch"])
        for r in rows
        if r["config"] is not None and r["stride"] == 1
    }
    missing = [
        (role, cfg, dtype, arch)
        for role, items in all_conv_configs().items()
        for cfg, dtype in items
        for arch in ARCHS
        if (role, cfg, dtype, arch) not in built
    ]
    assert not missing, f"{len(missing)} conv builds missing, e.g. {missing[:3]}"
    for arch in ARCHS:
        kernels = {r["role"] for r in rows if r["arch"] == arch}
        assert PER_CHANNEL_KERNELS <= kernels, f"{arch}: missing {PER_CHANNEL_KERNELS - kernels}"

    bad = [
        r for r in rows
        if (r["status"] != "ok" and not (r["arch"] == "gfx942" and r["status"] == "skipped"))
        or r["shared"] > SMEM_LIMITS[r["arch"]]
    ]
    assert not bad, "over the limit or not built:\n" + "\n".join(
        f"{r['role']} {r['dtype']} {r['tile']} stride {r['stride']} {r['arch']}: shared {r['shared']} "
        f"of {SMEM_LIMITS[r['arch']]}, {r['status']} {r['error'] or ''}"
        for r in bad
    )
