"""BatchNorm around the fused computations: statistics and backward sums (optionally synchronised
over a process group), the statistics one block hands to the next, and — on the module side — what
an ``nn.BatchNorm2d`` would do this call, run around a fused computation by :func:`with_bn_modes`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from ..ops import bn as bn_ops
from ..ops import conv as conv_ops
from .specs import StageSpec, Tensors

# --------------------------------------------------------------------------------------------
# Statistics and backward sums, optionally synchronised over a process group


def producer_finalize(
    channels: int,
    like: torch.Tensor,
    st: StageSpec,
    bn: Tensors,
    running_out: tuple[torch.Tensor, torch.Tensor] | None,
    batches: torch.Tensor | None = None,
) -> bn_ops.Finalize | None:
    """What the launch that produces the statistics partials of a BatchNorm's input needs to
    finalize them in its last programs (a launch less), or None where that launch must leave
    them to :func:`finalize`: running statistics (nothing to merge), SyncBatchNorm (the merge
    needs every rank's partials), or the two-launch path chosen
    (:func:`fusedres.ops.bn.producer_reductions`). ``batches``: the ``num_batches_tracked`` the
    finalizing launch increments (None: the caller counts)."""
    if not (st.batch_stats and st.group is None and bn_ops.TICKETS):
        return None
    g, b, rm, rv = bn
    stats = torch.empty((4, channels), device=like.device, dtype=torch.float32)
    return bn_ops.Finalize(stats, g, b, rm, rv, running_out, st.momentum, st.eps, batches)


def finalize(
    partials: tuple[torch.Tensor, torch.Tensor, int] | bn_ops.Finalize | None,
    h: torch.Tensor,
    st: StageSpec,
    bn: Tensors,
    running_out: tuple[torch.Tensor, torch.Tensor] | None,
    batches: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """BatchNorm ``bn`` = (weight, bias, running_mean, running_var) of ``h``: a stats buffer
    (rows mean, invstd, scale, shift; a 5th row local/global count when synchronised) and its
    first four rows. Updates the running statistics in training (in place, or into
    ``running_out``), and adds 1 to ``batches`` when given (training only). ``partials`` may be
    the :class:`fusedres.ops.bn.Finalize` that the producing launch already carried out (from
    :func:`producer_finalize`, which was given the same ``batches``): nothing left to do."""
    if isinstance(partials, bn_ops.Finalize):
        return partials.stats, partials.rows()
    N, C, H, W = h.shape
    g, b, rm, rv = bn
    if st.group is not None and st.batch_stats:
        stats = _sync_finalize(partials, N * H * W, st, bn, running_out, h.device)
        if batches is not None:
            batches.add_(1)
        return stats, tuple(stats.unbind(0)[:4])
    stats = torch.empty((4, C), device=h.device, dtype=torch.float32)
    rows = bn_ops.bn_finalize(partials, N * H * W, g, b, rm, rv, training=st.batch_stats, momentum=st.momentum,
                              eps=st.eps, channels=C, device=h.device, out=stats, running_out=running_out,
                              batches=batches)
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


def bwd_sums(
    partials: tuple[torch.Tensor, torch.Tensor] | bn_ops.Sums, st: StageSpec, stats: torch.Tensor,
    pending: conv_ops.PendingWgrad | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σdz, Σdz·x̂) of this rank (the parameter gradients), and the sums the input gradient
    uses: the same, or — synchronised — the group's sums scaled by local/global count (the
    apply kernel divides by the local count). ``partials`` are the per-tile (psum, psumx), or the
    :class:`fusedres.ops.bn.Sums` their producer already reduced. A ``pending`` weight gradient
    of the same stage is reduced in the same launch."""
    if isinstance(partials, bn_ops.Sums):
        s, sx = partials
        if pending is not None:
            pending.finish()
    elif pending is not None:
        _, s, sx = conv_ops.reduce_wgrad_and_bn_sums(pending, *partials)
    else:
        s, sx = bn_ops.bn_bwd_reduce(*partials)
    if st.group is None or not st.batch_stats:
        return s, sx, s, sx
    import torch.distributed as dist

    tot = torch.stack([s, sx])
    dist.all_reduce(tot, group=st.group)
    tot *= stats[4]
    return s, sx, tot[0], tot[1]


def running_pairs(running_out: list[torch.Tensor] | None) -> Callable[[bool], tuple[torch.Tensor, torch.Tensor] | None]:
    """``take(updates)``: the next (new mean, new var) pair of ``running_out`` for a BatchNorm
    whose running statistics this call updates, or None (in place, or nothing to update)."""
    it = iter(running_out) if running_out is not None else None

    def take(updates: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        if it is None or not updates:
            return None
        return next(it), next(it)

    return take


# --------------------------------------------------------------------------------------------
# Statistics handed from a fused block's output to the next fused BatchNorm

class Link(NamedTuple):
    """The BatchNorm that opens the block a fusedres loop calls next on this block's output (see
    :func:`fusedres.blocks.run_linked`): the block's last convolution finalizes it
    (:func:`producer_finalize` with these) and hands the :class:`fusedres.ops.bn.Finalize` off
    instead of its output's partials, so that the next block launches no finalize of its own."""

    stage: StageSpec  # eps, momentum (a float), batch_stats True, no process group
    bn: tuple[torch.Tensor | None, ...]  # (weight, bias, running_mean, running_var)
    # its num_batches_tracked where the next block's planned call would have the finalizing launch
    # count it (fusedres.blocks._BlockPlan.counts), else None
    batches: torch.Tensor | None = None

    def key(self) -> tuple[bool, ...]:
        """Which of the tensors are given (what the finalizing launch's constexprs depend on)."""
        return tuple(v is None for v in self.bn)

    def made(self, fin: bn_ops.Finalize) -> bool:
        """Whether ``fin`` finalizes this BatchNorm: the same tensors (identity), eps and momentum,
        its running statistics updated in place, its batch counted in the same counter (or in
        none). A Finalize made for another BatchNorm — or for this one's tensors before one was
        swapped — is never taken for it."""
        g, b, rm, rv = self.bn
        st = self.stage
        return (fin.weight is g and fin.bias is b and fin.running_mean is rm and fin.running_var is rv
                and fin.batches is self.batches and fin.running_out is None and fin.eps == st.eps
                and fin.momentum == st.momentum and st.batch_stats and st.group is None)


class _Slots(threading.local):
    """Per thread (two threads running networks at once — nn.DataParallel's replicas — must not
    take each other's): ``handoff``, (weak reference to a fused block's output, its version
    counter, its statistics partials or the Finalize of the next block's first BatchNorm); ``link``,
    (a block's input, the :class:`Link` of the block called next on its output), set by
    :func:`fusedres.blocks.run_linked` around the block's call. One slot each: blocks run one
    after another."""

    handoff: tuple[weakref.ref, int, tuple[torch.Tensor, torch.Tensor, int] | bn_ops.Finalize] | None = None
    link: tuple[torch.Tensor, Link] | None = None


_SLOTS = _Slots()


def hand_off(out: torch.Tensor, partials: tuple[torch.Tensor, torch.Tensor, int] | bn_ops.Finalize) -> None:
    """The last training-mode fused block of the eager path computed the tile statistics of its
    output ``out`` in its last convolution's epilogue (and, linked, finalized the next block's
    first BatchNorm with them): the BatchNorm that opens the next block (or the head) takes them
    instead of reading the whole tensor again."""
    _SLOTS.handoff = (weakref.ref(out), out._version, partials)


def set_link(x: torch.Tensor | None, link: Link | None = None) -> None:
    """Announce (``x``, ``link``) to the chain about to run on ``x``; ``set_link(None)`` clears it."""
    _SLOTS.link = None if x is None else (x, link)


def take_link(x: torch.Tensor) -> Link | None:
    """The link announced for a chain whose input is ``x`` (taken: once), else None."""
    slot = _SLOTS.link
    if slot is None or slot[0] is not x:
        return None
    _SLOTS.link = None
    return slot[1]


def input_stats(
    x: torch.Tensor, make_fin: Callable[[], bn_ops.Finalize | None] | None = None, consumer: Link | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int] | bn_ops.Finalize:
    """Tile statistics partials of ``x``: those handed off with it when ``x`` is, unmodified, the
    output of the previous fused block — or the Finalize that block's last convolution carried out
    for ``consumer`` (the BatchNorm asking, when its running statistics are updated in place), when
    :meth:`Link.made` says it was made for it; else from a statistics pass over ``x``, which carries
    out ``make_fin()`` when given (see :func:`producer_finalize`; called only then, so that a
    hand-off allocates no stats buffer that nothing fills)."""
    handed, _SLOTS.handoff = _SLOTS.handoff, None
    if handed is not None:
        ref, version, partials = handed
        if ref() is x and x._version == version and (
                not isinstance(partials, bn_ops.Finalize) or (consumer is not None and consumer.made(partials))):
            return partials
    return bn_ops.bn_stats(x, finalize=make_fin() if make_fin is not None else None)


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


def sync_group(bn: nn.Module) -> Any:
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


# The parameters and buffers below are read from the modules' dicts, not through
# nn.Module.__getattr__ (~1 µs per read, dozens of reads per block call).


def _counter(bn: nn.Module) -> torch.Tensor | None:
    """``bn.num_batches_tracked`` when this call counts a batch (as the module would), else None."""
    if bn.training and bn.track_running_stats:
        return bn._buffers.get("num_batches_tracked")
    return None


def bn_mode(bn: nn.Module) -> BnMode:
    """What ``bn.forward`` would do this call: whether it normalises with batch statistics, the
    running-average factor, the running buffers to use (or None), and for ``momentum=None`` the
    cumulative factor as a tensor (no host synchronisation: the caller applies it with
    :func:`cumulative_update`). Call it after ``num_batches_tracked`` was incremented (as the
    module itself does in training; :func:`bn_modes` does both)."""
    momentum = 0.0 if bn.momentum is None else float(bn.momentum)
    cumulative = None
    if bn.momentum is None:
        counter = _counter(bn)
        if counter is not None:
            cumulative = 1.0 / counter
            momentum = 1.0  # the kernel writes the batch statistics; cumulative_update averages
    buffers = bn._buffers
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    training = bn.training
    batch_stats = training or (running_mean is None and running_var is None)
    use_running = not training or bn.track_running_stats
    rm = running_mean if use_running else None
    rv = running_var if use_running else None
    group = sync_group(bn) if training and isinstance(bn, nn.SyncBatchNorm) else None
    return BnMode(batch_stats, momentum, rm, rv, cumulative, group)


def bn_modes(bns: Sequence[nn.Module]) -> list[BnMode] | None:
    """:func:`bn_mode` of each BatchNorm, or None — nothing counted — when a SyncBatchNorm would
    synchronise while ``torch.compile`` traces (the fused path does that eagerly only; the caller
    runs the modules' own forward instead)."""
    if torch.compiler.is_compiling() and any(sync_group(bn) is not None for bn in bns):
        return None
    counters = [c for c in map(_counter, bns) if c is not None]
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


R = TypeVar("R")


def with_bn_modes(bns: Sequence[nn.Module], compute: Callable[[list[BnMode]], R]) -> R | None:
    """The BatchNorm sequence every fused module runs: count the batch and read each module's mode
    (:func:`bn_modes`), snapshot the running statistics a ``momentum=None`` BatchNorm averages,
    ``compute(modes)``, then average them. None — nothing counted or computed — where
    :func:`bn_modes` says the modules' own forward must run instead."""
    modes = bn_modes(bns)
    if modes is None:
        return None
    averaging = cumulative_update(modes)
    out = compute(modes)
    averaging.finish()
    return out
