"""Test set-up: run the real Triton kernels on the CPU (interpreter) when there is no GPU.

TRITON_INTERPRET must be set before ``triton`` is first imported, which is why this happens
here, at collection time, before any test module imports fusedres.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state: module initialisations are reproducible."""
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    """Where the fused kernels run: the GPU when there is one, else the CPU (interpreter)."""
    return DEVICE


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill every floating buffer allocated with torch.empty/empty_like with NaN, so that an
    element a kernel forgets to write (an output, a partial sum, a workspace) fails the test.
    The launch plans are forgotten first, so that their cached scratch is allocated (and
    poisoned) again in the test."""
    from fusedres.ops import bn as bn_ops

    bn_ops.clear_plans()
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(real_empty_like(*a, **k)))


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """Full fp32 products for tests with fixed fp32 tolerances (the kernels follow this flag)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(autouse=True)
def _triton_convolutions(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests exercise our Triton convolutions even where the measured dispatch table would send a
    convolution to cuDNN (tests/test_route.py covers that route and forces it itself), and on
    the portable pointer engine even on an sm_90 GPU, whose launch guards name its kernels
    (tests/test_hopper.py runs the Hopper engine and forces it itself)."""
    from fusedres.ops import route

    with route.force("triton"), route.engine("pointer"):
        yield
