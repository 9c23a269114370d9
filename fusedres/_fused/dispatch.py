"""How a fused computation reaches autograd and ``torch.compile``.

Each fused computation (a pre-activation chain, the BN-ReLU-pool head, a torchvision-style block)
is an :class:`Impl`: a forward that returns the output and the tensors its backward needs, a
backward, and a shape-only "fake" forward, over a flat list of optional tensors (layouts in
:mod:`.specs`). :func:`run` sends a call down one of two paths:

- eager: a ``torch.autograd.Function`` around the impl (the cheapest dispatch; running
  statistics are updated in place by the finalize kernel);
- under ``torch.compile``: ``torch.library`` custom ops ``fusedres::<name>`` and
  ``fusedres::<name>_backward`` with fake implementations (registered by :func:`define_ops`),
  so that Dynamo traces a model of fused blocks with no graph break (forward and backward) and
  CUDA graphs can replay them. Those ops are functional: the new running statistics come back as
  outputs and are copied into the buffers in the traced graph, and convolution weights are made
  channels_last in the graph (no host-side cache that a CUDA-graph replay would miss).

Both paths run the same impl code, so tests of the eager path test the kernels of both.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .specs import StageSpec, Tensors


class Impl(abc.ABC):
    """Interface of a fused computation over a flat list of optional tensors (the subclasses are
    namespaces of static methods, never instantiated)."""

    name: str

    @staticmethod
    @abc.abstractmethod
    def encode(spec: Any) -> tuple[list[int], list[float]]:
        """The spec as the custom ops' int and float lists (traceable by Dynamo)."""

    @staticmethod
    @abc.abstractmethod
    def decode(ints: Sequence[int], floats: Sequence[float]) -> Any:
        """The inverse of :meth:`encode`."""

    @staticmethod
    @abc.abstractmethod
    def slots(spec: Any) -> list[tuple[StageSpec, int, int]]:
        """(BatchNorm mode, running_mean index, running_var index) of each BatchNorm."""

    @classmethod
    def dropped(cls, spec: Any) -> frozenset[int]:
        """Indices of the inputs the backward does not keep: :meth:`unsaved` and the running
        statistics (an impl may cache it)."""
        return frozenset(cls.unsaved(spec) | {i for _, rm, rv in cls.slots(spec) for i in (rm, rv)})

    @classmethod
    def running(cls, spec: Any, t: Tensors) -> list[tuple[int, int]]:
        """(running_mean index, running_var index) of each BatchNorm the forward updates."""
        return [(i, j) for st, i, j in cls.slots(spec) if st.batch_stats and t[i] is not None]

    @staticmethod
    def weights(spec: Any) -> list[int]:
        """Indices of the convolution weights."""
        return []

    @staticmethod
    def unsaved(spec: Any) -> set[int]:
        """Indices of inputs the backward does not need (besides running statistics)."""
        return set()

    @staticmethod
    @abc.abstractmethod
    def forward(spec: Any, t: Tensors, running_out: list[torch.Tensor] | None) -> tuple[torch.Tensor, list]:
        """(output, new tensors the backward needs); running statistics updated in place, or
        written to ``running_out`` (new mean, new var per updated BatchNorm) when given. An impl
        whose kernels can count batches also takes ``batches`` (see :func:`run`)."""

    @staticmethod
    @abc.abstractmethod
    def fake_forward(spec: Any, t: Tensors) -> tuple[torch.Tensor, list]:
        """What :meth:`forward` returns, as empty tensors of the same shapes, dtypes and strides."""

    @staticmethod
    @abc.abstractmethod
    def backward(spec: Any, t: Tensors, saved: Sequence[torch.Tensor], dout: torch.Tensor,
                 needs: Sequence[bool]) -> list[torch.Tensor | None]:
        """The gradient of each input in ``t`` whose ``needs`` entry is set (None elsewhere)."""


def _kept(impl: type[Impl], spec: Any, t: Tensors) -> list[torch.Tensor | None]:
    """The inputs the backward keeps: all but the running statistics and ``impl.unsaved``."""
    drop = impl.dropped(spec)
    return [None if i in drop else v for i, v in enumerate(t)]


class _EagerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, impl: type[Impl], spec: Any, batches: Any, *t: torch.Tensor | None) -> torch.Tensor:
        if batches is None:
            out, saved = impl.forward(spec, t, None)
        else:
            out, saved = impl.forward(spec, t, None, batches=batches)
        ctx.save_for_backward(*_kept(impl, spec, t), *saved)
        ctx.impl, ctx.spec, ctx.n = impl, spec, len(t)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        st = ctx.saved_tensors
        grads = ctx.impl.backward(ctx.spec, st[: ctx.n], st[ctx.n :], dout, ctx.needs_input_grad[3:])
        return (None, None, None, *grads)


def _conform(g: torch.Tensor, like: torch.Tensor, inputs: Sequence[Any]) -> torch.Tensor:
    """``g`` laid out as ``like`` (what the fake implementation promises) and not aliasing any
    input of the op (custom-op outputs must not)."""
    if g.stride() == like.stride() and not any(g is a for a in inputs):
        return g
    return torch.empty_like(like).copy_(g)


