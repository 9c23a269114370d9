"""Every kernel builds for sm_80/86/89/90 within each architecture's shared memory, no GPU needed.

Runs ``python -m fusedres.ops.offline --lean`` in a subprocess with the Triton interpreter off
(the conftest turns it on in this process when there is no GPU): every build for sm_80 but the
pointer convolutions' fp16 ones other than each role's largest config, sm_90's without fp16 in
the pointer kernels (fp16 and bf16 take the same shared memory: checked on sm_80's builds here),
for sm_86 bf16 only and each pointer convolution in its largest config (sm_86's shared memory is
sm_80's: same TritonGPU IR, which those builds check here; sm_89 takes the same IR again, with
sm_86's limit, against which sm_80's rows of every config are checked), fp32 and bf16 for gfx942,
its pointer convolutions in their largest configs (``offline.LEAN_LARGEST_ONLY`` says why those
bound the others' shared memory; ``offline.in_lean_set``). About 440 builds, a large part of
CI's time with an empty Triton cache (about 1.5 s of CPU each on this 2-core machine); seconds
once the cache holds them. The
whole set: ``python -m fusedres.ops.offline --amd`` without ``--lean``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fusedres.ops.configs import ConvConfig, HopperConfig, all_conv_configs, all_hopper_configs
from fusedres.ops.offline import in_lean_set

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_86", "sm_90")  # built here; sm_89 is answered for by sm_80's and sm_86's rows
# built in bf16 only (--lean); their other dtypes are checked through sm_80's rows
SAME_IR_AS_SM80 = ("sm_86",)
# the same IR as sm_80 and sm_86 with sm_86's shared-memory limit: sm_80's rows are checked against it
NOT_BUILT_SAME_IR = ("sm_89",)
# Opt-in maximum of shared memory per block, in bytes: A100; A10/A40/RTX 30; L4/L40/RTX 40; H100/H200;
# MI300 (gfx942, built with --amd when this triton can; a build it cannot make is reported "skipped").
SMEM_LIMITS = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448, "gfx942": 65536}
PER_CHANNEL_KERNELS = {
    "bn_stats_kernel",
    "bn_finalize_kernel",
    "bn_bwd_reduce_kernel",
    "bn_bwd_apply_kernel",
    "wgrad_reduce_kernel",
    "wgrad_bn_reduce_kernel",
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
        [sys.executable, "-m", "fusedres.ops.offline", "--arch", "80,86,90", "--amd", "--lean", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"offline compile failed (exit {proc.returncode}):\n{report}"
    rows = json.loads(out.read_text())

    built = {
        (r["role"], ConvConfig(**r["config"]), getattr(torch, r["dtype"]), r["arch"])
        for r in rows
        if r["config"] is not None and r["stride"] == 1 and r["role"] in all_conv_configs()
    }
    missing = [
        (role, cfg, dtype, arch)
        for role, items in all_conv_configs().items()
        for cfg, dtype in items
        for arch in ARCHS
        if (role, cfg, dtype, arch) not in built and in_lean_set(role, cfg, dtype, arch)
    ]
    assert not missing, f"{len(missing)} conv builds missing, e.g. {missing[:3]}"

    # sm_86/89 build what sm_80 builds (same TritonGPU IR): the same shared memory in every bf16
    # build, which is what lets sm_80's fp32/fp16 rows stand for theirs against their smaller limit.
    def build_key(r):
        return r["kernel"], r["role"], r["dtype"], json.dumps(r["config"], sort_keys=True), r["stride"], r["tile"]

    sm80 = {build_key(r): r for r in rows if r["arch"] == "sm_80"}
    # a build that does not depend on the dtype is made once, labelled with the first dtype asked
    sm80_any = {build_key(r)[:2] + build_key(r)[3:]: r for r in rows if r["arch"] == "sm_80"}

    def on_sm80(r):
        return sm80.get(build_key(r)) or sm80_any[build_key(r)[:2] + build_key(r)[3:]]

    # fp16 and bf16 builds of one config take the same shared memory (--lean's premise for sm_90's
    # pointer kernels, built without fp16): every sm_80 fp16 build against its bf16 twin
    sm80_by_dtype = {(build_key(r)[:2] + build_key(r)[3:], r["dtype"]): r for r in rows if r["arch"] == "sm_80"}
    fp16 = [(key, r) for (key, dtype), r in sm80_by_dtype.items() if dtype == "float16"]
    assert fp16, "no sm_80 fp16 build"
    differ = [(r["role"], r["tile"], r["shared"], sm80_by_dtype[key, "bfloat16"]["shared"]) for key, r in fp16
              if (key, "bfloat16") in sm80_by_dtype and sm80_by_dtype[key, "bfloat16"]["shared"] != r["shared"]]
    assert not differ, f"sm_80 fp16 and bf16 builds differ in shared memory (--lean's premise): {differ[:3]}"
    for arch in SAME_IR_AS_SM80 + NOT_BUILT_SAME_IR:
        if arch in NOT_BUILT_SAME_IR:
            assert not any(r["arch"] == arch for r in rows), f"{arch} built: update NOT_BUILT_SAME_IR"
            over = [(r["role"], r["dtype"], r["tile"], r["shared"]) for r in sm80.values()
                    if r["shared"] is not None and r["shared"] > SMEM_LIMITS[arch]]
            assert not over, f"sm_80 builds over {arch}'s {SMEM_LIMITS[arch]} bytes of shared memory: {over[:3]}"
            continue
        own = [r for r in rows if r["arch"] == arch]
        assert own and {r["dtype"] for r in own} <= {"bfloat16"}, f"{arch}: the lean set builds bf16 only"
        differ = [(r["role"], r["tile"], r["shared"], on_sm80(r)["shared"]) for r in own
                  if r["status"] == "ok" and on_sm80(r)["shared"] != r["shared"]]
        assert not differ, f"{arch} and sm_80 differ in shared memory (--lean's premise): {differ[:3]}"
        over = [(r["role"], r["dtype"], r["tile"], r["shared"]) for r in sm80.values()
                if r["shared"] is not None and r["shared"] > SMEM_LIMITS[arch]]
        assert not over, f"sm_80 builds over {arch}'s {SMEM_LIMITS[arch]} bytes of shared memory: {over[:3]}"
    # The TMA + wgmma engine is built for sm_90, the one architecture it runs on.
    hopper_built = {
        (HopperConfig(**r["config"]), getattr(torch, r["dtype"]), r["arch"])
        for r in rows
        if r["role"] == "fprop-hopper" and r["stride"] == 1
    }
    missing = [(cfg, dtype) for cfg, dtype in all_hopper_configs() if (cfg, dtype, "sm_90") not in hopper_built]
    assert not missing, f"{len(missing)} Hopper fprop builds missing, e.g. {missing[:3]}"
    # ... and the tiles only a 1x1 takes, at their own kernel size (no spill: checked below)
    from fusedres.ops.configs import hopper_fprop_config
    from fusedres.ops.offline import HOPPER_FPROP_1X1_SHAPES

    for cin, cout, k in HOPPER_FPROP_1X1_SHAPES:
        for role, dtype in (("fprop-hopper", torch.float16), ("fprop-hopper", torch.bfloat16),
                            ("fprop-hopper-ticket", torch.bfloat16)):
            cfg = hopper_fprop_config(cin, cout, k, 1, dtype)
            assert any(r["role"] == role and r["dtype"] == str(dtype).removeprefix("torch.")
                       and HopperConfig(**r["config"]) == cfg for r in rows), f"{role} {cin}->{cout} {k}x{k} not built"
    # ... and each bf16 config with its statistics finalized by the launch (ticket checked below)
    hopper_tickets = {HopperConfig(**r["config"]) for r in rows if r["role"] == "fprop-hopper-ticket" and r["ticket"]}
    missing = [cfg for cfg, dtype in all_hopper_configs() if dtype == torch.bfloat16 and cfg not in hopper_tickets]
    assert not missing, f"{len(missing)} Hopper fprop ticket builds missing, e.g. {missing[:3]}"
    # The sm_90 stride-1 dgrad: one bf16 build per shape of HOPPER_DGRAD_SHAPES (its default tile,
    # the BatchNorm-backward epilogue and the sums' ticket, whose ordering is checked below).
    from fusedres.ops.configs import hopper_dgrad_config
    from fusedres.ops.offline import HOPPER_DGRAD_SHAPES

    dgrad_rows = [r for r in rows if r["role"] == "dgrad-hopper" and r["arch"] == "sm_90"]
    dgrad_tiles = {(HopperConfig(**r["config"]), r["tile"].split()[-3]) for r in dgrad_rows}
    for cin, cout, k in HOPPER_DGRAD_SHAPES:
        cfg = hopper_dgrad_config(cin, cout, k, 1, torch.bfloat16)
        assert (cfg, f"{k}x{k}") in dgrad_tiles, f"Hopper dgrad {cin}->{cout} {k}x{k} not built"
    assert all(r["ticket"] for r in dgrad_rows), "a Hopper dgrad build without its sums ticket"
    # The sm_90 wgrad: one bf16 build per distinct default tile of the same shapes (the BN-ReLU
    # recomputed, the splits merged by the last split's ticket, ordered as checked below), no spill.
    from fusedres.ops.configs import HopperWgradConfig, hopper_wgrad_config

    wgrad_rows = [r for r in rows if r["role"] == "wgrad-hopper" and r["arch"] == "sm_90"]
    wgrad_built = {HopperWgradConfig(**r["config"]) for r in wgrad_rows if r["status"] == "ok"}
    for cin, cout, k in HOPPER_DGRAD_SHAPES:
        cfg = hopper_wgrad_config(cin, cout, k, 1, torch.bfloat16)
        assert cfg in wgrad_built, f"Hopper wgrad {cin}->{cout} {k}x{k} ({cfg}) not built"
    assert all(r["ticket"] for r in wgrad_rows), "a Hopper wgrad build without its split-merge ticket"
    spilled = [(r["tile"], r["spill_stores"], r["spill_loads"])
               for r in wgrad_rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"Hopper wgrad builds that spill: {spilled}"
    # The merged backward (fusedres.ops.conv.conv_bwd_kernel) of each BWD_SHAPES pair that merges,
    # on sm_90 in the lean dtypes: both tickets in its PTX (checked for order below), no spill.
    bwd_rows = [r for r in rows if r["role"] == "bwd" and r["arch"] == "sm_90"]
    assert {r["dtype"] for r in bwd_rows} == {"bfloat16", "float32"}, "merged backward builds missing"
    assert all(r["ticket"] and r["ticket"]["acq_rel"] >= 2 for r in bwd_rows), "a merged backward without both tickets"
    for arch in ARCHS:
        kernels = {r["role"] for r in rows if r["arch"] == arch}
        assert PER_CHANNEL_KERNELS <= kernels, f"{arch}: missing {PER_CHANNEL_KERNELS - kernels}"

    # Every float max/min in the PTX propagates NaN (max.NaN.f32), as torch.relu does.
    dropping = [r for r in rows if r["arch"] in ARCHS and r["status"] == "ok" and r["nan_dropping"] != 0]
    assert not dropping, "float max/min that drop NaN:\n" + "\n".join(
        f"{r['role']} {r['dtype']} {r['tile']} stride {r['stride']} {r['arch']}: {r['nan_dropping_ops']}"
        for r in dropping
    )

    # The launches that reduce in their last programs (every fprop/dgrad config built with its
    # ticket on sm_90; wgrad's split merge always takes one): the PTX orders the ticket as the
    # comment at fusedres.ops.bn._last_ticket argues — a barrier after every thread's partial
    # stores and before the one acq_rel atomic, a barrier after it, the partials read from L2.
    ticket_roles = {f"{role}-ticket" for role in ("fprop", "dgrad")} | {"wgrad"}
    for role in ticket_roles - {"wgrad"}:
        configs = {(ConvConfig(**r["config"]), r["dtype"]) for r in rows if r["role"] == role and r["arch"] == "sm_90"}
        expected = {(cfg, str(dtype).removeprefix("torch.")) for cfg, dtype in all_conv_configs()[role[:5]]
                    if dtype != torch.float16}  # --lean: sm_90's pointer kernels without fp16
        assert configs == expected, f"{role}: {len(expected - configs)} sm_90 builds missing"
    unordered = [
        r for r in rows
        if r["arch"] == "sm_90" and r["status"] == "ok"
        and (r["role"] in ticket_roles or r["ticket"] is not None)
        and not (r["ticket"] and r["ticket"]["barrier_before"] and r["ticket"]["barrier_after"]
                 and r["ticket"]["cg_loads_after"])
    ]
    assert not unordered, "tickets not ordered as argued:\n" + "\n".join(
        f"{r['role']} {r['dtype']} {r['tile']}: {r['ticket']}" for r in unordered
    )

    # No CUDA build spills (it happened: the tickets' unrolled merges held 255 registers and
    # spilled 192 bytes in every finalizing convolution, which then ran at one CTA per SM).
    spilling = [r for r in rows if r["arch"] in ARCHS and r["status"] == "ok" and (r["spill_stores"] or r["local"])]
    assert not spilling, "builds that spill:\n" + "\n".join(
        f"{r['role']} {r['dtype']} {r['tile']} {r['arch']}: regs {r['regs']}, spill stores {r['spill_stores']} "
        f"bytes, local {r['local']} bytes"
        for r in spilling
    )

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


def test_sass_profile_reads_the_main_loop() -> None:
    # A hand-written cuobjdump-style listing: one loop (0x20-0x80) around one wgmma, an
    # instruction that never runs (@!PT), and a self-branch after EXIT that is no loop body.
    from fusedres.ops.offline import format_sass, sass_profile

    sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64], P0 ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/                   STS.128 [R5], R8 ;
        /*0070*/              @!PT LDS RZ, [RZ] ;
        /*0080*/               @P0 BRA 0x20 ;
        /*0090*/                   LDGSTS.E [R3], desc[UR4][R4.64], P0 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
    """
    ttgir = "%a = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared, #smem, mutable>"
    p = sass_profile(sass, ttgir)
    assert p == {
        "kernel_insns": 11,
        "to_last_mma": 5,
        "mma": "HGMMA.64x64x16",
        "mma_per_iter": 1,
        "loop_insns": 6,
        "insns_per_mma": 6.0,
        "loop_bar": 1,
        "loop_wgmma_drain": 1,
        "loop_sts": 1,
        "ldgsts": {16: 1, 4: 1},
        "ldg": {16: 1},
        "tma": 0,
        "buffers": ["3x128x64xbf16"],
    }
    assert "HGMMA.64x64x16 1/iter" in format_sass(p)
    assert sass_profile("")["mma"] == "none"
    # A kernel without an MMA loop whose wait is out of line: the block after EXIT branches back
    # into the main code over the HGMMA; that is no loop.
    straight = """
        /*0000*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3 ;
        /*0010*/              @!P0 BRA 0x60 ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0040*/                   STG.E [R2.64], R24 ;
        /*0050*/                   EXIT ;
        /*0060*/                   SYNCS.PHASECHK.TRANS64 P0, [UR4], R3 ;
        /*0070*/              @!P0 BRA 0x60 ;
        /*0080*/                   BRA 0x20 ;
    """
    p = sass_profile(straight)
    assert p["mma"] == "HGMMA.64x64x16" and p["mma_per_iter"] == 0 and p["insns_per_mma"] is None


