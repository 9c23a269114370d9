"""Functional fused ops.

:func:`bn_relu_conv2d` computes ``conv2d(relu(batch_norm(x)), weight) (+ residual)`` with
the BatchNorm-apply and ReLU done while the convolution loads its input and the residual
added while it stores its output. Its backward recomputes ``relu(batch_norm(x))`` instead of
storing it: only ``x``, the weight and per-channel fp32 statistics are kept.

Where it runs: CUDA tensors run the Triton kernels; CPU tensors run them under the Triton
interpreter when ``TRITON_INTERPRET=1`` was set before ``triton`` was imported, and
otherwise compute the same function with plain PyTorch (:mod:`fusedres.reference`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from . import _runtime
from .ops import bn as bn_ops
from .ops import conv as conv_ops
from .reference import bn_relu_conv2d_reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"bn_relu_conv2d: {name} must be one int or a pair of equal ints, got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"bn_relu_conv2d: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"bn_relu_conv2d: {name} must be >= {minimum}, got {value}")
    return value


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    residual: torch.Tensor | None,
    training: bool,
    stride: int,
    padding: int,
) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"bn_relu_conv2d: x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}"
        )
    if x.dim() != 4:
        raise ValueError(f"bn_relu_conv2d: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"bn_relu_conv2d: weight must be 4-D (Cout, Cin, R, S), got shape {tuple(weight.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"bn_relu_conv2d: x must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"bn_relu_conv2d: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    N, C, H, W = x.shape
    Cout, Cin, R, S = weight.shape
    if Cin != C:
        raise ValueError(
            f"bn_relu_conv2d: weight expects {Cin} input channels (shape {tuple(weight.shape)}) "
            f"but x has {C} (shape {tuple(x.shape)})"
        )
    if R != S:
        raise ValueError(f"bn_relu_conv2d: only square kernels are supported, got {R}x{S}")
    if R % 2 == 0:
        raise ValueError(f"bn_relu_conv2d: only odd kernel sizes are supported, got {R}x{S}")
    if min(x.shape) == 0 or min(weight.shape) == 0:
        raise ValueError(
            f"bn_relu_conv2d: empty tensors are not supported, got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    OH, OW = conv_ops.conv_out_size(H, R, stride, padding), conv_ops.conv_out_size(W, S, stride, padding)
    if OH < 1 or OW < 1:
        raise ValueError(
            f"bn_relu_conv2d: a {R}x{S} kernel with padding {padding} does not fit input of size {H}x{W}"
        )
    named = {
        "bn_weight": bn_weight,
        "bn_bias": bn_bias,
        "running_mean": running_mean,
        "running_var": running_var,
    }
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bn_relu_conv2d: {name} must be a tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (C,):
            raise ValueError(
                f"bn_relu_conv2d: {name} must have shape ({C},) to match x's channels, got {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bn_relu_conv2d: {name} must be a floating tensor, got {t.dtype}")
        if t.dtype != x.dtype and t.dtype != torch.float32:
            raise TypeError(f"bn_relu_conv2d: {name} dtype {t.dtype} must be float32 or x's dtype {x.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_relu_conv2d: running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("bn_relu_conv2d: running_mean and running_var are required when training=False")
    if training and N * H * W == 1:
        raise ValueError(
            f"bn_relu_conv2d: expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"bn_relu_conv2d: residual must be a tensor or None, got {type(residual).__name__}")
        if tuple(residual.shape) != (N, Cout, OH, OW):
            raise ValueError(
                f"bn_relu_conv2d: residual shape {tuple(residual.shape)} does not match the output shape "
                f"{(N, Cout, OH, OW)}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(f"bn_relu_conv2d: residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    for name, t in {"weight": weight, **named, "residual": residual}.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"bn_relu_conv2d: {name} is on {t.device} but x is on {x.device}")


def _wants_channels_last(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether PyTorch's convolution would return a channels_last tensor for these operands."""

    def cl(t: torch.Tensor) -> bool:
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    return cl(x) or cl(weight)