def _unpack(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """The custom ops take ``Tensor[]`` (autograd does not see through ``Tensor?[]``): an absent
    tensor travels as an empty placeholder (no real input of a fused computation is empty)."""
    return [None if t.numel() == 0 else t for t in tensors]


def define_ops(impl: type[Impl]) -> None:
    """Register ``fusedres::<name>`` and ``fusedres::<name>_backward`` for ``impl``."""
    fwd_name, bwd_name = f"fusedres::{impl.name}", f"fusedres::{impl.name}_backward"

    def fwd(ints: Sequence[int], floats: Sequence[float], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        spec = impl.decode(ints, floats)
        t = _unpack(tensors)
        running_out = [torch.empty_like(t[i]) for pair in impl.running(spec, t) for i in pair]
        out, saved = impl.forward(spec, t, running_out)
        return [out, *running_out, *saved]

    def fwd_fake(ints: Sequence[int], floats: Sequence[float], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        spec = impl.decode(ints, floats)
        t = _unpack(tensors)
        running_out = [torch.empty_like(t[i]) for pair in impl.running(spec, t) for i in pair]
        out, saved = impl.fake_forward(spec, t)
        return [out, *running_out, *saved]

    def bwd(ints: Sequence[int], floats: Sequence[float], tensors: Sequence[torch.Tensor],
            saved: Sequence[torch.Tensor], dout: torch.Tensor, needs: Sequence[bool]) -> list[torch.Tensor]:
        spec = impl.decode(ints, floats)
        grads = impl.backward(spec, _unpack(tensors), saved, dout, needs)
        inputs = [*tensors, *saved, dout]
        return [_conform(g, t, inputs) for g, t, need in zip(grads, tensors, needs) if need]

    def bwd_fake(ints: Sequence[int], floats: Sequence[float], tensors: Sequence[torch.Tensor],
                 saved: Sequence[torch.Tensor], dout: torch.Tensor, needs: Sequence[bool]) -> list[torch.Tensor]:
        return [torch.empty_like(t) for t, need in zip(tensors, needs) if need]

    fwd_op = torch.library.custom_op(fwd_name, fwd, mutates_args=())
    fwd_op.register_fake(fwd_fake)
    bwd_op = torch.library.custom_op(bwd_name, bwd, mutates_args=())
    bwd_op.register_fake(bwd_fake)

    def setup_context(ctx: Any, inputs: tuple, output: list[torch.Tensor]) -> None:
        ints, floats, tensors = inputs
        spec = impl.decode(ints, floats)
        t = _unpack(tensors)
        n_run = 2 * len(impl.running(spec, t))
        kept = _kept(impl, spec, t)
        placeholder = tensors[0].new_empty(0)
        ctx.save_for_backward(*(placeholder if v is None else v for v in kept), *output[1 + n_run :])
        ctx.ints, ctx.floats, ctx.n = list(ints), list(floats), len(tensors)

    def backward(ctx: Any, grads: list[torch.Tensor | None]) -> tuple:
        st = ctx.saved_tensors
        needs = [bool(v) for v in ctx.needs_input_grad[2]]
        got = iter(bwd_op(ctx.ints, ctx.floats, list(st[: ctx.n]), list(st[ctx.n :]), grads[0], needs))
        return None, None, [next(got) if need else None for need in needs]

    fwd_op.register_autograd(backward, setup_context=setup_context)


def run(impl: type[Impl], spec: Any, tensors: list[torch.Tensor | None],
        batches: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Run a validated fused computation: eagerly through :class:`_EagerFn`, or — while
    ``torch.compile`` traces — through the ``fusedres::`` custom ops (functional: the new running
    statistics are copied into the buffers in the graph).

    ``batches``: per BatchNorm of the impl, the ``num_batches_tracked`` to add 1 to (or None),
    counted by the launches that finalize the statistics (eager: no ``_foreach_add_`` launch);
    only for an impl whose forward takes them (:class:`Chain`)."""
    if not torch.compiler.is_compiling():
        return _EagerFn.apply(impl, spec, batches, *tensors)
    if batches is not None:  # (the custom ops are functional: count in the graph)
        counted = [b for b in batches if b is not None]
        if counted:
            torch._foreach_add_(counted, 1)
    tensors = list(tensors)
    for i in impl.weights(spec):
        if tensors[i] is not None:
            tensors[i] = tensors[i].contiguous(memory_format=torch.channels_last)
    ints, floats = impl.encode(spec)
    placeholder = tensors[0].new_empty(0)
    outs = getattr(torch.ops.fusedres, impl.name)(ints, floats, [placeholder if t is None else t for t in tensors])
    with torch.no_grad():
        for k, (i_rm, i_rv) in enumerate(impl.running(spec, tensors)):
            tensors[i_rm].copy_(outs[1 + 2 * k])
            tensors[i_rv].copy_(outs[2 + 2 * k])
    return outs[0]



def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None."""
    kind = device.type
    if kind not in ("cuda", "cpu") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)
