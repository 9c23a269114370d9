"""torch.compile: the fused blocks trace through the ``fusedres::`` custom ops with no graph break,
forward and backward, and compute what the eager fused path computes."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from _helpers import CHAIN_KERNELS, CONV_KERNELS, HEAD_KERNELS, POSTACT_KERNELS, launched
from torch import nn

import fusedres
import fusedres.testing
from fusedres import _fused
from fusedres.models import PreActResNet, preact_resnet


def _graph_recorder():
    """An ``aot_eager``-like backend that also records the forward and backward graphs' ops."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    ops: list[str] = []

    def record(gm: torch.fx.GraphModule, _inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record), ops


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.float().square().sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.detach(), x.grad.detach(), grads


def _assert_same(a, b, tol: float) -> None:
    (out_a, dx_a, g_a), (out_b, dx_b, g_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=tol, atol=tol)
    torch.testing.assert_close(dx_a, dx_b, rtol=tol, atol=tol)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


def _buffers_same(a: nn.Module, b: nn.Module) -> None:
    for (name, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(ba, bb, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _tiny_models() -> dict[str, callable]:
    from torchvision.models.resnet import BasicBlock as TvBasic
    from torchvision.models.resnet import Bottleneck as TvBottleneck

    return {
        "preact-blocks": lambda: nn.Sequential(fusedres.PreActBasicBlock(8, 8), fusedres.PreActBasicBlock(8, 12, 2),
                                               fusedres.PreActBottleneck(12, 4)),
        # a network's stem, stages and head (preact_resnet(11) at a fraction of its interpreted time)
        "network": lambda: PreActResNet(fusedres.PreActBottleneck, [1, 1], [4, 4], num_classes=5, stem="cifar",
                                        stem_channels=8),
        "momentum=None": lambda: _momentum_none(nn.Sequential(fusedres.PreActBottleneck(8, 2),
                                                              fusedres.PreActBasicBlock(8, 8))),
        "torchvision-converted": lambda: fusedres.convert(nn.Sequential(
            TvBasic(8, 8), TvBottleneck(8, 4, 2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False),
                                                                          nn.BatchNorm2d(16))))),
    }


#: What a forward and backward of each model launches, compiled or not: the custom ops call the
#: same launchers as the eager autograd Function, so launch counts move under torch.compile too.
_KERNELS = {
    "preact-blocks": CHAIN_KERNELS,
    "network": CHAIN_KERNELS + HEAD_KERNELS,
    "momentum=None": CHAIN_KERNELS,
    "torchvision-converted": POSTACT_KERNELS,
}


def _momentum_none(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    return model


# momentum=None changes only the running statistics' update, which eval does not make
@pytest.mark.parametrize(("name", "training"), [(name, training) for training in (True, False)
                                                for name in _tiny_models() if training or name != "momentum=None"],
                         ids=lambda v: v if isinstance(v, str) else ("train" if v else "eval"))
def test_fullgraph_compile_matches_eager(name: str, training: bool, device: torch.device, no_tf32: None) -> None:
    torch.manual_seed(0)
    eager = _tiny_models()[name]().to(device)
    if name == "network":
        x = torch.randn(2, 3, 8, 8, dtype=torch.float32, device=device)
    else:
        x = torch.randn(2, 8, 6, 6, dtype=torch.float32, device=device)
    for m in eager.modules():  # non-trivial running statistics for eval
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    eager.train(training)
    compiled_model = copy.deepcopy(eager)
    backend, ops = _graph_recorder()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    # With momentum=None the second training step's update weighs the batch by 1/2 (the first's by
    # 1): a factor baked into the graph at the first step would show there. The other models' buffer
    # updates over several steps: test_compiled_running_stats_and_counter.
    for _ in range(2 if name == "momentum=None" else 1):
        with launched(*_KERNELS[name]):  # the reference is the fused path run eagerly
            want = _run(eager, x)
        with launched(*_KERNELS[name]):
            got = _run(compiled, x)
        # 1e-5: a compiled graph may add a weight's gradient contributions (x feeds conv1 and the
        # downsample) in another order than eager autograd (seen on the H200: 5e-6 relative).
        _assert_same(got, want, 1e-5)
        _buffers_same(compiled_model, eager)
        eager.zero_grad(set_to_none=True)
        compiled_model.zero_grad(set_to_none=True)
    fused_ops = {op for op in ops if op.startswith("fusedres.")}
    backward_ops = {op for op in fused_ops if "_backward" in op}
    assert fused_ops, f"no fusedres op in the compiled graphs: {sorted(set(ops))}"
    assert backward_ops, f"the backward graph does not call a fusedres backward op: {sorted(fused_ops)}"


def test_compiled_running_stats_and_counter(device: torch.device, no_tf32: None) -> None:
    """Running statistics and num_batches_tracked advance exactly as in eager mode, per step."""
    torch.manual_seed(1)
    eager = nn.Sequential(fusedres.PreActBottleneck(8, 2), fusedres.PreActBasicBlock(8, 8)).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 5, 5, dtype=torch.float32, device=device)
    for _ in range(3):
        with launched("conv_fprop_kernel", "bn_stats_kernel"):  # which also finalizes the statistics
            eager(x)
        with launched("conv_fprop_kernel", "bn_stats_kernel"):
            compiled(x)
    _buffers_same(compiled_model, eager)
    assert int(compiled_model[0].bn1.num_batches_tracked) == 3


