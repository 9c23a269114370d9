"""The post-activation (torchvision / timm) residual block: ``relu(bn(conv(... relu(bn(conv(x))))) +
shortcut)``, each BatchNorm-ReLU applied in the next convolution's prologue and the block closed by
one BN-add-ReLU pass (:class:`PostAct`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ..ops import bn as bn_ops
from ..ops import conv as conv_ops
from ..ops import route
from .batchnorm import bwd_sums, finalize, producer_finalize, running_pairs
from .dispatch import Impl
from .memory import cl_empty, kernel_weight, stats_empty
from .specs import (
    BN_BIAS,
    BN_RUNNING_MEAN,
    BN_RUNNING_VAR,
    BN_WEIGHT,
    PostActInputs,
    PostActSpec,
    StageSpec,
    Tensors,
    stage_from,
    stage_ints,
)


class PostAct(Impl):
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
            ints += [stride, pad, *stage_ints(st)]
            floats += [st.eps, st.momentum]
        if spec.downsample is not None:
            stride, st = spec.downsample
            ints += [stride, 0, *stage_ints(st)]
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
            bns.append(stage_from(q[2:], floats[2 * i : 2 * i + 2]))
        ds = (convs[n][0], bns[n]) if has_ds else None
        return PostActSpec(tuple(convs[:n]), tuple(bns[:n]), ds, out_cl)

    @staticmethod
    def decode(ints: Sequence[int], floats: Sequence[float]) -> PostActSpec:
        return PostAct._decode(tuple(ints), tuple(floats))

    @staticmethod
    def _bn_specs(spec: PostActSpec) -> list[StageSpec]:
        return list(spec.bns) + ([spec.downsample[1]] if spec.downsample is not None else [])

    @staticmethod
    def slots(spec: PostActSpec) -> list[tuple[StageSpec, int, int]]:
        at = PostActInputs.of(spec)
        return [(st, at.bn(i) + BN_RUNNING_MEAN, at.bn(i) + BN_RUNNING_VAR)
                for i, st in enumerate(PostAct._bn_specs(spec))]

    @staticmethod
    def weights(spec: PostActSpec) -> list[int]:
        at = PostActInputs.of(spec)
        return [at.weight(i) for i in range(at.bns)]

    @staticmethod
    def forward(spec: PostActSpec, t: Tensors, running_out: list[torch.Tensor] | None) -> tuple[torch.Tensor, list]:
        n = len(spec.convs)
        at = PostActInputs.of(spec)
        x, shortcut = t[at.X], t[at.SHORTCUT]
        weights = [t[at.weight(i)] for i in range(n)]
        bn_specs = PostAct._bn_specs(spec)
        take = running_pairs(running_out)
        all_stats: list[torch.Tensor] = []

        def producer_fin(i: int, channels: int):
            """BatchNorm i's running-statistics destination, and what the convolution producing its
            input needs to finalize the statistics itself (None: a finalize launch follows)."""
            k = at.bn(i)
            st = bn_specs[i]
            run = take(st.batch_stats and t[k + BN_RUNNING_MEAN] is not None)
            return run, producer_finalize(channels, x, st, t[k : k + 4], run)

        def normalize(partials, h: torch.Tensor, i: int, run) -> tuple[torch.Tensor, ...]:
            k = at.bn(i)
            stats, fin = finalize(partials, h, bn_specs[i], t[k : k + 4], run)
            all_stats.append(stats)
            return fin

        ys: list[torch.Tensor] = []
        h, scale, shift = x, None, None
        for i, (stride, pad) in enumerate(spec.convs):
            run, fin = producer_fin(i, weights[i].shape[0])
            h, partials = route.conv_fprop(
                h, kernel_weight(weights[i]), stride=stride, padding=pad, scale=scale, shift=shift,
                stats=spec.bns[i].batch_stats, finalize=fin,
            )
            ys.append(h)
            _, _, scale, shift = normalize(partials, h, i, run)
        r, r_affine = (shortcut if shortcut is not None else x), ()
        extra: list[torch.Tensor] = []
        if spec.downsample is not None:
            ds_stride, ds_st = spec.downsample
            ds_w = t[at.weight(n)]
            run, fin = producer_fin(n, ds_w.shape[0])
            r, ds_partials = route.conv_fprop(x, kernel_weight(ds_w), stride=ds_stride, padding=0,
                                                 stats=ds_st.batch_stats, finalize=fin)
            r_affine = normalize(ds_partials, r, n, run)[2:]
            extra = [r]
        out = bn_ops.bn_add_relu(h, r, scale, shift, *r_affine)
        if not spec.out_channels_last:
            out = out.contiguous()
        return out, extra + ys + all_stats

    @staticmethod
    def fake_forward(spec: PostActSpec, t: Tensors) -> tuple[torch.Tensor, list]:
        at = PostActInputs.of(spec)
        x = t[at.X]
        N, C, H, W = x.shape
        ys, all_stats = [], []
        for i, (stride, pad) in enumerate(spec.convs):
            w = t[at.weight(i)]
            H = conv_ops.conv_out_size(H, w.shape[2], stride, pad)
            W = conv_ops.conv_out_size(W, w.shape[3], stride, pad)
            C = w.shape[0]
            ys.append(cl_empty((N, C, H, W), x))
            all_stats.append(stats_empty(C, x))
        extra = []
        if spec.downsample is not None:
            extra = [cl_empty((N, C, H, W), x)]
            all_stats.append(stats_empty(C, x))
        return cl_empty((N, C, H, W), x, spec.out_channels_last), extra + ys + all_stats

    @staticmethod
    def backward(spec: PostActSpec, t: Tensors, saved: Sequence[torch.Tensor], dout: torch.Tensor,
                 needs: Sequence[bool]) -> list[torch.Tensor | None]:
        n = len(spec.convs)
        has_ds = spec.downsample is not None
        at = PostActInputs.of(spec)
        x, shortcut = t[at.X], t[at.SHORTCUT]
        weights = [t[at.weight(i)] for i in range(n)]
        bn_specs = PostAct._bn_specs(spec)
        r_saved = saved[0] if has_ds else shortcut
        ys = saved[int(has_ds) : int(has_ds) + n]
        all_stats = saved[int(has_ds) + n :]
        fins = [s.unbind(0)[:4] for s in all_stats]  # (mean, invstd, scale, shift)
        grads: list[torch.Tensor | None] = [None] * len(t)

        def bn_backward(i: int, dz: torch.Tensor, h: torch.Tensor, partials: tuple | bn_ops.Sums,
                        pending: conv_ops.PendingWgrad | None = None) -> torch.Tensor:
            """BatchNorm i's parameter gradients into ``grads``; returns the gradient at its input."""
            k = at.bn(i)
            st = bn_specs[i]
            s, sx, apply_s, apply_sx = bwd_sums(partials, st, all_stats[i], pending)
            gamma, beta = t[k + BN_WEIGHT], t[k + BN_BIAS]
            if needs[k + BN_WEIGHT] and gamma is not None:
                grads[k + BN_WEIGHT] = sx.to(gamma.dtype)
            if needs[k + BN_BIAS] and beta is not None:
                grads[k + BN_BIAS] = s.to(beta.dtype)
            mean, inv = fins[i][0], fins[i][1]
            return bn_ops.bn_bwd_apply(dz, h, mean, inv, gamma, apply_s, apply_sx, training=st.batch_stats)

        r = r_saved if r_saved is not None else x
        mean_l, inv_l, s_l, b_l = fins[n - 1]
        r_bn = (fins[n][2], fins[n][3], fins[n][0], fins[n][1]) if has_ds else None
        g, psum, psumy, psumr = bn_ops.bn_add_relu_bwd(dout, ys[-1], r, s_l, b_l, mean_l, inv_l, r_bn)
        dh = bn_backward(n - 1, g, ys[-1], (psum, psumy))
        dx_add = None
        if has_ds:
            ds_stride, _ = spec.downsample
            ds_w = t[at.weight(n)]
            dd = bn_backward(n, g, r_saved, (psum, psumr))
            if needs[at.weight(n)]:
                grads[at.weight(n)] = route.conv_wgrad(dd, x, ds_w, stride=ds_stride, padding=0)
            if needs[at.X]:
                dx_add, _ = route.conv_dgrad(dd, kernel_weight(ds_w), tuple(x.shape), stride=ds_stride,
                                                padding=0)
        elif needs[at.X] and shortcut is None:
            dx_add = g  # identity shortcut
        for i in reversed(range(n)):
            stride, pad = spec.convs[i]
            h_in = x if i == 0 else ys[i - 1]
            scale, shift = (fins[i - 1][2], fins[i - 1][3]) if i > 0 else (None, None)
            pending = None  # reduced by the backward-sum launch of BatchNorm i - 1 (two-launch path)
            if needs[at.weight(i)]:
                dw = route.conv_wgrad(dh, h_in, weights[i], stride=stride, padding=pad, scale=scale, shift=shift,
                                      defer_reduce=i > 0)
                if isinstance(dw, conv_ops.PendingWgrad):
                    pending, dw = dw, dw.dw
                grads[at.weight(i)] = dw
            if i > 0:
                dz, partials = route.conv_dgrad(
                    dh, kernel_weight(weights[i]), tuple(h_in.shape), stride=stride, padding=pad,
                    bn=(h_in, scale, shift, fins[i - 1][0], fins[i - 1][1]), reduce_sums=True,
                )
                dh = bn_backward(i - 1, dz, h_in, partials, pending)
            elif needs[at.X]:
                dh, _ = route.conv_dgrad(dh, kernel_weight(weights[0]), tuple(x.shape), stride=stride,
                                            padding=pad, add=dx_add)
        if needs[at.X]:
            grads[at.X] = dh
        if shortcut is not None and not has_ds and needs[at.SHORTCUT]:
            grads[at.SHORTCUT] = g
        return grads
