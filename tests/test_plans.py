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
