"""The fused computations behind the modules, and how they reach autograd and ``torch.compile``.

Each fused computation (a pre-activation chain, the BN-ReLU-pool head, a torchvision-style
block) is an *impl*: a forward that returns the output and the tensors its backward needs, a
backward, and a shape-only "fake" forward. :func:`run` sends a call down one of two paths:

- eager: a ``torch.autograd.Function`` around the impl (the cheapest dispatch; running
  statistics are updated in place by the finalize kernel);
- under ``torch.compile``: ``torch.library`` custom ops ``fusedres::<name>`` and
  ``fusedres::<name>_backward`` with fake implementations, so that Dynamo traces a model of
  fused blocks with no graph break (forward and backward) and CUDA graphs can replay them. Those
  ops are functional: the new running statistics come back as outputs and are copied into the
  buffers in the traced graph, and convolution weights are made channels_last in the graph
  (no host-side cache that a CUDA-graph replay would miss).

Both paths run the same impl code, so tests of the eager path test the kernels of both.

SyncBatchNorm: a stage whose ``group`` is set reduces its batch statistics (forward) and its
BatchNorm-backward sums (backward) over that process group with ``all_reduce``, count-weighted;
the parameter gradients stay per rank, as in ``nn.SyncBatchNorm`` (DDP averages them).
"""

from __future__ import annotations

import abc
import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .ops import bn as bn_ops
from .ops import conv as conv_ops
from .ops import route

Tensors = Sequence[Optional[torch.Tensor]]


# --------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class StageSpec:
    """One ``conv(relu(bn(h)))`` stage of a chain: its convolution geometry and BatchNorm mode.

    ``group``: a ``torch.distributed`` process group over which the batch statistics are
    synchronised (SyncBatchNorm in training), or None.
    """

    stride: int
    padding: int
    eps: float
    momentum: float
    batch_stats: bool  # normalise with batch statistics (training, or no running statistics)
    group: Any = None


@dataclass(frozen=True)
class ChainSpec:
    """A chain of stages plus how the last stage's output is shortcut-added.

    ``shortcut``: ``"none"``; ``"residual"`` (a tensor argument, as in ``bn_relu_conv2d``);
    ``"identity"`` (the chain's input x); ``"projection"`` (a 1x1 convolution with stride
    ``proj_stride`` of the first stage's activation relu(bn1(x)), as in He et al. 2016).
    ``out_channels_last``: return the output channels_last (else contiguous), as
    ``F.conv2d`` would for the caller's operands.
    """

    stages: tuple[StageSpec, ...]
    shortcut: str = "none"
    proj_stride: int = 1
    out_channels_last: bool = True


@dataclass(frozen=True)
class PostActSpec:
    """A post-activation (torchvision) residual block:
    ``relu(bn_L(conv_L(... relu(bn_1(conv_1(x))) ...)) + shortcut)``.

    ``convs`` holds each convolution's (stride, padding); ``bns`` each BatchNorm's mode, in
    order (one per convolution); ``downsample`` the (stride, BatchNorm mode) of a
    conv1x1 + BatchNorm shortcut, or None for the identity or an externally computed shortcut.
    """

    convs: tuple[tuple[int, int], ...]
    bns: tuple[StageSpec, ...]
    downsample: tuple[int, StageSpec] | None = None
    out_channels_last: bool = True


_SHORTCUTS = ("none", "residual", "identity", "projection")


def _stage_ints(st: StageSpec) -> list[int]:
    return [st.stride, st.padding, int(st.batch_stats)]


def _stage_from(ints: Sequence[int], floats: Sequence[float]) -> StageSpec:
    return StageSpec(int(ints[0]), int(ints[1]), float(floats[0]), float(floats[1]), bool(ints[2]))


# --------------------------------------------------------------------------------------------
# BatchNorm statistics and backward sums, optionally synchronised over a process group


