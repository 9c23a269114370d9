"""The README's recipe for a plain training loop replayed from CUDA graphs
(``torch.cuda.make_graphed_callables`` over a whole fused network) trains as the launched model
does. CUDA only: the recipe's torch.compile twin is tests/test_compile.py's
``test_reduce_overhead_training_matches_eager``."""

from __future__ import annotations

import copy

import pytest
import torch

from fusedres.models import preact_resnet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")


def test_make_graphed_callables_training_loop_matches_launched(no_tf32: None) -> None:
    torch.manual_seed(6)
    cl = torch.channels_last
    launched = preact_resnet(11, block="bottleneck").cuda().to(memory_format=cl)
    graphed = copy.deepcopy(launched)
    sample = torch.randn(8, 3, 8, 8, device="cuda").contiguous(memory_format=cl)
    warmup = 3
    graphed = torch.cuda.make_graphed_callables(graphed, (sample,), num_warmup_iters=warmup)
    # make_graphed_callables ran ``warmup`` training forwards (running statistics moved); the
    # launched twin does the same so that both start from the same buffers.
    with torch.no_grad():
        for _ in range(warmup):
            launched(sample)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (launched, graphed)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(4):
        x = torch.randn(sample.shape, device="cuda", generator=gen).contiguous(memory_format=cl)
        losses = []
        for m, opt in zip((launched, graphed), opts):
            opt.zero_grad(set_to_none=True)
            loss = m(x).float().square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5, msg=f"step {step}")
    for (name, a), (_, b) in zip(launched.named_buffers(), graphed.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
