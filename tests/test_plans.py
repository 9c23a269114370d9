"""The launch plans of the convolution launchers (``fusedres.ops.conv``): a launch from a cached
plan is the launch a freshly built plan gives — same grid, constexprs, scalars and tensor
layouts — whatever ran before (shape, stride, dtype, mode, TF32, ticket changes invalidate),
and launch-local scratch is reused only where :func:`fusedres.ops.bn.scratch_key` allows it.
The launches are recorded, not run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import pytest
import torch

from fusedres.ops import bn as bn_ops
from fusedres.ops import conv as conv_ops

CL = torch.channels_last


@contextlib.contextmanager
def recorded() -> Iterator[list]:
    calls: list = []

    def launch(kernel, grid, *args, **kwargs) -> None:  # noqa: ANN001 - the launcher's signature
        calls.append((kernel.fn.__name__, grid, args, kwargs))

    with mock.patch.object(conv_ops, "launch", launch), mock.patch.object(bn_ops, "launch", launch):
        yield calls


def _shape(a):  # noqa: ANN001, ANN202
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), a.stride(), a.dtype)
    return a


def _layout(call):  # noqa: ANN001, ANN202
    name, grid, args, kwargs = call
    return name, grid, [_shape(a) for a in args], kwargs


def _cases():  # noqa: ANN202
    """(name, thunk) pairs: every launcher, in modes and layouts that must not share a plan."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.float32, cl=True):  # noqa: ANN001, ANN202
        v = torch.randn(*shape, generator=g).to(dtype)
        return v.contiguous(memory_format=CL) if cl else v.contiguous()

    x, x_nchw, x16 = t(2, 8, 6, 6), t(2, 8, 6, 6, cl=False), t(2, 8, 6, 6, dtype=torch.float16)
    x_big = t(2, 8, 10, 10)
    w3, w1 = t(4, 8, 3, 3), t(4, 8, 1, 1)
    w3_16 = t(4, 8, 3, 3, dtype=torch.float16)
    sc, sh = torch.rand(8, generator=g), torch.rand(8, generator=g)
    res = t(2, 4, 6, 6)
    dy, dy_s2 = t(2, 4, 6, 6), t(2, 4, 3, 3)
    mean, inv = torch.rand(8, generator=g), torch.rand(8, generator=g) + 0.5

    def fin(with_affine: bool = True, running: bool = True) -> bn_ops.Finalize:
        c = 4
        rm, rv = (torch.zeros(c), torch.ones(c)) if running else (None, None)
        return bn_ops.Finalize(torch.empty(4, c), torch.ones(c) if with_affine else None,
                               torch.zeros(c) if with_affine else None, rm, rv, None, 0.1, 1e-5)

    f = conv_ops.conv_fprop
    return [
        ("fprop", lambda: f(x, w3, stride=1, padding=1)),
        ("fprop nchw", lambda: f(x_nchw, w3, stride=1, padding=1)),
        ("fprop fp16", lambda: f(x16, w3_16, stride=1, padding=1)),
        ("fprop bigger", lambda: f(x_big, w3, stride=1, padding=1)),
        ("fprop stride 2", lambda: f(x, w3, stride=2, padding=1)),
        ("fprop 1x1", lambda: f(x, w1, stride=1, padding=0)),
        ("fprop prologue", lambda: f(x, w3, stride=1, padding=1, scale=sc, shift=sh)),
        ("fprop residual", lambda: f(x, w3, stride=1, padding=1, residual=res)),
        ("fprop stats", lambda: f(x, w3, stride=1, padding=1, stats=True)),
        ("fprop ticket", lambda: f(x, w3, stride=1, padding=1, stats=True, finalize=fin())),
        ("fprop ticket no affine", lambda: f(x, w3, stride=1, padding=1, stats=True, finalize=fin(False))),
        ("fprop ticket no running", lambda: f(x, w3, stride=1, padding=1, stats=True, finalize=fin(True, False))),
        ("fprop out relu", lambda: f(x, w3, stride=1, padding=1, out_relu=True)),
        ("dgrad", lambda: conv_ops.conv_dgrad(dy, w3, (2, 8, 6, 6), stride=1, padding=1)),
        ("dgrad stride 2", lambda: conv_ops.conv_dgrad(dy_s2, w3, (2, 8, 6, 6), stride=2, padding=1)),
        ("dgrad bn", lambda: conv_ops.conv_dgrad(dy, w3, (2, 8, 6, 6), stride=1, padding=1,
                                                 bn=(x, sc, sh, mean, inv))),
        ("dgrad bn sums", lambda: conv_ops.conv_dgrad(dy, w3, (2, 8, 6, 6), stride=1, padding=1,
                                                      bn=(x, sc, sh, mean, inv), reduce_sums=True)),
        ("dgrad bn nchw x", lambda: conv_ops.conv_dgrad(dy, w3, (2, 8, 6, 6), stride=1, padding=1,
                                                        bn=(x_nchw, sc, sh, mean, inv), reduce_sums=True)),
        ("dgrad add", lambda: conv_ops.conv_dgrad(dy, w3, (2, 8, 6, 6), stride=1, padding=1, add=x)),
        ("wgrad", lambda: conv_ops.conv_wgrad(dy, x, w3, stride=1, padding=1)),
        ("wgrad prologue", lambda: conv_ops.conv_wgrad(dy, x, w3, stride=1, padding=1, scale=sc, shift=sh)),
        ("wgrad nchw", lambda: conv_ops.conv_wgrad(dy, x_nchw, w3, stride=1, padding=1)),
        ("wgrad splits", lambda: conv_ops.conv_wgrad(dy, x, w3, stride=1, padding=1, splits=3)),
        ("wgrad deferred", lambda: conv_ops.conv_wgrad(dy, x, w3, stride=1, padding=1, defer_reduce=True)),
    ]