def _finalize(
    partials: tuple[torch.Tensor, torch.Tensor, int] | None,
    h: torch.Tensor,
    st: StageSpec,
    bn: Tensors,
    running_out: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """BatchNorm ``bn`` = (weight, bias, running_mean, running_var) of ``h``: a stats buffer
    (rows mean, invstd, scale, shift; a 5th row local/global count when synchronised) and its
    first four rows. Updates the running statistics in training (in place, or into
    ``running_out``)."""
    N, C, H, W = h.shape
    g, b, rm, rv = bn
    if st.group is not None and st.batch_stats:
        stats = _sync_finalize(partials, N * H * W, st, bn, running_out, h.device)
        return stats, tuple(stats.unbind(0)[:4])
    stats = torch.empty((4, C), device=h.device, dtype=torch.float32)
    rows = bn_ops.bn_finalize(partials, N * H * W, g, b, rm, rv, training=st.batch_stats, momentum=st.momentum,
                              eps=st.eps, channels=C, device=h.device, out=stats, running_out=running_out)
    return stats, rows


def _sync_finalize(
    partials: tuple[torch.Tensor, torch.Tensor, int],
    count: int,
    st: StageSpec,
    bn: Tensors,
    running_out: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
) -> torch.Tensor:
    """SyncBatchNorm statistics: this rank's tile partials merged with every rank's by two
    ``all_reduce`` sums — the count-weighted mean first, then the squared deviations from that
    global mean (exact, no E[x²]-E[x]² cancellation). Ranks may hold different batch sizes."""
    import torch.distributed as dist

    g, b, rm, rv = bn
    pmean, pm2, tile_rows = partials
    T, C = pmean.shape
    cnt = (count - torch.arange(T, device=device, dtype=torch.float64) * tile_rows).clamp_(max=tile_rows)
    first = torch.cat([torch.full((1,), float(count), device=device, dtype=torch.float64),
                       (cnt[:, None] * pmean.double()).sum(0)])
    dist.all_reduce(first, group=st.group)
    n = first[0]
    mean = first[1:] / n
    m2 = pm2.double().sum(0) + (cnt[:, None] * (pmean.double() - mean) ** 2).sum(0)
    dist.all_reduce(m2, group=st.group)
    var = m2 / n
    invstd = torch.rsqrt(var + st.eps)
    scale = invstd * g.double() if g is not None else invstd
    shift = -mean * scale + (b.double() if b is not None else 0.0)
    stats = torch.stack([mean, invstd, scale, shift, (count / n).expand(C)]).float()
    if rm is not None:
        m = st.momentum
        new_rm = ((1 - m) * rm.double() + m * mean).to(rm.dtype)
        new_rv = ((1 - m) * rv.double() + m * m2 / (n - 1)).to(rv.dtype)
        dst = running_out if running_out is not None else (rm, rv)
        dst[0].copy_(new_rm)
        dst[1].copy_(new_rv)
    return stats


def _bwd_sums(
    psum: torch.Tensor, psumx: torch.Tensor, st: StageSpec, stats: torch.Tensor,
    pending: conv_ops.PendingWgrad | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σdz, Σdz·x̂) of this rank (the parameter gradients), and the sums the input gradient
    uses: the same, or — synchronised — the group's sums scaled by local/global count (the
    apply kernel divides by the local count). A ``pending`` weight gradient of the same stage is
    reduced in the same launch."""
    if pending is not None:
        _, s, sx = conv_ops.reduce_wgrad_and_bn_sums(pending, psum, psumx)
    else:
        s, sx = bn_ops.bn_bwd_reduce(psum, psumx)
    if st.group is None or not st.batch_stats:
        return s, sx, s, sx
    import torch.distributed as dist

    tot = torch.stack([s, sx])
    dist.all_reduce(tot, group=st.group)
    tot *= stats[4]
    return s, sx, tot[0], tot[1]


# --------------------------------------------------------------------------------------------
# Statistics handed from a fused block's output to the next fused BatchNorm

# (weak reference to the output, its version counter, its statistics partials): the last
# training-mode fused block of the eager path computed the tile statistics of its output in its
# last convolution's epilogue, so that the BatchNorm that opens the next block (or the head) does
# not read the whole tensor again. One slot: networks run their blocks in sequence.
_HANDOFF: list[tuple[weakref.ref, int, tuple[torch.Tensor, torch.Tensor, int]]] = []


def _hand_off(out: torch.Tensor, partials: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    _HANDOFF[:] = [(weakref.ref(out), out._version, partials)]


def _input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tile statistics partials of ``x``: those handed off with it when ``x`` is, unmodified, the
    output of the previous fused block; else from a statistics pass over ``x``."""
    try:
        ref, version, partials = _HANDOFF.pop()  # (another thread may have emptied the slot)
    except IndexError:
        return bn_ops.bn_stats(x)
    if ref() is x and x._version == version:
        return partials
    return bn_ops.bn_stats(x)


# --------------------------------------------------------------------------------------------
# Impls


