"""SyncBatchNorm: two gloo processes, each with part of a batch (unequal sizes), match one
process on the whole batch — outputs, input and parameter gradients, running statistics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import CONV_KERNELS, HEAD_KERNELS, POSTACT_KERNELS, launched

import fusedres
from fusedres.testing import set_fused

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _syncbn_worker as worker  # noqa: E402


@pytest.mark.parametrize("model", ["preact", "torchvision"])
def test_syncbn_two_processes_match_one_process_on_the_global_batch(tmp_path: Path, model: str) -> None:
    world = len(worker.SIZES)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(HERE.parent))
    procs = [subprocess.Popen([sys.executable, str(HERE / "_syncbn_worker.py"), str(r), str(world),
                               str(tmp_path / "init"), str(tmp_path), model], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    # (synchronised statistics are finalised in PyTorch after their all_reduce: no bn_finalize_kernel)
    kernels = (*CONV_KERNELS, "bn_stats_kernel", "bn_bwd_apply_kernel", *HEAD_KERNELS) if model == "preact" \
        else POSTACT_KERNELS
    for r in ranks:
        # (a role given as a tuple: any of its kernels, e.g. the dgrad alone or merged with the wgrad)
        missing = [k for k in kernels if not any(r["launches"].get(n) for n in (k if isinstance(k, tuple) else (k,)))]
        assert not missing, f"the fused kernels did not run: {missing} (ran: {r['launches']})"

    # One process, the whole batch, plain BatchNorm in float64.
    ref = set_fused(worker.build(model), False).double()
    x, w = worker.data()
    x = x.double().requires_grad_(True)
    for _ in range(2):
        ref.zero_grad(set_to_none=True)
        x.grad = None
        out = ref(x)
        (out * w.double()).sum().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ref.eval()
    with torch.no_grad():
        ref_eval = ref(x)

    tol = dict(rtol=2e-4, atol=2e-4)
    lo = 0
    for r, size in enumerate(worker.SIZES):
        res = ranks[r]
        torch.testing.assert_close(res["out"].double(), out[lo : lo + size].detach(), **tol)
        torch.testing.assert_close(res["dx"].double(), x.grad[lo : lo + size], **tol)
        torch.testing.assert_close(res["eval_out"].double(), ref_eval, **tol)
        for n, g in ref_grads.items():
            torch.testing.assert_close(res["grads"][n].double(), g, **tol, msg=lambda m, n=n: f"grad {n}: {m}")
        for n, b in ref.named_buffers():
            torch.testing.assert_close(res["buffers"][n].double(), b.double(), **tol,
                                       msg=lambda m, n=n: f"buffer {n}: {m}")
        lo += size


def test_syncbn_without_process_group_is_plain_batchnorm() -> None:
    """A SyncBatchNorm outside torch.distributed (or in eval) is ordinary BatchNorm, fused."""
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fusedres.PreActBasicBlock(8, 8))
    plain = fusedres.PreActBasicBlock(8, 8)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 8, 5, 5)
    with launched("conv_fprop_kernel", "bn_stats_kernel"):  # which also finalizes the statistics
        y = model(x)
    with launched("conv_fprop_kernel", "bn_stats_kernel"):
        want = plain(x)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.distributed.is_nccl_available(),
                    reason="the DDP wrapper with NCCL needs a GPU")
def test_ddp_nccl_wraps_fused_model_with_syncbn(tmp_path: Path) -> None:
    """The standard recipe on a GPU — convert_sync_batchnorm, then DistributedDataParallel (one
    NCCL process here) — runs the fused blocks and gives the gradients of the unwrapped model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(worker.build()).cuda()
        plain = set_fused(worker.build(), True).cuda()
        plain.load_state_dict(model.state_dict())
        ddp = DDP(model, device_ids=[torch.cuda.current_device()])
        x = torch.randn(4, 3, 8, 8, device="cuda")
        with launched(*CONV_KERNELS):
            ddp(x).square().sum().backward()
        with launched(*CONV_KERNELS):
            plain(x).square().sum().backward()
        for (n, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    finally:
        dist.destroy_process_group()