def _modes():  # noqa: ANN202
    """The global modes a plan depends on."""

    @contextlib.contextmanager
    def tf32(on: bool) -> Iterator[None]:
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = on
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old

    return [("tickets tf32", lambda: tf32(True)),
            ("tickets ieee", lambda: tf32(False)),
            ("two launches", lambda: bn_ops.producer_reductions(False))]


def test_cached_plan_launches_as_a_fresh_one() -> None:
    """Every case after every other case (and under every mode) launches as with no plan cached."""
    bn_ops.clear_plans()
    cases = _cases()
    fresh = {}
    for mode, enter in _modes():
        for name, thunk in cases:
            bn_ops.clear_plans()
            with enter(), recorded() as calls:
                thunk()
            fresh[mode, name] = [_layout(c) for c in calls]
    bn_ops.clear_plans()
    for _ in range(2):  # the second round runs entirely from cached plans
        for mode, enter in _modes():
            for name, thunk in cases:
                with enter(), recorded() as calls:
                    thunk()
                assert [_layout(c) for c in calls] == fresh[mode, name], (mode, name)
    # the modes really are different launches
    assert fresh["tickets tf32", "fprop"] != fresh["tickets ieee", "fprop"]
    assert fresh["tickets tf32", "fprop ticket"] != fresh["two launches", "fprop ticket"]


def _scratch_of(thunk) -> list[int]:  # noqa: ANN001
    """Addresses of the launch-local buffers of one call (fprop's partials)."""
    with recorded() as calls:
        thunk()
    (_, _, args, _), = calls
    return [args[7].data_ptr(), args[8].data_ptr()]  # pmean, pm2


def test_scratch_reused_per_stream_and_fresh_while_capturing(monkeypatch: pytest.MonkeyPatch) -> None:
    bn_ops.clear_plans()
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    w = torch.randn(4, 8, 3, 3)

    def call():  # noqa: ANN202
        fin = bn_ops.Finalize(torch.empty(4, 4), None, None, None, None, None, 0.1, 1e-5)
        return conv_ops.conv_fprop(x, w, stride=1, padding=1, stats=True, finalize=fin)

    first = _scratch_of(call)
    assert _scratch_of(call) == first  # one stream: the same buffers
    keys = iter([("cuda", 1), ("cuda", 2)])
    with monkeypatch.context() as m:
        m.setattr(bn_ops, "scratch_key", lambda device: next(keys))
        other = _scratch_of(call)
        assert other != first and _scratch_of(call) != other  # another stream, then a third
    with monkeypatch.context() as m:
        m.setattr(bn_ops, "scratch_key", lambda device: None)  # capturing: fresh every call
        held = []  # (keep the buffers alive: their addresses must not be reused)
        for _ in range(3):
            with recorded() as calls:
                call()
            held.append(calls[0][2][7])
        assert len({t.data_ptr() for t in held}) == 3
        assert all(t.data_ptr() not in first for t in held)
    # non-ticket partials are returned to the caller: never scratch
    _, partials = conv_ops.conv_fprop(x, w, stride=1, padding=1, stats=True)
    _, partials2 = conv_ops.conv_fprop(x, w, stride=1, padding=1, stats=True)
    assert partials[0].data_ptr() != partials2[0].data_ptr()