# id(weight) -> (weak reference to weight, weight._version, channels_last copy)
_WEIGHT_CACHE: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s work is being recorded into a CUDA graph: host-side caches must not be used
    then (a replay would read what the cache held at capture time, not the current values)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the layout the kernels read fastest, (Cout, R, S, Cin) in memory.

    A channels_last weight is used as it is; any other is copied once and the copy is cached
    against the parameter's version counter, so it is refreshed after an optimizer step and
    never rebuilt per call. While a CUDA graph is captured the copy is made in the graph instead,
    so that every replay reads the weight as it is then.
    """
    if weight.is_contiguous(memory_format=torch.channels_last):
        return weight
    if capturing(weight):
        return weight.detach().contiguous(memory_format=torch.channels_last)
    key = id(weight)
    hit = _WEIGHT_CACHE.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    reordered = weight.detach().contiguous(memory_format=torch.channels_last)
    ref = weakref.ref(weight, lambda _ref, key=key: _WEIGHT_CACHE.pop(key, None))
    _WEIGHT_CACHE[key] = (ref, weight._version, reordered)
    return reordered


def _cl_empty(shape: Sequence[int], like: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(tuple(shape), device=like.device, dtype=like.dtype, memory_format=fmt)


def _stats_empty(channels: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((4, channels), device=like.device, dtype=torch.float32)


class _Impl(abc.ABC):
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
        written to ``running_out`` (new mean, new var per updated BatchNorm) when given."""

    @staticmethod
    @abc.abstractmethod
    def fake_forward(spec: Any, t: Tensors) -> tuple[torch.Tensor, list]:
        """What :meth:`forward` returns, as empty tensors of the same shapes, dtypes and strides."""

    @staticmethod
    @abc.abstractmethod
    def backward(spec: Any, t: Tensors, saved: Sequence[torch.Tensor], dout: torch.Tensor,
                 needs: Sequence[bool]) -> list[torch.Tensor | None]:
        """The gradient of each input in ``t`` whose ``needs`` entry is set (None elsewhere)."""


