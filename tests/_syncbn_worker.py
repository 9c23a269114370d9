"""One rank of tests/test_syncbn.py: a fused network with SyncBatchNorm on its share of a batch.

Usage: python tests/_syncbn_worker.py RANK WORLD INIT_FILE OUT_DIR MODEL (preact | torchvision).
Runs under the Triton
interpreter (set before triton is imported) with the gloo backend.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import fusedres  # noqa: E402
from fusedres.models import preact_resnet  # noqa: E402

#: Rank r holds SIZES[r] samples of the global batch: unequal on purpose (count weighting).
SIZES = (3, 2)


def build(model: str = "preact") -> nn.Module:
    """A pre-activation ResNet (fused chains and the fused head), or converted torchvision blocks
    (the fused post-activation block, with a conv1x1+BatchNorm downsample) in a small classifier."""
    torch.manual_seed(0)
    if model == "preact":
        return preact_resnet(11, block="bottleneck")
    from torchvision.models.resnet import BasicBlock, Bottleneck

    ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                         fusedres.convert(nn.Sequential(BasicBlock(8, 8), Bottleneck(8, 4, 2, downsample=ds))),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(sum(SIZES), 3, 8, 8, generator=g), torch.randn(sum(SIZES), 10, generator=g)


def main() -> None:
    rank, world, init_file, out_dir, which = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build(which))
    x, w = data()
    lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    xs = x[lo:hi].clone().requires_grad_(True)
    before = dict(fusedres.launch_counts)
    for _ in range(2):  # the second step normalises with batch stats again and updates running stats
        model.zero_grad(set_to_none=True)
        xs.grad = None
        out = model(xs)
        (out * w[lo:hi]).sum().backward()
    launches = {k: n - before.get(k, 0) for k, n in fusedres.launch_counts.items() if n != before.get(k, 0)}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)  # DDP would average; the sum is the single-process gradient of the summed loss
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    torch.save({"out": out.detach(), "dx": xs.grad, "grads": grads, "launches": launches,
                "buffers": {n: b.clone() for n, b in model.named_buffers()}, "eval_out": eval_out},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