def test_ticket_ordering_reads_ptx() -> None:
    # A hand-written epilogue: the partial store, the barrier, one thread's acq_rel ticket, the
    # barrier, an L2 read of a partial and a plain read of a BatchNorm weight.
    from fusedres.ops.offline import ticket_ordering

    ptx = """
        st.global.b32 [ %rd1 + 0 ], { %r1 };
        bar.sync 	0;
        @%p1 atom.global.gpu.acq_rel.add.u32 %r2, [ %rd2 + 0 ], %r3; // the ticket
        bar.sync 	0;
        @%p1 atom.global.gpu.relaxed.exch.b32 %r4, [ %rd2 + 0 ], %r5;
        @%p2 ld.global.cg.b32 { %r6 }, [ %rd3 + 0 ];
        @%p2 ld.global.b32 { %r7 }, [ %rd4 + 0 ];
    """
    assert ticket_ordering(ptx) == {"acq_rel": 1, "barrier_before": 1, "barrier_after": 1, "cg_loads_after": 1,
                                    "plain_loads_after": 1}
    unfenced = ptx.replace("bar.sync \t0;\n        @%p1 atom.global.gpu.acq_rel", "@%p1 atom.global.gpu.acq_rel")
    assert ticket_ordering(unfenced)["barrier_before"] == 0
    assert ticket_ordering(ptx.replace("acq_rel", "relaxed")) is None