def _pairs_iter(running_out: list[torch.Tensor] | None):
    it = iter(running_out) if running_out is not None else None

    def take(updates: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        if it is None or not updates:
            return None
        return next(it), next(it)

    return take


_PER_STAGE = 5  # weight, bn_weight, bn_bias, running_mean, running_var


class Chain(_Impl):
    """``h_{i+1} = conv_i(relu(bn_i(h_i)))`` for each stage, plus the shortcut, fused.

    Inputs: x, residual, proj_weight, then per stage (conv weight, bn weight, bn bias,
    running mean, running var).

    Forward: BatchNorm statistics of x by a statistics kernel, of every later stage's input in
    the previous convolution's epilogue; BN-apply + ReLU in each convolution's prologue; the
    shortcut added in the last convolution's epilogue. Saved for backward: x, each inner
    convolution output, the weights and per-channel fp32 statistics — no activation.
    """

    name = "preact_chain"

    @staticmethod
    def encode(spec: ChainSpec) -> tuple[list[int], list[float]]:
        ints = [_SHORTCUTS.index(spec.shortcut), spec.proj_stride, int(spec.out_channels_last)]
        floats: list[float] = []
        for st in spec.stages:
            ints += _stage_ints(st)
            floats += [st.eps, st.momentum]
        return ints, floats

    @staticmethod
    @functools.cache
    def _decode(ints: tuple[int, ...], floats: tuple[float, ...]) -> ChainSpec:
        n = (len(ints) - 3) // 3
        stages = tuple(_stage_from(ints[3 + 3 * i : 6 + 3 * i], floats[2 * i : 2 * i + 2]) for i in range(n))
        return ChainSpec(stages, _SHORTCUTS[ints[0]], int(ints[1]), bool(ints[2]))

    @staticmethod
    def decode(ints: Sequence[int], floats: Sequence[float]) -> ChainSpec:
        return Chain._decode(tuple(ints), tuple(floats))

    @staticmethod
    def slots(spec: ChainSpec) -> list[tuple[StageSpec, int, int]]:
        return [(st, 3 + _PER_STAGE * i + 3, 3 + _PER_STAGE * i + 4) for i, st in enumerate(spec.stages)]

    @staticmethod
    def weights(spec: ChainSpec) -> list[int]:
        return [2] + [3 + _PER_STAGE * i for i in range(len(spec.stages))]

    @staticmethod
    def unsaved(spec: ChainSpec) -> set[int]:
        return {1}  # the residual: its gradient is dout

    @staticmethod
    def forward(spec: ChainSpec, t: Tensors, running_out: list[torch.Tensor] | None) -> tuple[torch.Tensor, list]:
        x, residual, proj_weight = t[:3]
        n_stages = len(spec.stages)
        take = _pairs_iter(running_out)
        h = x
        inner: list[torch.Tensor] = []
        all_stats: list[torch.Tensor] = []
        # The eager path (no running_out: not a custom op under torch.compile) of a training block
        # computes its output's statistics for the next block (see _input_stats).
        hand_off = running_out is None and spec.stages[0].batch_stats and spec.out_channels_last
        partials = _input_stats(x) if spec.stages[0].batch_stats else None
        shortcut = None
        for i, st in enumerate(spec.stages):
            w, g, b, rm, rv = t[3 + _PER_STAGE * i : 3 + _PER_STAGE * (i + 1)]
            stats, (mean, invstd, scale, shift) = _finalize(partials, h, st, (g, b, rm, rv),
                                                            take(st.batch_stats and rm is not None))
            all_stats.append(stats)
            if i == 0:
                if spec.shortcut == "projection":
                    shortcut, _ = route.conv_fprop(
                        x, kernel_weight(proj_weight), stride=spec.proj_stride, padding=0, scale=scale, shift=shift,
                    )
                elif spec.shortcut == "identity":
                    shortcut = x
                elif spec.shortcut == "residual":
                    shortcut = residual
            else:
                inner.append(h)
            last = i == n_stages - 1
            next_batch_stats = hand_off if last else spec.stages[i + 1].batch_stats
            h, partials = route.conv_fprop(
                h, kernel_weight(w), stride=st.stride, padding=st.padding, scale=scale, shift=shift,
                residual=shortcut if last else None, stats=next_batch_stats,
            )
        if hand_off and partials is not None:
            _hand_off(h, partials)
        if not spec.out_channels_last:
            h = h.contiguous()
        return h, inner + all_stats

    @staticmethod
    def fake_forward(spec: ChainSpec, t: Tensors) -> tuple[torch.Tensor, list]:
        x = t[0]
        N, C, H, W = x.shape
        inner, all_stats = [], []
        for i, st in enumerate(spec.stages):
            w = t[3 + _PER_STAGE * i]
            all_stats.append(_stats_empty(C, x))
            H = conv_ops.conv_out_size(H, w.shape[2], st.stride, st.padding)
            W = conv_ops.conv_out_size(W, w.shape[3], st.stride, st.padding)
            C = w.shape[0]
            if i < len(spec.stages) - 1:
                inner.append(_cl_empty((N, C, H, W), x))
        return _cl_empty((N, C, H, W), x, spec.out_channels_last), inner + all_stats

    @staticmethod
    def backward(spec: ChainSpec, t: Tensors, saved: Sequence[torch.Tensor], dout: torch.Tensor,
                 needs: Sequence[bool]) -> list[torch.Tensor | None]:
        n_stages = len(spec.stages)
        x, _, proj_weight = t[:3]
        inputs = [x, *saved[: n_stages - 1]]
        all_stats = saved[n_stages - 1 :]
        need_x = needs[0]
        grads: list[torch.Tensor | None] = [None] * len(t)
        stage_needs = [needs[3 + _PER_STAGE * i : 3 + _PER_STAGE * (i + 1)] for i in range(n_stages)]
        dh = dout
        for i in reversed(range(n_stages)):
            st = spec.stages[i]
            w, g, b = t[3 + _PER_STAGE * i : 6 + _PER_STAGE * i]
            stats = all_stats[i]
            mean, invstd, scale, shift = stats.unbind(0)[:4]
            h = inputs[i]
            need_w, need_g, need_b = stage_needs[i][:3]
            pending = None  # a weight gradient whose split sums the backward-sum launch reduces
            if need_w:
                dw = route.conv_wgrad(
                    dh, h, w, stride=st.stride, padding=st.padding, scale=scale, shift=shift, defer_reduce=True,
                )
                if isinstance(dw, conv_ops.PendingWgrad):
                    pending, dw = dw, dw.dw
                grads[3 + _PER_STAGE * i] = dw
            if i == 0 and spec.shortcut == "projection" and needs[2]:
                grads[2] = route.conv_wgrad(
                    dout, h, proj_weight, stride=spec.proj_stride, padding=0, scale=scale, shift=shift,
                )
            below = need_x or need_g or need_b or any(any(n[:3]) for n in stage_needs[:i])
            if not below:
                if pending is not None:
                    pending.finish()
                break
            add = None
            if i == 0 and spec.shortcut == "projection":
                add, _ = route.conv_dgrad(dout, kernel_weight(proj_weight), tuple(h.shape),
                                             stride=spec.proj_stride, padding=0)
            dz, (psum, psumx) = route.conv_dgrad(
                dh, kernel_weight(w), tuple(h.shape), stride=st.stride, padding=st.padding,
                bn=(h, scale, shift, mean, invstd), add=add,
            )
            dh = add = None  # used up: their memory can hold the next gradient
            sum_dz, sum_dzx, apply_dz, apply_dzx = _bwd_sums(psum, psumx, st, stats, pending)
            if need_g and g is not None:
                grads[3 + _PER_STAGE * i + 1] = sum_dzx.to(g.dtype)
            if need_b and b is not None:
                grads[3 + _PER_STAGE * i + 2] = sum_dz.to(b.dtype)
            if i > 0 or need_x:
                identity = i == 0 and spec.shortcut == "identity"
                dh = bn_ops.bn_bwd_apply(
                    dz, h, mean, invstd, g, apply_dz, apply_dzx, training=st.batch_stats,
                    add=dout if identity else None,
                )
        if need_x:
            grads[0] = dh
        if spec.shortcut == "residual" and needs[1]:
            grads[1] = dout
        return grads


class Pool(_Impl):
    """``mean over H, W of relu(bn(x))`` — a pre-activation network's head — fused.

    Inputs: x, bn weight, bn bias, running mean, running var.
    """

    name = "bn_relu_pool"

    @staticmethod
    def encode(spec: StageSpec) -> tuple[list[int], list[float]]:
        return _stage_ints(spec), [spec.eps, spec.momentum]

    @staticmethod
    def decode(ints: Sequence[int], floats: Sequence[float]) -> StageSpec:
        return _stage_from(ints, floats)

    @staticmethod
    def slots(spec: StageSpec) -> list[tuple[StageSpec, int, int]]:
        return [(spec, 3, 4)]

    @staticmethod
    def forward(spec: StageSpec, t: Tensors, running_out: list[torch.Tensor] | None) -> tuple[torch.Tensor, list]:
        x, g, b, rm, rv = t
        partials = _input_stats(x) if spec.batch_stats else None
        stats, (_, _, scale, shift) = _finalize(partials, x, spec, (g, b, rm, rv),
                                                _pairs_iter(running_out)(spec.batch_stats and rm is not None))
        return bn_ops.bn_relu_pool(x, scale, shift), [stats]

    @staticmethod
    def fake_forward(spec: StageSpec, t: Tensors) -> tuple[torch.Tensor, list]:
        x = t[0]
        N, C = x.shape[:2]
        return x.new_empty((N, C)), [_stats_empty(C, x)]

    @staticmethod
    def backward(spec: StageSpec, t: Tensors, saved: Sequence[torch.Tensor], dout: torch.Tensor,
                 needs: Sequence[bool]) -> list[torch.Tensor | None]:
        x, g, b = t[:3]
        (stats,) = saved
        mean, invstd, scale, shift = stats.unbind(0)[:4]
        dz, psum, psumx = bn_ops.bn_relu_pool_bwd(dout, x, scale, shift, mean, invstd)
        s, sx, apply_s, apply_sx = _bwd_sums(psum, psumx, spec, stats)
        grads: list[torch.Tensor | None] = [None] * 5
        if needs[0]:
            grads[0] = bn_ops.bn_bwd_apply(dz, x, mean, invstd, g, apply_s, apply_sx, training=spec.batch_stats)
        if needs[1] and g is not None:
            grads[1] = sx.to(g.dtype)
        if needs[2] and b is not None:
            grads[2] = s.to(b.dtype)
        return grads


_PER_BN = 4  # weight, bias, running_mean, running_var


class PostAct(_Impl):
    """A torchvision BasicBlock/Bottleneck with batch or running statistics, fused.

    Inputs: x, shortcut (an externally computed one, or None), the n convolution weights, the
    (weight, bias, running_mean, running_var) of the n BatchNorms, then — with a downsample —
    its conv weight and its BatchNorm's four.

    Each convolution's epilogue gathers the statistics of its output; the next convolution
    applies that BatchNorm and the ReLU while loading; one elementwise pass closes the block
    with relu(bn(y) + shortcut). Saved: x, each convolution output (and the downsample
    output), the weights and per-channel fp32 statistics — no activation.
    """

    name = "postact_block"

    @staticmethod
    def encode(spec: PostActSpec) -> tuple[list[int], list[float]]:
        n = len(spec.convs)
        ints = [n, int(spec.out_channels_last), int(spec.downsample is not None)]
        floats: list[float] = []
        for (stride, pad), st in zip(spec.convs, spec.bns):
            ints += [stride, pad, *_stage_ints(st)]
            floats += [st.eps, st.momentum]
        if spec.downsample is not None:
            stride, st = spec.downsample
            ints += [stride, 0, *_stage_ints(st)]
            floats += [st.eps, st.momentum]
        return ints, floats

    @staticmethod
    @functools.cache
    def _decode(ints: tuple[int, ...], floats: tuple[float, ...]) -> PostActSpec:
        n, out_cl, has_ds = ints[0], bool(ints[1]), bool(ints[2])
        convs, bns = [], []
        for i in range(n + has_ds):
            q = ints[3 + 5 * i : 8 + 5 * i]
            convs.append((int(q[0]), int(q[1])))
            bns.append(_stage_from(q[2:], floats[2 * i : 2 * i + 2]))
        ds = (convs[n][0], bns[n]) if has_ds else None
        return PostActSpec(tuple(convs[:n]), tuple(bns[:n]), ds, out_cl)

    @staticmethod
    def decode(ints: Sequence[int], floats: Sequence[float]) -> PostActSpec:
        return PostAct._decode(tuple(ints), tuple(floats))

    @staticmethod
    def _bn_index(spec: PostActSpec, i: int) -> int:
        """Index of BatchNorm i's weight (i == n: the downsample's)."""
        n = len(spec.convs)
        return 2 + n + _PER_BN * i if i < n else 2 + n + _PER_BN * n + 1

    @staticmethod
    def _bn_specs(spec: PostActSpec) -> list[StageSpec]:
        return list(spec.bns) + ([spec.downsample[1]] if spec.downsample is not None else [])

    @staticmethod
    def slots(spec: PostActSpec) -> list[tuple[StageSpec, int, int]]:
        return [(st, PostAct._bn_index(spec, i) + 2, PostAct._bn_index(spec, i) + 3)
                for i, st in enumerate(PostAct._bn_specs(spec))]

    @staticmethod
    def weights(spec: PostActSpec) -> list[int]:
        n = len(spec.convs)
        return [2 + i for i in range(n)] + ([2 + n + _PER_BN * n] if spec.downsample is not None else [])

    @staticmethod
    def forward(spec: PostActSpec, t: Tensors, running_out: list[torch.Tensor] | None) -> tuple[torch.Tensor, list]:
        n = len(spec.convs)
        x, shortcut = t[0], t[1]
        weights = t[2 : 2 + n]
        bn_specs = PostAct._bn_specs(spec)
        take = _pairs_iter(running_out)
        all_stats: list[torch.Tensor] = []

        def finalize(partials, h: torch.Tensor, i: int) -> tuple[torch.Tensor, ...]:
            k = PostAct._bn_index(spec, i)
            st = bn_specs[i]
            stats, fin = _finalize(partials, h, st, t[k : k + 4], take(st.batch_stats and t[k + 2] is not None))
            all_stats.append(stats)
            return fin

        ys: list[torch.Tensor] = []
        h, scale, shift = x, None, None
        for i, (stride, pad) in enumerate(spec.convs):
            h, partials = route.conv_fprop(
                h, kernel_weight(weights[i]), stride=stride, padding=pad, scale=scale, shift=shift,
                stats=spec.bns[i].batch_stats,
            )
            ys.append(h)
            _, _, scale, shift = finalize(partials, h, i)
        r, r_affine = (shortcut if shortcut is not None else x), ()
        extra: list[torch.Tensor] = []
        if spec.downsample is not None:
            ds_stride, ds_st = spec.downsample
            ds_w = t[2 + n + _PER_BN * n]
            r, ds_partials = route.conv_fprop(x, kernel_weight(ds_w), stride=ds_stride, padding=0,
                                                 stats=ds_st.batch_stats)
            r_affine = finalize(ds_partials, r, n)[2:]
            extra = [r]
        out = bn_ops.bn_add_relu(h, r, scale, shift, *r_affine)
        if not spec.out_channels_last:
            out = out.contiguous()
        return out, extra + ys + all_stats

    @staticmethod
    def fake_forward(spec: PostActSpec, t: Tensors) -> tuple[torch.Tensor, list]:
        x = t[0]
        N, C, H, W = x.shape
        ys, all_stats = [], []
        for i, (stride, pad) in enumerate(spec.convs):
            w = t[2 + i]
            H = conv_ops.conv_out_size(H, w.shape[2], stride, pad)
            W = conv_ops.conv_out_size(W, w.shape[3], stride, pad)
            C = w.shape[0]
            ys.append(_cl_empty((N, C, H, W), x))
            all_stats.append(_stats_empty(C, x))
        extra = []
        if spec.downsample is not None:
            extra = [_cl_empty((N, C, H, W), x)]
            all_stats.append(_stats_empty(C, x))
        return _cl_empty((N, C, H, W), x, spec.out_channels_last), extra + ys + all_stats

    @staticmethod
    def backward(spec: PostActSpec, t: Tensors, saved: Sequence[torch.Tensor], dout: torch.Tensor,
                 needs: Sequence[bool]) -> list[torch.Tensor | None]:
        n = len(spec.convs)
        has_ds = spec.downsample is not None
        x, shortcut = t[0], t[1]
        weights = t[2 : 2 + n]
        bn_specs = PostAct._bn_specs(spec)
        r_saved = saved[0] if has_ds else shortcut
        ys = saved[int(has_ds) : int(has_ds) + n]
        all_stats = saved[int(has_ds) + n :]
        fins = [s.unbind(0)[:4] for s in all_stats]  # (mean, invstd, scale, shift)
        grads: list[torch.Tensor | None] = [None] * len(t)

        def bn_backward(i: int, dz: torch.Tensor, h: torch.Tensor, psum: torch.Tensor,
                        psumx: torch.Tensor, pending: conv_ops.PendingWgrad | None = None) -> torch.Tensor:
            """BatchNorm i's parameter gradients into ``grads``; returns the gradient at its input."""
            k = PostAct._bn_index(spec, i)
            st = bn_specs[i]
            s, sx, apply_s, apply_sx = _bwd_sums(psum, psumx, st, all_stats[i], pending)
            if needs[k] and t[k] is not None:
                grads[k] = sx.to(t[k].dtype)
            if needs[k + 1] and t[k + 1] is not None:
                grads[k + 1] = s.to(t[k + 1].dtype)
            mean, inv = fins[i][0], fins[i][1]
            return bn_ops.bn_bwd_apply(dz, h, mean, inv, t[k], apply_s, apply_sx, training=st.batch_stats)

        r = r_saved if r_saved is not None else x
        mean_l, inv_l, s_l, b_l = fins[n - 1]
        r_bn = (fins[n][2], fins[n][3], fins[n][0], fins[n][1]) if has_ds else None
        g, psum, psumy, psumr = bn_ops.bn_add_relu_bwd(dout, ys[-1], r, s_l, b_l, mean_l, inv_l, r_bn)
        dh = bn_backward(n - 1, g, ys[-1], psum, psumy)
        dx_add = None
        if has_ds:
            ds_stride, _ = spec.downsample
            ds_w = t[2 + n + _PER_BN * n]
            dd = bn_backward(n, g, r_saved, psum, psumr)
            if needs[2 + n + _PER_BN * n]:
                grads[2 + n + _PER_BN * n] = route.conv_wgrad(dd, x, ds_w, stride=ds_stride, padding=0)
            if needs[0]:
                dx_add, _ = route.conv_dgrad(dd, kernel_weight(ds_w), tuple(x.shape), stride=ds_stride,
                                                padding=0)
        elif needs[0] and shortcut is None:
            dx_add = g  # identity shortcut
        for i in reversed(range(n)):
            stride, pad = spec.convs[i]
            h_in = x if i == 0 else ys[i - 1]
            scale, shift = (fins[i - 1][2], fins[i - 1][3]) if i > 0 else (None, None)
            pending = None  # reduced by the backward-sum launch of BatchNorm i - 1
            if needs[2 + i]:
                dw = route.conv_wgrad(dh, h_in, weights[i], stride=stride, padding=pad, scale=scale, shift=shift,
                                      defer_reduce=i > 0)
                if isinstance(dw, conv_ops.PendingWgrad):
                    pending, dw = dw, dw.dw
                grads[2 + i] = dw
            if i > 0:
                dz, (ps, psx) = route.conv_dgrad(
                    dh, kernel_weight(weights[i]), tuple(h_in.shape), stride=stride, padding=pad,
                    bn=(h_in, scale, shift, fins[i - 1][0], fins[i - 1][1]),
                )
                dh = bn_backward(i - 1, dz, h_in, ps, psx, pending)
            elif needs[0]:
                dh, _ = route.conv_dgrad(dh, kernel_weight(weights[0]), tuple(x.shape), stride=stride,
                                            padding=pad, add=dx_add)
        if needs[0]:
            grads[0] = dh
        if shortcut is not None and not has_ds and needs[1]:
            grads[1] = g
        return grads


# --------------------------------------------------------------------------------------------
# Dispatch: eager autograd.Function, or torch.library custom ops under torch.compile


def _kept(impl: type[_Impl], spec: Any, t: Tensors) -> list[torch.Tensor | None]:
    """The inputs the backward keeps: all but the running statistics and ``impl.unsaved``."""
    drop = impl.unsaved(spec) | {i for _, rm, rv in impl.slots(spec) for i in (rm, rv)}
    return [None if i in drop else v for i, v in enumerate(t)]


class _EagerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, impl: type[_Impl], spec: Any, *t: torch.Tensor | None) -> torch.Tensor:
        out, saved = impl.forward(spec, t, None)
        ctx.save_for_backward(*_kept(impl, spec, t), *saved)
        ctx.impl, ctx.spec, ctx.n = impl, spec, len(t)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        st = ctx.saved_tensors
        grads = ctx.impl.backward(ctx.spec, st[: ctx.n], st[ctx.n :], dout, ctx.needs_input_grad[2:])
        return (None, None, *grads)


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