# id(weight) -> (weak reference to weight, weight._version, channels_last copy)
_WEIGHT_CACHE: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the layout the kernels read fastest, (Cout, R, S, Cin) in memory.

    A channels_last weight is used as it is; any other is copied once and the copy is cached
    against the parameter's version counter, so it is refreshed after an optimizer step and
    never rebuilt per call.
    """
    if weight.is_contiguous(memory_format=torch.channels_last):
        return weight
    key = id(weight)
    hit = _WEIGHT_CACHE.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    reordered = weight.detach().contiguous(memory_format=torch.channels_last)
    ref = weakref.ref(weight, lambda _ref, key=key: _WEIGHT_CACHE.pop(key, None))
    _WEIGHT_CACHE[key] = (ref, weight._version, reordered)
    return reordered


@dataclass(frozen=True)
class StageSpec:
    """One ``conv(relu(bn(h)))`` stage of a chain: its convolution geometry and BatchNorm mode."""

    stride: int
    padding: int
    eps: float
    momentum: float
    batch_stats: bool  # normalise with batch statistics (training, or no running statistics)


@dataclass(frozen=True)
class ChainSpec:
    """A chain of stages plus how the last stage's output is shortcut-added.

    ``shortcut``: ``"none"``; ``"residual"`` (a tensor argument, as in :func:`bn_relu_conv2d`);
    ``"identity"`` (the chain's input x); ``"projection"`` (a 1x1 convolution with stride
    ``proj_stride`` of the first stage's activation relu(bn1(x)), as in He et al. 2016).
    """

    stages: tuple[StageSpec, ...]
    shortcut: str = "none"
    proj_stride: int = 1


_PER_STAGE = 5  # weight, bn_weight, bn_bias, running_mean, running_var


class _BnReluConvChain(torch.autograd.Function):
    """``h_{i+1} = conv_i(relu(bn_i(h_i)))`` for each stage, plus the shortcut, fused.

    Forward: BatchNorm statistics of x by a statistics kernel, of every later stage's input in
    the previous convolution's epilogue; BN-apply + ReLU in each convolution's prologue; the
    shortcut added in the last convolution's epilogue. Saved for backward: x, each inner
    convolution output, the weights and per-channel fp32 statistics — no activation.
    """

    @staticmethod
    def forward(
        ctx: Any,
        spec: ChainSpec,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        proj_weight: torch.Tensor | None,
        *stage_tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        n_stages = len(spec.stages)
        h = x
        inputs: list[torch.Tensor] = []
        per_stage: list[torch.Tensor | None] = []
        partials = bn_ops.bn_stats(x) if spec.stages[0].batch_stats else None
        shortcut = None
        for i, st in enumerate(spec.stages):
            w, g, b, rm, rv = stage_tensors[_PER_STAGE * i : _PER_STAGE * (i + 1)]
            N, C, H, W = h.shape
            mean, invstd, scale, shift = bn_ops.bn_finalize(
                partials, N * H * W, g, b, rm, rv,
                training=st.batch_stats, momentum=st.momentum, eps=st.eps, channels=C, device=h.device,
            )
            if i == 0:
                if spec.shortcut == "projection":
                    shortcut, _ = conv_ops.conv_fprop(
                        x, kernel_weight(proj_weight), stride=spec.proj_stride, padding=0, scale=scale, shift=shift,
                    )
                elif spec.shortcut == "identity":
                    shortcut = x
                elif spec.shortcut == "residual":
                    shortcut = residual
            last = i == n_stages - 1
            next_batch_stats = not last and spec.stages[i + 1].batch_stats
            inputs.append(h)
            per_stage += [w, g, mean, invstd, scale, shift]
            h, partials = conv_ops.conv_fprop(
                h, kernel_weight(w), stride=st.stride, padding=st.padding, scale=scale, shift=shift,
                residual=shortcut if last else None, stats=next_batch_stats,
            )
        if not _wants_channels_last(x, stage_tensors[_PER_STAGE * (n_stages - 1)]):
            h = h.contiguous()
        ctx.save_for_backward(*inputs, proj_weight, *per_stage)
        ctx.spec = spec
        ctx.bias_dtypes = [
            t.dtype if t is not None else None for t in stage_tensors[2::_PER_STAGE]
        ]
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec: ChainSpec = ctx.spec
        n_stages = len(spec.stages)
        saved = ctx.saved_tensors
        inputs = saved[:n_stages]
        proj_weight = saved[n_stages]
        per_stage = saved[n_stages + 1 :]
        needs = ctx.needs_input_grad
        need_x, need_res, need_proj = needs[1], needs[2], needs[3]
        stage_needs = [needs[4 + _PER_STAGE * i : 4 + _PER_STAGE * (i + 1)] for i in range(n_stages)]
        grads: list[torch.Tensor | None] = [None] * (_PER_STAGE * n_stages)
        dproj = None
        dh = dout
        for i in reversed(range(n_stages)):
            st = spec.stages[i]
            w, g, mean, invstd, scale, shift = per_stage[6 * i : 6 * (i + 1)]
            h = inputs[i]
            need_w, need_g, need_b = stage_needs[i][:3]
            if need_w:
                grads[_PER_STAGE * i] = conv_ops.conv_wgrad(
                    dh, h, w, stride=st.stride, padding=st.padding, scale=scale, shift=shift,
                )
            below = need_x or need_g or need_b or any(any(n[:3]) for n in stage_needs[:i])
            if i == 0 and spec.shortcut == "projection" and need_proj:
                dproj = conv_ops.conv_wgrad(
                    dout, h, proj_weight, stride=spec.proj_stride, padding=0, scale=scale, shift=shift,
                )
            if not below:
                break
            add = None
            if i == 0 and spec.shortcut == "projection":
                add, _ = conv_ops.conv_dgrad(dout, kernel_weight(proj_weight), tuple(h.shape),
                                             stride=spec.proj_stride, padding=0)
            dz, (psum, psumx) = conv_ops.conv_dgrad(
                dh, kernel_weight(w), tuple(h.shape), stride=st.stride, padding=st.padding,
                bn=(h, scale, shift, mean, invstd), add=add,
            )
            sum_dz, sum_dzx = bn_ops.bn_bwd_reduce(psum, psumx)
            if need_g and g is not None:
                grads[_PER_STAGE * i + 1] = sum_dzx.to(g.dtype)
            if need_b and ctx.bias_dtypes[i] is not None:
                grads[_PER_STAGE * i + 2] = sum_dz.to(ctx.bias_dtypes[i])
            if i > 0 or need_x:
                identity = i == 0 and spec.shortcut == "identity"
                dh = bn_ops.bn_bwd_apply(
                    dz, h, mean, invstd, g, sum_dz, sum_dzx, training=st.batch_stats,
                    add=dout if identity else None,
                )
        dx = dh if need_x else None
        dres = dout if spec.shortcut == "residual" and need_res else None
        return (None, dx, dres, dproj, *grads)


def bn_relu_conv_chain(
    spec: ChainSpec,
    x: torch.Tensor,
    stage_tensors: list[torch.Tensor | None],
    *,
    residual: torch.Tensor | None = None,
    proj_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run a validated chain through the fused kernels (see :class:`ChainSpec`).

    ``stage_tensors`` holds, per stage: conv weight, bn weight, bn bias, running mean,
    running var (the last four may be None). Callers validate shapes, dtypes and devices.
    """
    return _BnReluConvChain.apply(spec, x, residual, proj_weight, *stage_tensors)


def bn_relu_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    padding: int = 0,
    residual: torch.Tensor | None = None,
    dilation: int = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d(F.relu(F.batch_norm(x, ...)), weight, None, stride, padding) (+ residual)``, fused.

    Args:
        x: input ``(N, C, H, W)``, float32/float16/bfloat16, channels_last (fast) or contiguous.
        weight: convolution weight ``(Cout, C, k, k)`` with odd ``k``, same dtype as ``x``.
        bn_weight, bn_bias: BatchNorm affine parameters ``(C,)`` or None (``affine=False``).
        running_mean, running_var: BatchNorm running statistics ``(C,)`` or None; in training
            they are updated in place exactly as ``F.batch_norm`` does.
        training: use batch statistics (True) or the running statistics (False).
        momentum, eps: as in ``F.batch_norm``.
        stride, padding: of the convolution (zero padding, applied after the activation).
        residual: optional tensor of the output's shape added to the convolution's result.
        dilation, groups: must be 1; accepted so that unsupported convolutions fail loudly.

    Returns:
        ``(N, Cout, OH, OW)`` in ``x``'s dtype and in the memory format ``F.conv2d`` would
        return. Differentiable with respect to x, weight, bn_weight, bn_bias and residual
        (first-order only).
    """
    stride = _as_int(stride, "stride", 1)
    padding = _as_int(padding, "padding", 0)
    if _as_int(dilation, "dilation", 1) != 1:
        raise ValueError(f"bn_relu_conv2d: dilation={dilation} is not supported (only 1)")
    if _as_int(groups, "groups", 1) != 1:
        raise ValueError(f"bn_relu_conv2d: groups={groups} is not supported (only 1)")
    training = bool(training)
    _check_inputs(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, training, stride, padding)
    if not _runtime.triton_enabled(x.device):
        return bn_relu_conv2d_reference(
            x, weight, bn_weight, bn_bias, running_mean, running_var, training=training,
            momentum=momentum, eps=eps, stride=stride, padding=padding, residual=residual,
        )
    spec = ChainSpec(
        (StageSpec(stride, padding, float(eps), float(momentum), training),),
        shortcut="residual" if residual is not None else "none",
    )
    return bn_relu_conv_chain(
        spec, x, [weight, bn_weight, bn_bias, running_mean, running_var], residual=residual
    )


class _BnReluPool(torch.autograd.Function):
    """``mean over H, W of relu(bn(x))`` — a pre-activation network's head — fused."""

    @staticmethod
    def forward(
        ctx: Any,
        st: StageSpec,
        x: torch.Tensor,
        bn_weight: torch.Tensor | None,
        bn_bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
    ) -> torch.Tensor:
        N, C, H, W = x.shape
        partials = bn_ops.bn_stats(x) if st.batch_stats else None
        mean, invstd, scale, shift = bn_ops.bn_finalize(
            partials, N * H * W, bn_weight, bn_bias, running_mean, running_var,
            training=st.batch_stats, momentum=st.momentum, eps=st.eps, channels=C, device=x.device,
        )
        ctx.save_for_backward(x, bn_weight, mean, invstd, scale, shift)
        ctx.st = st
        ctx.bias_dtype = bn_bias.dtype if bn_bias is not None else None
        return bn_ops.bn_relu_pool(x, scale, shift)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dpool: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, g, mean, invstd, scale, shift = ctx.saved_tensors
        dz, psum, psumx = bn_ops.bn_relu_pool_bwd(dpool, x, scale, shift, mean, invstd)
        sum_dz, sum_dzx = bn_ops.bn_bwd_reduce(psum, psumx)
        dx = bn_ops.bn_bwd_apply(dz, x, mean, invstd, g, sum_dz, sum_dzx, training=ctx.st.batch_stats)
        dg = sum_dzx.to(g.dtype) if g is not None and ctx.needs_input_grad[2] else None
        db = sum_dz.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[3] else None
        return None, dx, dg, db, None, None


def bn_relu_avgpool(
    st: StageSpec,
    x: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
) -> torch.Tensor:
    """``relu(batch_norm(x)).mean((2, 3))`` through the fused kernels; ``st`` gives the BatchNorm
    mode (its convolution fields are unused). Callers validate the inputs."""
    return _BnReluPool.apply(st, x, bn_weight, bn_bias, running_mean, running_var)


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


_PER_BN = 4  # weight, bias, running_mean, running_var


class _PostActBlock(torch.autograd.Function):
    """A torchvision BasicBlock/Bottleneck with batch or running statistics, fused.

    Each convolution's epilogue gathers the statistics of its output; the next convolution
    applies that BatchNorm and the ReLU while loading; one elementwise pass closes the block
    with relu(bn(y) + shortcut). Saved: x, each convolution output (and the downsample
    output), the weights and per-channel fp32 statistics — no activation.

    ``tensors``: the n convolution weights, then (weight, bias, running_mean, running_var) of
    the n BatchNorms, then — with a downsample — its conv weight and its BatchNorm's four.
    """

    @staticmethod
    def forward(
        ctx: Any,
        spec: PostActSpec,
        x: torch.Tensor,
        shortcut: torch.Tensor | None,
        *tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        n = len(spec.convs)
        weights = tensors[:n]
        bn_t = [tensors[n + _PER_BN * i : n + _PER_BN * (i + 1)] for i in range(n)]
        fins: list[tuple[torch.Tensor, ...]] = []  # (mean, invstd, scale, shift) per BatchNorm

        def finalize(partials, h: torch.Tensor, st: StageSpec, bn: tuple) -> tuple[torch.Tensor, ...]:
            N, C, H, W = h.shape
            fin = bn_ops.bn_finalize(partials, N * H * W, *bn, training=st.batch_stats, momentum=st.momentum,
                                     eps=st.eps, channels=C, device=h.device)
            fins.append(fin)
            return fin

        ys: list[torch.Tensor] = []
        h, scale, shift = x, None, None
        for i, (stride, pad) in enumerate(spec.convs):
            h, partials = conv_ops.conv_fprop(
                h, kernel_weight(weights[i]), stride=stride, padding=pad, scale=scale, shift=shift,
                stats=spec.bns[i].batch_stats,
            )
            ys.append(h)
            _, _, scale, shift = finalize(partials, h, spec.bns[i], bn_t[i])
        r, r_affine = (shortcut if shortcut is not None else x), ()
        ds_w = None
        if spec.downsample is not None:
            ds_stride, ds_st = spec.downsample
            ds_w, ds_bn = tensors[n + _PER_BN * n], tensors[n + _PER_BN * n + 1 :]
            r, ds_partials = conv_ops.conv_fprop(x, kernel_weight(ds_w), stride=ds_stride, padding=0,
                                                 stats=ds_st.batch_stats)
            r_affine = finalize(ds_partials, r, ds_st, ds_bn)[2:]
            bn_t.append(ds_bn)
        out = bn_ops.bn_add_relu(h, r, scale, shift, *r_affine)
        if not _wants_channels_last(x, weights[-1]):
            out = out.contiguous()
        r_saved = r if (spec.downsample is not None or shortcut is not None) else None
        ctx.save_for_backward(x, r_saved, ds_w, *ys, *weights, *(bn[0] for bn in bn_t),
                              *(t for fin in fins for t in fin))
        ctx.spec = spec
        ctx.bias_dtypes = [bn[1].dtype if bn[1] is not None else None for bn in bn_t]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec: PostActSpec = ctx.spec
        n = len(spec.convs)
        has_ds = spec.downsample is not None
        saved = ctx.saved_tensors
        x, r_saved, ds_w = saved[:3]
        ys = saved[3 : 3 + n]
        weights = saved[3 + n : 3 + 2 * n]
        n_bn = n + has_ds
        gammas = saved[3 + 2 * n : 3 + 2 * n + n_bn]
        flat = saved[3 + 2 * n + n_bn :]
        fins = [flat[4 * i : 4 * (i + 1)] for i in range(n_bn)]  # (mean, invstd, scale, shift)
        needs = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * (n + _PER_BN * n + (1 + _PER_BN) * has_ds)

        def bn_backward(i: int, dz: torch.Tensor, h: torch.Tensor, s: torch.Tensor, sx: torch.Tensor,
                        st: StageSpec) -> torch.Tensor:
            """BatchNorm i's parameter gradients into ``grads``; returns the gradient at its input."""
            g_slot = n + _PER_BN * i if i < n else n + _PER_BN * n + 1
            if gammas[i] is not None:
                grads[g_slot] = sx.to(gammas[i].dtype)
            if ctx.bias_dtypes[i] is not None:
                grads[g_slot + 1] = s.to(ctx.bias_dtypes[i])
            mean, inv = fins[i][0], fins[i][1]
            return bn_ops.bn_bwd_apply(dz, h, mean, inv, gammas[i], s, sx, training=st.batch_stats)

        r = r_saved if r_saved is not None else x
        mean_l, inv_l, s_l, b_l = fins[n - 1]
        r_bn = (fins[n][2], fins[n][3], fins[n][0], fins[n][1]) if has_ds else None
        g, psum, psumy, psumr = bn_ops.bn_add_relu_bwd(dout, ys[-1], r, s_l, b_l, mean_l, inv_l, r_bn)
        s, sx = bn_ops.bn_bwd_reduce(psum, psumy)
        dh = bn_backward(n - 1, g, ys[-1], s, sx, spec.bns[n - 1])
        dx_add = None
        if has_ds:
            ds_stride, ds_st = spec.downsample
            s_r, sx_r = bn_ops.bn_bwd_reduce(psum, psumr)
            dd = bn_backward(n, g, r_saved, s_r, sx_r, ds_st)
            grads[n + _PER_BN * n] = conv_ops.conv_wgrad(dd, x, ds_w, stride=ds_stride, padding=0)
            if needs[1]:
                dx_add, _ = conv_ops.conv_dgrad(dd, kernel_weight(ds_w), tuple(x.shape), stride=ds_stride,
                                                padding=0)
        elif needs[1] and r_saved is None:
            dx_add = g  # identity shortcut
        for i in reversed(range(n)):
            stride, pad = spec.convs[i]
            h_in = x if i == 0 else ys[i - 1]
            scale, shift = (fins[i - 1][2], fins[i - 1][3]) if i > 0 else (None, None)
            grads[i] = conv_ops.conv_wgrad(dh, h_in, weights[i], stride=stride, padding=pad, scale=scale, shift=shift)
            if i > 0:
                dz, (ps, psx) = conv_ops.conv_dgrad(
                    dh, kernel_weight(weights[i]), tuple(h_in.shape), stride=stride, padding=pad,
                    bn=(h_in, scale, shift, fins[i - 1][0], fins[i - 1][1]),
                )
                s, sx = bn_ops.bn_bwd_reduce(ps, psx)
                dh = bn_backward(i - 1, dz, h_in, s, sx, spec.bns[i - 1])
            elif needs[1]:
                dh, _ = conv_ops.conv_dgrad(dh, kernel_weight(weights[0]), tuple(x.shape), stride=stride,
                                            padding=pad, add=dx_add)
        dx = dh if needs[1] else None
        dshortcut = g if r_saved is not None and not has_ds and needs[2] else None
        return (None, dx, dshortcut, *grads)


def post_act_block(
    spec: PostActSpec,
    x: torch.Tensor,
    tensors: list[torch.Tensor | None],
    *,
    shortcut: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run a validated torchvision-style block through the fused kernels (see :class:`PostActSpec`
    and :class:`_PostActBlock` for the order of ``tensors``). ``shortcut`` is an already computed
    shortcut (a downsample module that is not conv1x1 + BatchNorm); None means the identity or
    ``spec.downsample``."""
    return _PostActBlock.apply(spec, x, shortcut, *tensors)