def test_large_scratch_is_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scratch above SCRATCH_CACHE_BYTES is made per call (held, it would add to every later
    step's peak memory)."""
    bn_ops.clear_plans()
    monkeypatch.setattr(bn_ops, "SCRATCH_CACHE_BYTES", 0)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    w = torch.randn(4, 8, 3, 3)
    held = []
    for _ in range(3):
        fin = bn_ops.Finalize(torch.empty(4, 4), None, None, None, None, None, 0.1, 1e-5)
        with recorded() as calls:
            conv_ops.conv_fprop(x, w, stride=1, padding=1, stats=True, finalize=fin)
        held.append(calls[0][2][7])
    assert len({t.data_ptr() for t in held}) == 3


# --------------------------------------------------------------------------------------------
# The block plan (fusedres.blocks._BlockPlan): a planned forward calls the fused chain exactly as
# the full path does — same spec, same tensors, same batch counting, same errors — after any
# change to the module or its input. The chain call is recorded, not run.


def _chain_call(block: torch.nn.Module, x: torch.Tensor, *, planned: bool) -> tuple:
    """What ``block(x)`` does on the fused path: ("raises", type, message) or ("chain", spec,
    tensors by identity, proj weight, batches counted)."""
    import fusedres.blocks as blocks_mod

    calls = []

    def chain(spec, x_in, tensors, *, residual=None, proj_weight=None, batches=None):  # noqa: ANN001, ANN202
        calls.append((spec, x_in, list(tensors), proj_weight))
        for counter in batches or ():  # what the finalizing launches do with them
            if counter is not None:
                counter.add_(1)
        return x_in

    counts = [b.num_batches_tracked.item() if b.num_batches_tracked is not None else None
              for b in block.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(blocks_mod, "bn_relu_conv_chain", chain))
        if not planned:
            stack.enter_context(mock.patch.object(blocks_mod._PreActBlock, "_plan_key", lambda self, x: None))
        try:
            block(x)
        except (TypeError, ValueError) as e:
            return ("raises", type(e), str(e))
    after = [b.num_batches_tracked.item() if b.num_batches_tracked is not None else None
             for b in block.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    (spec, x_in, tensors, proj_weight), = calls
    return ("chain", spec, id(x_in), [id(t) if t is not None else None for t in tensors],
            id(proj_weight) if proj_weight is not None else None, [b - a if a is not None else None
                                                                     for a, b in zip(counts, after)])


def _set_param(module: torch.nn.Module, name: str, value: torch.Tensor | None) -> None:
    setattr(module, name, torch.nn.Parameter(value) if value is not None else None)


def _contiguous_weights(block: torch.nn.Module) -> None:
    for m in block.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous()


def _block_mutations():  # noqa: ANN202
    """(name, change of the module, change of the input[, set-up before the first call]): each key
    component of a block plan."""
    half = lambda t: t.half()  # noqa: E731
    return [
        ("nothing", lambda b: None, lambda x: x),
        ("eval", lambda b: b.eval(), lambda x: x),
        ("one BatchNorm in eval", lambda b: b.bn2.eval(), lambda x: x),
        ("momentum", lambda b: setattr(b.bn1, "momentum", 0.3), lambda x: x),
        ("eps", lambda b: setattr(b.bn2, "eps", 1e-3), lambda x: x),
        ("track_running_stats off", lambda b: setattr(b.bn1, "track_running_stats", False), lambda x: x),
        ("running stats dropped, eval", lambda b: (b.eval(), setattr(b.bn1, "running_mean", None),
                                                   setattr(b.bn1, "running_var", None)), lambda x: x),
        ("batch counter dropped", lambda b: setattr(b.bn2, "num_batches_tracked", None), lambda x: x),
        ("affine weight dropped", lambda b: _set_param(b.bn2, "weight", None), lambda x: x),
        ("BatchNorm weight fp16", lambda b: setattr(b.bn1.weight, "data", half(b.bn1.weight.data)), lambda x: x),
        ("conv weight fp16", lambda b: setattr(b.conv1.weight, "data", half(b.conv1.weight.data)), lambda x: x),
        ("conv weight contiguous", lambda b: setattr(b.conv2.weight, "data", b.conv2.weight.data.contiguous()),
         lambda x: x.contiguous()),
        ("buffer on meta", lambda b: setattr(b.bn2, "running_var", b.bn2.running_var.to("meta")), lambda x: x),
        ("conv bias", lambda b: _set_param(b.conv2, "bias", torch.zeros(b.conv2.out_channels)), lambda x: x),
        ("conv groups", lambda b: setattr(b.conv1, "groups", 2), lambda x: x),
        ("conv padding mode", lambda b: setattr(b.conv2, "padding_mode", "reflect"), lambda x: x),
        ("conv padding", lambda b: setattr(b.conv2, "padding", (0, 0)), lambda x: x),
        ("conv stride", lambda b: setattr(b.conv2, "stride", (2, 2)), lambda x: x),
        ("in_channels", lambda b: setattr(b, "in_channels", 16), lambda x: x),
        ("input contiguous", lambda b: None, lambda x: x.contiguous()),
        # (weights contiguous from the start: the input's layout alone then decides the output's)
        ("input contiguous, weights contiguous", lambda b: None, lambda x: x.contiguous(), _contiguous_weights),
        ("input bigger", lambda b: None, lambda x: torch.randn(3, 8, 6, 6).contiguous(memory_format=CL)),
        ("input one value", lambda b: None, lambda x: x[:1, :, :1, :1].contiguous(memory_format=CL)),
        ("input fp16", lambda b: None, half),
        ("input fp64", lambda b: None, lambda x: x.double()),
        ("input 3-D", lambda b: None, lambda x: x[0]),
        ("input channels", lambda b: None, lambda x: torch.randn(2, 4, 5, 5).contiguous(memory_format=CL)),
        ("whole block fp16", lambda b: b.half(), half),
    ]


@pytest.mark.parametrize("kind", ["basic projection", "bottleneck"])
@pytest.mark.parametrize("mutation", [m[0] for m in _block_mutations()])
def test_block_plan_follows_every_change(kind: str, mutation: str) -> None:
    """After a planned call, change one thing the plan was derived from: the next call (planned)
    does what the full path does on the changed block."""
    import fusedres

    _, change_block, change_input, *setup = next(m for m in _block_mutations() if m[0] == mutation)
    if kind == "bottleneck":
        block = fusedres.PreActBottleneck(8, 2)
    else:
        block = fusedres.PreActBasicBlock(8, 4)
    block = block.to(memory_format=CL)
    for prepare in setup:
        prepare(block)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=CL)
    first = _chain_call(block, x, planned=True)
    assert first[0] == "chain" and "_fused_plan" in block.__dict__
    change_block(block)
    x = change_input(x)
    got = _chain_call(block, x, planned=True)
    want = _chain_call(block, x, planned=False)
    assert got == want
    if mutation != "nothing":  # each change matters to the full path: the test compares something
        assert got != first


_TIMM_MUTATIONS = {
    "nothing": lambda b: None,
    "eval": lambda b: b.eval(),
    "momentum": lambda b: setattr(b.norm1, "momentum", 0.3),
    "eps": lambda b: setattr(b.norm2, "eps", 1e-3),
    "batch counter dropped": lambda b: setattr(b.norm2, "num_batches_tracked", None),
    "track_running_stats off": lambda b: setattr(b.norm1, "track_running_stats", False),
    "conv stride": lambda b: setattr(b.conv2, "stride", (2, 2)),
}


@pytest.mark.parametrize("mutation", list(_TIMM_MUTATIONS))
def test_timm_block_plan_follows_every_change(mutation: str) -> None:
    """timm's ResNetV2 block converted (fusedres.adapters.TimmPreActBlock, its BatchNorms timm's
    BatchNormAct2d): its calls take the planned path too, and a planned call after a change does
    what the full path does; with momentum=None they take the full path."""
    resnetv2 = pytest.importorskip("timm.models.resnetv2")
    from timm.layers import BatchNormAct2d, create_conv2d

    import fusedres

    torch.manual_seed(0)
    model = resnetv2.ResNetV2(layers=[1], channels=(8,), num_classes=5, stem_chs=8, conv_layer=create_conv2d,
                              norm_layer=BatchNormAct2d)
    block = fusedres.convert(model).stages[0].blocks[0].to(memory_format=CL)
    assert type(block).__name__ == "TimmPreActBlock" and type(block.norm1) is BatchNormAct2d
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=CL)
    first = _chain_call(block, x, planned=True)
    assert first[0] == "chain" and "_fused_plan" in block.__dict__
    _TIMM_MUTATIONS[mutation](block)
    got = _chain_call(block, x, planned=True)
    assert got == _chain_call(block, x, planned=False)
    if mutation != "nothing":
        assert got != first
    block.norm2.momentum = None
    block.__dict__.pop("_fused_plan", None)
    _chain_call(block, x, planned=True)
    assert "_fused_plan" not in block.__dict__