def _define_ops(impl: type[_Impl]) -> None:
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


for _impl in (Chain, Pool, PostAct):
    _define_ops(_impl)


def run(impl: type[_Impl], spec: Any, tensors: list[torch.Tensor | None]) -> torch.Tensor:
    """Run a validated fused computation: eagerly through :class:`_EagerFn`, or — while
    ``torch.compile`` traces — through the ``fusedres::`` custom ops (functional: the new running
    statistics are copied into the buffers in the graph)."""
    if not torch.compiler.is_compiling():
        return _EagerFn.apply(impl, spec, *tensors)
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


# --------------------------------------------------------------------------------------------
# What a BatchNorm module would do this call


class BnMode(NamedTuple):
    """What ``nn.BatchNorm2d.forward`` would do this call (see :func:`bn_mode`)."""

    batch_stats: bool
    momentum: float
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    cumulative: torch.Tensor | None  # momentum=None: the averaging factor 1/num_batches_tracked
    group: Any  # SyncBatchNorm in training across several processes: the process group

    def stage(self, bn: nn.Module, stride: int = 1, padding: int = 0) -> StageSpec:
        return StageSpec(stride, padding, float(bn.eps), self.momentum, self.batch_stats, self.group)


def _sync_group(bn: nn.Module) -> Any:
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _counts_batches(bn: nn.Module) -> bool:
    return bn.training and bn.track_running_stats and bn.num_batches_tracked is not None


