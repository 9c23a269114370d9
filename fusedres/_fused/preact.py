"""The pre-activation computations: a chain of ``conv(relu(bn(h)))`` stages with its shortcut
(:class:`Chain`, behind the pre-activation blocks and ``bn_relu_conv2d``), and the BN-ReLU-pool head
of a pre-activation network (:class:`Pool`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ..ops import bn as bn_ops
from ..ops import conv as conv_ops
from ..ops import route
from .batchnorm import (
    Link,
    bwd_sums,
    finalize,
    hand_off,
    input_stats,
    producer_finalize,
    running_pairs,
    take_link,
)
from .dispatch import Impl
from .memory import cl_empty, kernel_weight, stats_empty
from .specs import (
    BN_BIAS,
    BN_RUNNING_MEAN,
    BN_RUNNING_VAR,
    BN_WEIGHT,
    SHORTCUTS,
    ChainInputs,
    ChainSpec,
    PoolInputs,
    StageSpec,
    Tensors,
    stage_from,
    stage_ints,
)

# --------------------------------------------------------------------------------------------
# Launch memos: what a chain call decides per convolution launch — the route, and on the pointer
# kernels their plan — kept per (spec, tensor layouts, route state, TICKETS, TF32), so that a
# repeated call neither routes nor builds the launchers' plan keys again. Where the route is not
# the pointer kernels by route.state() and the shapes alone (cuDNN, or the Hopper engine, whose
# layout rules read the tensors), the site stays False and is routed per call.


def _launches(key: tuple) -> dict:
    """The memo of ``key`` (launch site -> plan or False), held with the launchers' plans
    (:data:`fusedres.ops.bn.PLANS`: forgotten with them)."""
    return bn_ops.plan_for(key, dict)


def _site_plan(memo: dict, site: object, plan_of: Any, *args: Any, **kw: Any) -> Any:
    """The memo's entry for ``site``: ``plan_of(*args, **kw)`` the first time (a pointer launcher's
    plan, or False where the site is routed per call)."""
    plan = memo.get(site)
    if plan is None:
        plan = memo[site] = plan_of(*args, **kw) or False
    return plan


def _fprop(memo: dict, site: object, x: torch.Tensor, weight: torch.Tensor, **kw: Any) -> Any:
    plan = _site_plan(memo, site, route.fprop_plan, x, weight, **kw)
    if plan is False:
        return route.conv_fprop(x, weight, **kw)
    return conv_ops.conv_fprop(x, weight, plan=plan, **kw)


def _dgrad(memo: dict, site: object, dy: torch.Tensor, weight: torch.Tensor, input_shape: tuple,
           **kw: Any) -> Any:
    plan = _site_plan(memo, site, route.dgrad_plan, dy, weight, input_shape, **kw)
    if plan is False:
        return route.conv_dgrad(dy, weight, input_shape, **kw)
    return conv_ops.conv_dgrad(dy, weight, input_shape, plan=plan, **kw)


def _wgrad(memo: dict, site: object, dy: torch.Tensor, x: torch.Tensor, weight_like: torch.Tensor,
           **kw: Any) -> Any:
    plan = _site_plan(memo, site, route.wgrad_plan, dy, x, weight_like, **kw)
    if plan is False:
        return route.conv_wgrad(dy, x, weight_like, **kw)
    return conv_ops.conv_wgrad(dy, x, weight_like, plan=plan, **kw)


def _pair(memo: dict, site: object, d_site: object, w_site: object, dy: torch.Tensor, weight_k: torch.Tensor,
          input_shape: tuple, dkw: dict, x: torch.Tensor, weight_like: torch.Tensor, wkw: dict) -> tuple:
    """``(dz, sums, dw)`` of one convolution's backward: :func:`_dgrad` at ``d_site`` and
    :func:`_wgrad` at ``w_site``, in one launch where both are on the pointer kernels and their
    plans can share it (:func:`fusedres.ops.conv.bwd_plan`), else in two."""
    plan = memo.get(site)
    if plan is None:
        dplan = _site_plan(memo, d_site, route.dgrad_plan, dy, weight_k, input_shape, **dkw)
        wplan = _site_plan(memo, w_site, route.wgrad_plan, dy, x, weight_like, **wkw)
        plan = memo[site] = (dplan and wplan and conv_ops.bwd_plan(dplan, wplan, dy.device)) or False
    if plan is False:
        dw = _wgrad(memo, w_site, dy, x, weight_like, **wkw)
        return (*_dgrad(memo, d_site, dy, weight_k, input_shape, **dkw), dw)
    return conv_ops.conv_bwd(plan, dy, weight_k, bn=dkw.get("bn"), add=dkw.get("add"), x=x, weight_like=weight_like,
                             scale=wkw.get("scale"), shift=wkw.get("shift"))


def _weights_layout(t: Tensors, n_stages: int) -> list:
    """The memo key's part from the weights: the convolutions' shapes and strides (the projection's
    first), and which BatchNorm tensors are given."""
    proj = t[ChainInputs.PROJ_WEIGHT]
    parts: list = [None if proj is None else (proj.shape, proj.stride())]
    for i in range(n_stages):
        w, g, b, rm, _ = ChainInputs.stage(t, i)
        parts += (w.shape, w.stride(), g is None, b is None, rm is None)
    return parts


class Chain(Impl):
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
        ints = [SHORTCUTS.index(spec.shortcut), spec.proj_stride, int(spec.out_channels_last)]
        floats: list[float] = []
        for st in spec.stages:
            ints += stage_ints(st)
            floats += [st.eps, st.momentum]
        return ints, floats

    @staticmethod
    @functools.cache
    def _decode(ints: tuple[int, ...], floats: tuple[float, ...]) -> ChainSpec:
        n = (len(ints) - 3) // 3
        stages = tuple(stage_from(ints[3 + 3 * i : 6 + 3 * i], floats[2 * i : 2 * i + 2]) for i in range(n))
        return ChainSpec(stages, SHORTCUTS[ints[0]], int(ints[1]), bool(ints[2]))

    @staticmethod
    def decode(ints: Sequence[int], floats: Sequence[float]) -> ChainSpec:
        return Chain._decode(tuple(ints), tuple(floats))

    @staticmethod
    def slots(spec: ChainSpec) -> list[tuple[StageSpec, int, int]]:
        return [(st, ChainInputs.bn(i) + BN_RUNNING_MEAN, ChainInputs.bn(i) + BN_RUNNING_VAR)
                for i, st in enumerate(spec.stages)]

    @staticmethod
    def weights(spec: ChainSpec) -> list[int]:
        return [ChainInputs.PROJ_WEIGHT] + [ChainInputs.weight(i) for i in range(len(spec.stages))]

    @staticmethod
    def unsaved(spec: ChainSpec) -> set[int]:
        return {ChainInputs.RESIDUAL}  # its gradient is dout

    @staticmethod
    def dropped(spec: ChainSpec) -> frozenset[int]:
        return Chain._dropped(len(spec.stages))

    @staticmethod
    @functools.cache
    def _dropped(n_stages: int) -> frozenset[int]:
        # (the layout depends on the number of stages only: once per count, not per call)
        return frozenset({ChainInputs.RESIDUAL} | {ChainInputs.bn(i) + j for i in range(n_stages)
                                                   for j in (BN_RUNNING_MEAN, BN_RUNNING_VAR)})

    @staticmethod
    def forward(spec: ChainSpec, t: Tensors, running_out: list[torch.Tensor] | None,
                batches: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, list]:
        x, residual, proj_weight = t[ChainInputs.X], t[ChainInputs.RESIDUAL], t[ChainInputs.PROJ_WEIGHT]
        n_stages = len(spec.stages)
        # each stage's num_batches_tracked goes with its statistics to the launch that finalizes them
        counts = batches if batches is not None else (None,) * n_stages
        take = running_pairs(running_out)
        # The eager path (no running_out: not a custom op under torch.compile) of a training block
        # computes its output's statistics for the next block (see batchnorm.input_stats).
        passes_stats = running_out is None and spec.stages[0].batch_stats and spec.out_channels_last
        # Called by fusedres.blocks.run_linked with the next block's first BatchNorm: the last
        # convolution finalizes it and the Finalize is handed off instead of the partials (the
        # last launch's plan depends on which of its tensors are given: part of the memo key).
        link = take_link(x) if passes_stats else None
        memo = _launches(("chain forward", spec, x.shape, x.stride(), x.dtype, x.device,
                          None if residual is None else residual.stride(), running_out is None, bn_ops.TICKETS,
                          conv_ops.tf32_enabled(), route.state(), None if link is None else link.key(),
                          *_weights_layout(t, n_stages)))
        h = x
        inner: list[torch.Tensor] = []
        all_stats: list[torch.Tensor] = []

        def producer_fin(i: int, channels: int):
            """Stage i's running-statistics destination, and what the launch producing its
            input's partials needs to finalize them itself (None: a finalize launch follows)."""
            st = spec.stages[i]
            _, g, b, rm, rv = ChainInputs.stage(t, i)
            run = take(st.batch_stats and rm is not None)
            return run, (lambda: producer_finalize(channels, x, st, (g, b, rm, rv), run, counts[i]))

        run, make_fin = producer_fin(0, x.shape[1])
        partials = None
        if spec.stages[0].batch_stats:
            # a Finalize handed off is taken only if made for this BatchNorm, updating in place
            me = Link(spec.stages[0], ChainInputs.stage(t, 0)[1:], counts[0]) if run is None else None
            partials = input_stats(x, make_fin, me)
        shortcut = None
        for i, st in enumerate(spec.stages):
            w, g, b, rm, rv = ChainInputs.stage(t, i)
            stats, (mean, invstd, scale, shift) = finalize(partials, h, st, (g, b, rm, rv), run, counts[i])
            all_stats.append(stats)
            if i == 0:
                if spec.shortcut == "projection":
                    shortcut, _ = _fprop(
                        memo, -1, x, kernel_weight(proj_weight), stride=spec.proj_stride, padding=0, scale=scale,
                        shift=shift,
                    )
                elif spec.shortcut == "identity":
                    shortcut = x
                elif spec.shortcut == "residual":
                    shortcut = residual
            else:
                inner.append(h)
            last = i == n_stages - 1
            next_batch_stats = passes_stats if last else spec.stages[i + 1].batch_stats
            # an inner stage's statistics are finalized by the convolution that produces them; the
            # block's output statistics go to the next block as partials (its BatchNorm is not
            # known here), or finalized for it when linked
            fin = None
            if not last:
                run, make_fin = producer_fin(i + 1, w.shape[0])
                fin = make_fin()
            elif link is not None:
                fin = producer_finalize(w.shape[0], x, link.stage, link.bn, None, link.batches)
            h, partials = _fprop(
                memo, i, h, kernel_weight(w), stride=st.stride, padding=st.padding, scale=scale, shift=shift,
                residual=shortcut if last else None, stats=next_batch_stats, finalize=fin,
            )
        if passes_stats and partials is not None:
            hand_off(h, partials)
        if not spec.out_channels_last:
            h = h.contiguous()
        return h, inner + all_stats

    @staticmethod
    def fake_forward(spec: ChainSpec, t: Tensors) -> tuple[torch.Tensor, list]:
        x = t[ChainInputs.X]
        N, C, H, W = x.shape
        inner, all_stats = [], []
        for i, st in enumerate(spec.stages):
            w = t[ChainInputs.weight(i)]
            all_stats.append(stats_empty(C, x))
            H = conv_ops.conv_out_size(H, w.shape[2], st.stride, st.padding)
            W = conv_ops.conv_out_size(W, w.shape[3], st.stride, st.padding)
            C = w.shape[0]
            if i < len(spec.stages) - 1:
                inner.append(cl_empty((N, C, H, W), x))
        return cl_empty((N, C, H, W), x, spec.out_channels_last), inner + all_stats

    @staticmethod
    def backward(spec: ChainSpec, t: Tensors, saved: Sequence[torch.Tensor], dout: torch.Tensor,
                 needs: Sequence[bool]) -> list[torch.Tensor | None]:
        n_stages = len(spec.stages)
        x, proj_weight = t[ChainInputs.X], t[ChainInputs.PROJ_WEIGHT]
        inputs = [x, *saved[: n_stages - 1]]
        all_stats = saved[n_stages - 1 :]
        need_x = needs[ChainInputs.X]
        memo = _launches(("chain backward", spec, x.shape, x.stride(), x.dtype, x.device, dout.shape, dout.stride(),
                          dout.dtype, bn_ops.TICKETS, conv_ops.tf32_enabled(), route.state(),
                          *_weights_layout(t, n_stages)))
        grads: list[torch.Tensor | None] = [None] * len(t)
        stage_needs = [ChainInputs.stage(needs, i) for i in range(n_stages)]
        # a convolution whose weight and input gradients are both needed computes them in one
        # launch (conv_ops.bwd_plan; with the tickets, where the weight gradient is done in its launch)
        merged = conv_ops.MERGED_BACKWARD and bn_ops.TICKETS
        dh = dout
        for i in reversed(range(n_stages)):
            st = spec.stages[i]
            w, g, b = ChainInputs.stage(t, i)[:3]
            stats = all_stats[i]
            mean, invstd, scale, shift = stats.unbind(0)[:4]
            h = inputs[i]
            need_w, need_g, need_b = stage_needs[i][:3]
            below = need_x or need_g or need_b or any(any(n[:3]) for n in stage_needs[:i])
            projection = i == 0 and spec.shortcut == "projection"
            need_pw = projection and needs[ChainInputs.PROJ_WEIGHT]
            wkw = dict(stride=st.stride, padding=st.padding, scale=scale, shift=shift)
            pw_kw = dict(stride=spec.proj_stride, padding=0, scale=scale, shift=shift)
            pending = None  # a weight gradient whose split sums the backward-sum launch reduces
            if need_w and not (below and merged):
                dw = _wgrad(memo, (0, i), dh, h, w, **wkw, defer_reduce=True)
                if isinstance(dw, conv_ops.PendingWgrad):
                    pending, dw = dw, dw.dw
                grads[ChainInputs.weight(i)] = dw
            if need_pw and not (below and merged):
                grads[ChainInputs.PROJ_WEIGHT] = _wgrad(memo, (1, 0), dout, h, proj_weight, **pw_kw)
            if not below:
                if pending is not None:
                    pending.finish()
                break
            add = None
            if projection:
                pd_kw = dict(stride=spec.proj_stride, padding=0)
                if need_pw and merged:
                    add, _, grads[ChainInputs.PROJ_WEIGHT] = _pair(
                        memo, (4, 0), (2, 0), (1, 0), dout, kernel_weight(proj_weight), tuple(h.shape), pd_kw,
                        h, proj_weight, pw_kw)
                else:
                    add, _ = _dgrad(memo, (2, 0), dout, kernel_weight(proj_weight), tuple(h.shape), **pd_kw)
            dkw = dict(stride=st.stride, padding=st.padding, bn=(h, scale, shift, mean, invstd), add=add,
                       reduce_sums=True)
            if need_w and merged:
                dz, partials, grads[ChainInputs.weight(i)] = _pair(
                    memo, (5, i), (3, i), (0, i), dh, kernel_weight(w), tuple(h.shape), dkw, h, w, wkw)
            else:
                dz, partials = _dgrad(memo, (3, i), dh, kernel_weight(w), tuple(h.shape), **dkw)
            dh = add = None  # used up: their memory can hold the next gradient
            sum_dz, sum_dzx, apply_dz, apply_dzx = bwd_sums(partials, st, stats, pending)
            if need_g and g is not None:
                grads[ChainInputs.bn(i) + BN_WEIGHT] = sum_dzx if g.dtype == sum_dzx.dtype else sum_dzx.to(g.dtype)
            if need_b and b is not None:
                grads[ChainInputs.bn(i) + BN_BIAS] = sum_dz if b.dtype == sum_dz.dtype else sum_dz.to(b.dtype)
            if i > 0 or need_x:
                identity = i == 0 and spec.shortcut == "identity"
                dh = bn_ops.bn_bwd_apply(
                    dz, h, mean, invstd, g, apply_dz, apply_dzx, training=st.batch_stats,
                    add=dout if identity else None,
                )
        if need_x:
            grads[ChainInputs.X] = dh
        if spec.shortcut == "residual" and needs[ChainInputs.RESIDUAL]:
            grads[ChainInputs.RESIDUAL] = dout
        return grads