def test_opcheck_custom_ops(device: torch.device, no_tf32: None) -> None:
    """torch.library.opcheck: schema, fake (shapes and strides of the real outputs), autograd
    registration, and AOT dispatch of the forward ops on a small chain and a head."""
    torch.manual_seed(2)
    kw = dict(dtype=torch.float32, device=device)
    x = torch.randn(2, 8, 5, 5, **kw).requires_grad_(True)
    w1 = torch.randn(8, 8, 3, 3, **kw).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w2 = torch.randn(8, 8, 1, 1, **kw).requires_grad_(True)
    g = torch.rand(8, **kw).requires_grad_(True)
    b = torch.randn(8, **kw).requires_grad_(True)
    spec = _fused.ChainSpec((_fused.StageSpec(1, 1, 1e-5, 0.1, True), _fused.StageSpec(1, 0, 1e-5, 0.1, False)),
                            shortcut="identity", out_channels_last=False)
    rm, rv = torch.zeros(8, **kw), torch.ones(8, **kw)
    ints, floats = _fused.Chain.encode(spec)
    none = torch.empty(0, **kw)  # an absent tensor travels as an empty placeholder
    tensors = [x, none, none, w1, g, b, none, none, w2, g, none, rm, rv]
    with launched("conv_fprop_kernel"):
        torch.library.opcheck(torch.ops.fusedres.preact_chain.default, (ints, floats, tensors),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    pst = _fused.StageSpec(1, 0, 1e-5, 0.1, True)
    pints, pfloats = _fused.Pool.encode(pst)
    with launched("bn_relu_pool_kernel"):
        torch.library.opcheck(torch.ops.fusedres.bn_relu_pool.default, (pints, pfloats, [x, g, b, rm, rv]),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile_uses_fresh_weights_after_an_update(device: torch.device, no_tf32: None) -> None:
    """A weight updated in place between compiled calls (an optimizer step) is seen by the next
    call: under torch.compile the channels_last weight copy is made in the graph, not cached."""
    torch.manual_seed(3)
    block = fusedres.PreActBasicBlock(8, 8).to(device)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 5, 5, dtype=torch.float32, device=device)
    compiled(x)
    with torch.no_grad():
        block.conv1.weight.mul_(-1.5)
    with launched("conv_fprop_kernel"):
        got = compiled(x)
    eager_twin = fusedres.testing.set_fused(copy.deepcopy(block), False)
    eager_twin.load_state_dict(block.state_dict())
    want = eager_twin(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_network_compiles_without_graph_break(device: torch.device) -> None:
    """An ImageNet-stem pre-activation network (max pool, projection shortcuts, head)."""
    model = PreActResNet(fusedres.PreActBottleneck, [1, 1], [4, 4], num_classes=5, stem="imagenet",
                         stem_channels=8).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float32, device=device)
    with launched(*CHAIN_KERNELS, *HEAD_KERNELS):
        compiled(x).sum().backward()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and sync checks need a GPU")


@needs_cuda
def test_no_host_sync_in_fused_training_step(no_tf32: None) -> None:
    """Forward and backward of a fused network make no host synchronisation (momentum=None
    included), so CUDA graphs can capture them."""
    model = _momentum_none(preact_resnet(11, block="bottleneck")).cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    model(x).sum().backward()  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_reduce_overhead_training_matches_eager(no_tf32: None) -> None:
    """torch.compile(mode="reduce-overhead") (CUDA graphs) over several optimizer steps: the
    replayed graphs see the updated weights and buffers."""
    torch.manual_seed(4)
    eager = preact_resnet(11, block="bottleneck").cuda()
    graphed_model = copy.deepcopy(eager)
    compiled = torch.compile(graphed_model, mode="reduce-overhead", fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, graphed_model)]
    x = torch.randn(8, 3, 8, 8, device="cuda")
    for step in range(4):
        losses = []
        for m, opt in ((eager, opts[0]), (compiled, opts[1])):
            opt.zero_grad(set_to_none=True)
            # the first step of each runs the launchers (the compiled one's warm-up run); later
            # steps of the compiled model replay CUDA graphs, which launch nothing from Python
            with launched(*CONV_KERNELS) if step == 0 else contextlib.nullcontext():
                loss = m(x).float().square().mean()
                loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    _buffers_same(graphed_model, eager)