def bn_mode(bn: nn.Module) -> BnMode:
    """What ``bn.forward`` would do this call: whether it normalises with batch statistics, the
    running-average factor, the running buffers to use (or None), and for ``momentum=None`` the
    cumulative factor as a tensor (no host synchronisation: the caller applies it with
    :func:`cumulative_update`). Call it after ``num_batches_tracked`` was incremented (as the
    module itself does in training; :func:`bn_modes` does both)."""
    momentum = 0.0 if bn.momentum is None else float(bn.momentum)
    cumulative = None
    if _counts_batches(bn):
        if bn.momentum is None:
            cumulative = 1.0 / bn.num_batches_tracked
            momentum = 1.0  # the kernel writes the batch statistics; cumulative_update averages
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    rm = bn.running_mean if use_running else None
    rv = bn.running_var if use_running else None
    return BnMode(batch_stats, momentum, rm, rv, cumulative, _sync_group(bn))


def bn_modes(bns: Sequence[nn.Module]) -> list[BnMode] | None:
    """:func:`bn_mode` of each BatchNorm, or None — nothing counted — when a SyncBatchNorm would
    synchronise while ``torch.compile`` traces (the fused path does that eagerly only; the caller
    runs the modules' own forward instead)."""
    if torch.compiler.is_compiling() and any(_sync_group(bn) is not None for bn in bns):
        return None
    counters = [bn.num_batches_tracked for bn in bns if _counts_batches(bn)]
    if counters:  # as the modules do in training; one multi-tensor kernel for all of them
        torch._foreach_add_(counters, 1)
    return [bn_mode(bn) for bn in bns]


class _Cumulative:
    """Running statistics averaged with ``momentum=None``: snapshot before the fused call,
    average after it (the fused call overwrote them with the batch statistics)."""

    def __init__(self, modes: Sequence[BnMode]) -> None:
        self.items = [(m.running_mean, m.running_var, m.running_mean.clone(), m.running_var.clone(), m.cumulative)
                      for m in modes if m.cumulative is not None and m.batch_stats and m.running_mean is not None]

    def finish(self) -> None:
        with torch.no_grad():
            for rm, rv, old_rm, old_rv, factor in self.items:
                rm.copy_(torch.lerp(old_rm, rm, factor.to(rm.dtype)))
                rv.copy_(torch.lerp(old_rv, rv, factor.to(rv.dtype)))


def cumulative_update(modes: Sequence[BnMode]) -> _Cumulative:
    """Call before the fused computation; call ``.finish()`` after it."""
    return _Cumulative(modes)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None."""
    kind = device.type
    if kind not in ("cuda", "cpu") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)