def test_block_plan_is_reused() -> None:
    """A second call with nothing changed takes the plan the first one built."""
    import fusedres

    block = fusedres.PreActBottleneck(8, 2).to(memory_format=CL)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=CL)
    _chain_call(block, x, planned=True)
    plan = block.__dict__["_fused_plan"]
    _chain_call(block, x, planned=True)
    assert block.__dict__["_fused_plan"] is plan


# --------------------------------------------------------------------------------------------
# The launch memos of a chain call (fusedres._fused.preact._launches): a training step of a
# block launches, from a memo filled by other calls, what it launches with nothing cached —
# whatever route, engine, environment, ticket mode, TF32 mode or layout the calls ran under.


def _step_launches(kind: str, x_contiguous: bool, dout_contiguous: bool) -> list:
    """The launches of one training step of a block (forward and backward), recorded."""
    import fusedres
    from fusedres.ops import hopper as hopper_ops

    torch.manual_seed(0)
    if kind == "bottleneck":
        block = fusedres.PreActBottleneck(8, 2)
    else:
        block = fusedres.PreActBasicBlock(8, 4, stride=2)
    block = block.to(memory_format=CL)
    x = torch.randn(2, 8, 6, 6)
    x = (x.contiguous() if x_contiguous else x.contiguous(memory_format=CL)).requires_grad_(True)
    with recorded() as calls, mock.patch.object(hopper_ops, "launch",
                                                 lambda kernel, grid, *a, **k: calls.append(
                                                     (kernel.fn.__name__, grid, a, k))):
        out = block(x)
        dout = torch.randn(out.shape)
        out.backward(dout.contiguous() if dout_contiguous else dout.contiguous(memory_format=CL))
    from triton.tools.tensor_descriptor import TensorDescriptor

    def layout(a):  # noqa: ANN001, ANN202 - the Hopper engine's descriptors by their geometry
        if isinstance(a, TensorDescriptor):
            return ("descriptor", _shape(a.base), list(a.shape), list(a.strides), list(a.block_shape))
        return _shape(a)

    return [(name, grid, [layout(a) for a in args], kwargs) for name, grid, args, kwargs in calls]