def test_no_weight_cache_while_a_cuda_graph_is_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a CUDA graph is captured, the weight-layout cache (kernel_weight, and the sm_90
    dgrad's flipped copy) copies the weight in the graph (a replay must read the weight as it is
    then) instead of returning the cached copy."""
    from fusedres.ops import hopper, weights

    w = torch.randn(6, 4, 3, 3)  # not channels_last: reordered and cached outside capture
    first = _fused.kernel_weight(w)
    assert _fused.kernel_weight(w) is first  # cached
    flipped = hopper.dgrad_weight(w)
    assert hopper.dgrad_weight(w) is flipped
    monkeypatch.setattr(weights, "capturing", lambda t: True)  # the one cache's capture check
    in_graph = _fused.kernel_weight(w)
    assert in_graph is not first and in_graph.data_ptr() != first.data_ptr()
    assert torch.equal(in_graph, w) and in_graph.is_contiguous(memory_format=torch.channels_last)
    assert _fused.kernel_weight(w) is not in_graph  # a fresh copy per captured call
    flipped_in_graph = hopper.dgrad_weight(w)
    assert flipped_in_graph is not flipped and torch.equal(flipped_in_graph, flipped)


@needs_cuda
@pytest.mark.parametrize("kind", ["preact", "torchvision-eval"])
def test_cuda_graph_replays_see_updated_weights(kind: str, no_tf32: None) -> None:
    """A fused model with plain (NCHW) weights captured by torch.cuda.make_graphed_callables /
    torch.cuda.graph: after the weights change in place, replays compute with the new weights
    (the host-side weight and folding caches are bypassed while capturing)."""
    torch.manual_seed(5)
    if kind == "preact":
        model = preact_resnet(11, block="bottleneck").cuda()
    else:
        from torchvision.models.resnet import BasicBlock

        model = fusedres.convert(nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))).cuda().eval()
    cin = 3 if kind == "preact" else 8
    x = torch.randn(4, cin, 8, 8, device="cuda", requires_grad=kind == "preact")
    if kind == "preact":
        with launched(*CONV_KERNELS):  # warm-up and capture run the launchers
            graphed = torch.cuda.make_graphed_callables(model, (x,))
    else:
        static_x = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(3):
                model(static_x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with launched("conv_fprop_kernel"), torch.cuda.graph(g), torch.no_grad():
            static_y = model(static_x)

        def graphed(inp: torch.Tensor) -> torch.Tensor:
            static_x.copy_(inp)
            g.replay()
            return static_y.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5).add_(0.01)  # an optimizer-like in-place update
    y = graphed(x)
    with torch.no_grad():
        ref = fusedres.testing.set_fused(copy.deepcopy(model), False)(x)
    torch.testing.assert_close(y.detach(), ref, rtol=1e-4, atol=1e-4)