def test_nan_dropping_ops_reads_ptx() -> None:
    # Float max/min without .NaN drop NaN (also f16x2/bf16 and f64, which has no .NaN form);
    # .NaN ones, integer max/min, registers named like one and comments do not count.
    from fusedres.ops.offline import nan_dropping_ops

    ptx = """
        max.f32 %f3, %f1, %f2;
        @%p1 max.ftz.f32 %f4, %f3, 0f00000000;
        max.NaN.f32 %f5, %f4, 0f00000000;
        max.ftz.NaN.f32 %f6, %f5, %f1;
        min.f32 %f7, %f6, %f1;
        max.bf16x2 %r1, %r2, %r3;
        max.NaN.bf16x2 %r4, %r2, %r3;
        min.NaN.f16 %rs1, %rs2, %rs3;
        max.f16x2 %r5, %r2, %r3;
        max.f64 %fd3, %fd1, %fd2;
        max.s32 %r6, %r7, %r8;
        min.u64 %rd3, %rd1, %rd2;
        max.relu.s32 %r9, %r7, %r8;
        mov.u32 %r10, %max.f32_like;
        // max.f32 in a comment
    """
    assert nan_dropping_ops(ptx) == {
        "max.f32": 1,
        "max.ftz.f32": 1,
        "min.f32": 1,
        "max.bf16x2": 1,
        "max.f16x2": 1,
        "max.f64": 1,
    }
    assert nan_dropping_ops("max.NaN.f32 %f1, %f2, %f3;\nmin.s32 %r1, %r2, %r3;") == {}