def _route_modes():  # noqa: ANN202
    """The global state a chain call's launches depend on."""
    from fusedres.ops import route

    @contextlib.contextmanager
    def env(value: str) -> Iterator[None]:
        # (without the test suite's engine("pointer"), which takes precedence over the variable)
        with mock.patch.dict("os.environ", {"FUSEDRES_CONV_ENGINE": value}), \
                mock.patch.object(route, "_ENGINE_OVERRIDES", []):
            yield

    return [
        ("default", contextlib.nullcontext),
        ("cudnn", lambda: route.force("cudnn")),
        ("hopper engine", lambda: route.engine("hopper")),
        ("hopper by the environment", lambda: env("hopper")),
        ("two launches", lambda: bn_ops.producer_reductions(False)),
        ("ieee", lambda: _tf32(False)),
    ]


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def test_chain_launch_memo_launches_as_fresh() -> None:
    """Every (block, layout, mode) after every other launches as with nothing cached."""
    cases = [(kind, xc, dc) for kind in ("bottleneck", "basic projection") for xc, dc in
             ((False, False), (True, False), (False, True))]
    fresh = {}
    for mode, enter in _route_modes():
        for case in cases:
            bn_ops.clear_plans()
            with enter():
                fresh[mode, case] = _step_launches(*case)
    bn_ops.clear_plans()
    for _ in range(2):  # the second round runs from the memos alone
        for mode, enter in _route_modes():
            for case in cases:
                with enter():
                    assert _step_launches(*case) == fresh[mode, case], (mode, case)
    # the modes and layouts really launch differently (the projection block's weight gradients
    # meet the Hopper engine's layout rules at these sizes)
    base = fresh["default", cases[3]]
    assert [mode for mode, _ in _route_modes()[1:] if fresh[mode, cases[3]] == base] == []
    assert fresh["default", cases[4]] != base and fresh["default", cases[5]] != base