class Pool(Impl):
    """``mean over H, W of relu(bn(x))`` — a pre-activation network's head — fused.

    Inputs: x, bn weight, bn bias, running mean, running var.
    """

    name = "bn_relu_pool"

    @staticmethod
    def encode(spec: StageSpec) -> tuple[list[int], list[float]]:
        return stage_ints(spec), [spec.eps, spec.momentum]

    @staticmethod
    def decode(ints: Sequence[int], floats: Sequence[float]) -> StageSpec:
        return stage_from(ints, floats)

    @staticmethod
    def slots(spec: StageSpec) -> list[tuple[StageSpec, int, int]]:
        return [(spec, PoolInputs.BN + BN_RUNNING_MEAN, PoolInputs.BN + BN_RUNNING_VAR)]

    @staticmethod
    def forward(spec: StageSpec, t: Tensors, running_out: list[torch.Tensor] | None) -> tuple[torch.Tensor, list]:
        x, g, b, rm, rv = t
        run = running_pairs(running_out)(spec.batch_stats and rm is not None)
        partials = input_stats(x, lambda: producer_finalize(x.shape[1], x, spec, (g, b, rm, rv), run)) \
            if spec.batch_stats else None
        stats, (_, _, scale, shift) = finalize(partials, x, spec, (g, b, rm, rv), run)
        return bn_ops.bn_relu_pool(x, scale, shift), [stats]

    @staticmethod
    def fake_forward(spec: StageSpec, t: Tensors) -> tuple[torch.Tensor, list]:
        x = t[PoolInputs.X]
        N, C = x.shape[:2]
        return x.new_empty((N, C)), [stats_empty(C, x)]

    @staticmethod
    def backward(spec: StageSpec, t: Tensors, saved: Sequence[torch.Tensor], dout: torch.Tensor,
                 needs: Sequence[bool]) -> list[torch.Tensor | None]:
        x, g, b = t[PoolInputs.X], t[PoolInputs.BN + BN_WEIGHT], t[PoolInputs.BN + BN_BIAS]
        (stats,) = saved
        mean, invstd, scale, shift = stats.unbind(0)[:4]
        dz, psum, psumx = bn_ops.bn_relu_pool_bwd(dout, x, scale, shift, mean, invstd)
        s, sx, apply_s, apply_sx = bwd_sums((psum, psumx), spec, stats)
        grads: list[torch.Tensor | None] = [None] * len(t)
        if needs[PoolInputs.X]:
            grads[PoolInputs.X] = bn_ops.bn_bwd_apply(dz, x, mean, invstd, g, apply_s, apply_sx,
                                                      training=spec.batch_stats)
        if needs[PoolInputs.BN + BN_WEIGHT] and g is not None:
            grads[PoolInputs.BN + BN_WEIGHT] = sx.to(g.dtype)
        if needs[PoolInputs.BN + BN_BIAS] and b is not None:
            grads[PoolInputs.BN + BN_BIAS] = s.to(b.dtype)
        return grads
