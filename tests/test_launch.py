"""The opt-in direct launch path (``FUSEDRES_FAST_LAUNCH=1``, fusedres._runtime.launch).

On the CPU a fake kernel stands in for a JITFunction: these tests check which launches go
through Triton and which call the cached compiled kernel, and with exactly which arguments. The
CUDA test runs a fused block step both ways and requires bit-identical results.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch

import fusedres
from fusedres import _runtime


class _Param:
    def __init__(self, name: str, default: object = inspect.Parameter.empty) -> None:
        self.name = name
        self.default = default


class _Compiled:
    def __init__(self, calls: list) -> None:
        self.function = "function-handle"
        self.packed_metadata = ("packed",)
        self.run = lambda *a: calls.append(("direct", a))


class _Kernel:
    """``k[grid](*args, **kwargs)`` like a JITFunction: records the call, returns a compiled kernel."""

    def __init__(self, params: list[_Param], compiled_factory=None) -> None:
        self.params = params
        self.fn = types.SimpleNamespace(__name__="fake_kernel")
        self.calls: list = []
        self.compiled_factory = compiled_factory or (lambda: _Compiled(self.calls))

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return self.compiled_factory()

        return call


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(_runtime, "FAST_LAUNCH", True)
    monkeypatch.setattr(_runtime, "_FAST_CACHE", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234 + device, raising=False)
    rt = _runtime.triton.knobs.runtime
    monkeypatch.setattr(rt, "launch_enter_hook", None)
    monkeypatch.setattr(rt, "launch_exit_hook", None)
    return rt


def _kernel() -> _Kernel:
    return _Kernel([_Param("x"), _Param("n"), _Param("eps"), _Param("BLOCK"), _Param("FLAG", False)])


def test_repeat_launch_calls_compiled_kernel(fast):
    k = _kernel()
    x = torch.zeros(64)
    before = _runtime.launch_counts["fake_kernel"], _runtime.fast_launch_counts["fake_kernel"]
    _runtime.launch(k, (3, 2), x, 7, 1e-5, BLOCK=32, num_warps=4)
    _runtime.launch(k, (3, 2), x, 7, 1e-5, BLOCK=32, num_warps=4)
    assert [c[0] for c in k.calls] == ["triton", "direct"]
    # JITFunction.run's convention: grid padded to 3-D, stream, function, packed metadata,
    # launch metadata and hooks (None), then every parameter's value (constexprs and defaults too)
    assert k.calls[1][1] == (3, 2, 1, 1234, "function-handle", ("packed",), None, None, None, x, 7, 1e-5, 32, False)
    assert _runtime.launch_counts["fake_kernel"] == before[0] + 2
    assert _runtime.fast_launch_counts["fake_kernel"] == before[1] + 1


@pytest.mark.parametrize("change", ["alignment", "dtype", "int", "float", "constexpr", "option", "device"])
def test_new_specialization_goes_through_triton(fast, monkeypatch, change):
    k = _kernel()
    buf = torch.zeros(64)
    args, kw = [buf, 32, 1e-5], {"BLOCK": 32, "num_warps": 4}
    _runtime.launch(k, (1,), *args, **kw)
    if change == "alignment":
        args[0] = buf[1:]  # 4 bytes off a 16-byte boundary: Triton compiles another kernel
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "int":
        args[1] = 1  # Triton specializes an int equal to 1 (and divisibility by 16)
    elif change == "float":
        args[2] = 1e-3
    elif change == "constexpr":
        kw["BLOCK"] = 64
    elif change == "option":
        kw["num_warps"] = 8
    else:
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    _runtime.launch(k, (1,), *args, **kw)
    assert [c[0] for c in k.calls] == ["triton", "triton"]
    _runtime.launch(k, (1,), *args, **kw)
    assert [c[0] for c in k.calls] == ["triton", "triton", "direct"]


def test_same_key_new_addresses_stay_direct(fast):
    k = _kernel()
    tensors = [torch.zeros(64) for _ in range(4)]
    for t in tensors:
        _runtime.launch(k, (1,), t, 16, 1e-5, BLOCK=32)
    assert [c[0] for c in k.calls] == ["triton"] + ["direct"] * 3
    assert [c[1][9] for c in k.calls[1:]] == tensors[1:]  # each launch passes its own tensor


def test_hooks_take_the_triton_path(fast):
    k = _kernel()
    x = torch.zeros(64)
    _runtime.launch(k, (1,), x, 16, 1e-5, BLOCK=32)
    fast.launch_enter_hook = lambda *a: None  # a profiler: Triton must see every launch
    _runtime.launch(k, (1,), x, 16, 1e-5, BLOCK=32)
    assert [c[0] for c in k.calls] == ["triton", "triton"]


@pytest.mark.parametrize("broken", ["no-run", "missing-default", "too-many-args"])
def test_unexpected_triton_objects_fall_back(fast, broken):
    if broken == "no-run":
        k = _Kernel([_Param("x"), _Param("n"), _Param("eps"), _Param("BLOCK")], compiled_factory=lambda: object())
        args = (torch.zeros(4), 16, 1e-5)
    elif broken == "missing-default":
        k = _Kernel([_Param("x"), _Param("n"), _Param("eps"), _Param("BLOCK"), _Param("EXTRA")])
        args = (torch.zeros(4), 16, 1e-5)
    else:
        k = _Kernel([_Param("x")])
        args = (torch.zeros(4), 16, 1e-5)
    for _ in range(3):
        _runtime.launch(k, (1,), *args, BLOCK=32)
    assert [c[0] for c in k.calls] == ["triton"] * 3


def test_off_by_default_and_under_the_interpreter():
    # the test suite never sets FUSEDRES_FAST_LAUNCH; the interpreter must never take the path
    assert not _runtime.FAST_LAUNCH
    if _runtime.INTERPRET:
        import os
        import subprocess
        import sys

        env = dict(os.environ, FUSEDRES_FAST_LAUNCH="1", TRITON_INTERPRET="1")
        out = subprocess.run([sys.executable, "-c", "import fusedres._runtime as r; print(r.FAST_LAUNCH)"],
                             env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_launch_block_step_bit_identical(monkeypatch, dtype):
    from fusedres.ops import route

    def step(fast_on: bool):
        monkeypatch.setattr(_runtime, "FAST_LAUNCH", fast_on)
        torch.manual_seed(0)
        block = fusedres.PreActBottleneck(64, 16, stride=2).cuda().to(dtype).to(memory_format=torch.channels_last)
        x = torch.randn(8, 64, 16, 16, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        outs = []
        for i in range(3):  # the first step of each specialization goes through Triton, the rest direct
            y = block(x + i)
            y.backward(torch.ones_like(y))
            outs += [y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
            outs += [b.clone() for b in block.buffers()]
            x.grad = None
            block.zero_grad(set_to_none=True)
        return outs

    monkeypatch.setattr(_runtime, "_FAST_CACHE", {})
    with route.force("triton"):
        slow = step(False)
        before = sum(_runtime.fast_launch_counts.values())
        fast = step(True)
    assert sum(_runtime.fast_launch_counts.values()) - before >= 30, "the direct path did not run"
    for a, b in zip(slow, fast):
        assert torch.equal(a, b)
