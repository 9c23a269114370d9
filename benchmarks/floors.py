"""The floors of the benchmark cases: FLOPs, bytes, kernel launches, and the time nothing beats.

``python benchmarks/floors.py [--triton-launch-us 5,30,120] [--aten-launch-us 6] [--graph-us 2]`` prints Markdown tables
(benchmarks/NOTES.md keeps them). Pure arithmetic: no torch, no GPU.

Model (bf16 activations and weights, fp32 per-channel vectors, which are left out):

- FLOPs: convolutions only, 2 * N * OH * OW * Cout * Cin * k^2 per pass; a training step runs fprop,
  dgrad and wgrad (the network's stem has no dgrad). BatchNorm/ReLU/add arithmetic is ignored.
- Bytes: each kernel reads each of its inputs once from DRAM and writes each output once; no L2 reuse
  between kernels (on an H100/H200, 50 MB of L2 holds whole CIFAR-sized activations, so the small
  cases can beat their DRAM floor; the big ImageNet cases cannot). Three kernel sequences:
  * ``fused``: the sequence fusedres launches today (functional._BnReluConvChain at b41f669): a
    statistics pass over the block input, each conv with the BN-ReLU prologue (and the next BN's
    statistics in its epilogue, the shortcut add in the last one), wgrad recomputing the activation,
    dgrad with the ReLU mask and BN-backward sums in its epilogue, a BN-backward apply pass per stage.
    The split-K fp32 workspace of wgrad (< 5 MB in every case here) is left out.
  * ``eager``: what PyTorch eager moves for the same block (bf16 BatchNorm runs PyTorch's native
    channels_last kernels, not cuDNN: statistics pass + apply pass forward, reduce + apply backward;
    ReLU out of place; ReLU backward reads its saved output; the shortcut add and the gradient
    accumulation where a tensor feeds two consumers are separate passes).
  * ``compile``: an ESTIMATE of torch.compile (Inductor): BN-apply+ReLU fused into one pass, ReLU- and
    BN-backward fused into one reduction and one apply pass, convolutions still cuDNN, statistics
    still a separate reduction. Not measured.
  * ``cuDNN route``: fusedres with every convolution routed to cuDNN (ops/route.py at 6cd01de): a
    statistics pass and a BN-ReLU apply pass before each conv, the apply recomputed before each
    wgrad, a ReLU-mask/partials pass writing dz after each dgrad, the BN-backward apply, the
    residual added by a separate in-place add.
- Floor: max(FLOPs / peak, bytes / bandwidth) with the datasheet peaks below.
- Launches: the fused count is what ``fusedres.launch_counts`` records under TRITON_INTERPRET=1
  (Triton kernels) plus the ``num_batches_tracked += 1`` of each BatchNorm (one ATen kernel each);
  the eager count takes the ATen ops that a TorchDispatchMode logs for the block on the CPU and
  maps each to its CUDA kernels (a range: cuDNN may add a reformat/split-K kernel, the native
  channels_last BatchNorm a memset for its grid-reduction semaphores). Host costs per launch are
  ASSUMPTIONS given on the command line, not measurements.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

BYTES = 2  # bf16

#: name -> (dense bf16 FLOP/s, DRAM bytes/s), datasheet values.
DEVICES = {"H100 SXM": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}

# CUDA kernels per ATen op of the eager block (low, high); see the module docstring.
ATEN_KERNELS = {
    "num_batches_tracked add_": (1, 1),
    "native_batch_norm (train, channels_last)": (3, 4),  # stats (+memset), update_stats_and_invert, apply
    "relu": (1, 1),
    "convolution (cuDNN fprop)": (1, 2),
    "add": (1, 1),
    "convolution_backward (dgrad + wgrad)": (2, 4),
    "threshold_backward": (1, 1),
    "native_batch_norm_backward (channels_last)": (2, 3),  # reduce (+memset), apply
}


@dataclass(frozen=True)
class Conv:
    """One convolution: input (n, cin, hw, hw), a cout x cin x k x k kernel, padding k // 2."""

    n: int
    cin: int
    cout: int
    hw: int
    k: int
    stride: int = 1

    @property
    def ohw(self) -> int:
        return (self.hw + 2 * (self.k // 2) - self.k) // self.stride + 1

    @property
    def flops(self) -> float:
        return 2.0 * self.n * self.ohw**2 * self.cout * self.cin * self.k**2

    @property
    def x(self) -> float:
        return self.n * self.cin * self.hw**2 * BYTES

    @property
    def y(self) -> float:
        return self.n * self.cout * self.ohw**2 * BYTES

    @property
    def w(self) -> float:
        return self.cout * self.cin * self.k**2 * BYTES


@dataclass
class Traffic:
    """FLOPs and DRAM bytes of a kernel sequence, forward and backward kept apart."""

    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    fwd_bytes: float = 0.0
    bwd_bytes: float = 0.0

    @property
    def flops(self) -> float:
        return self.fwd_flops + self.bwd_flops

    @property
    def bytes(self) -> float:
        return self.fwd_bytes + self.bwd_bytes

    def __add__(self, o: Traffic) -> Traffic:
        return Traffic(
            self.fwd_flops + o.fwd_flops,
            self.bwd_flops + o.bwd_flops,
            self.fwd_bytes + o.fwd_bytes,
            self.bwd_bytes + o.bwd_bytes,
        )


# --------------------------------------------------------------------------- layers (DESIGN.md §5)

LAYERS = [  # mirrors benchmarks/cases.py LAYER_SHAPES
    ("3x3 64->64 56^2 N256", Conv(256, 64, 64, 56, 3)),
    ("3x3 128->128 28^2 N256", Conv(256, 128, 128, 28, 3)),
    ("3x3 512->512 7^2 N256", Conv(256, 512, 512, 7, 3)),
    ("1x1 64->16 32^2 N128", Conv(128, 64, 16, 32, 1)),
    ("3x3 16->16 32^2 N128", Conv(128, 16, 16, 32, 3)),
    ("3x3 64->128 s2 56^2 N256", Conv(256, 64, 128, 56, 3, 2)),
]


def layer_roles(c: Conv) -> list[tuple[str, float, float, float]]:
    """(role, FLOPs, fused bytes, eager bytes) of each benchmarked role of one layer.

    The eager bytes are PyTorch's own kernels for the same work: BN-apply (given statistics) +
    ReLU + conv for fprop+bnrelu; dgrad + ReLU backward + the BN-backward reduction for dgrad+bnbwd;
    wgrad on the stored activation for wgrad+bnrelu.
    """
    X, Y, W, F = c.x, c.y, c.w, c.flops
    return [
        ("fprop", F, X + W + Y, X + W + Y),
        ("fprop+bnrelu", F, X + W + Y, 5 * X + W + Y),
        ("dgrad", F, Y + W + X, Y + W + X),
        ("dgrad+bnbwd", F, Y + W + 2 * X, Y + W + X + 3 * X + 2 * X),
        ("wgrad+bnrelu", F, Y + X + W, Y + X + W),
        # bn_relu_conv2d training step. fused: stats, fprop, wgrad, dgrad+mask, apply (3X);
        # eager: BN (3X) + ReLU (2X) + conv, conv backward, ReLU backward (3X), BN backward (5X).
        (
            "op fwd+bwd",
            3 * F,
            X + (X + W + Y) + (Y + X + W) + (Y + W + 2 * X) + 3 * X,
            5 * X + (X + W + Y) + (Y + W + X) + (Y + X + W) + 8 * X,
        ),
    ]


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Block:
    """A pre-activation block: bn-relu-conv stages and an identity or 1x1 projection shortcut."""

    name: str
    stages: tuple[Conv, ...]
    projection: Conv | None = None  # 1x1 conv of relu(bn1(x)) with the block's stride

    def acts(self) -> list[float]:
        """Bytes of each stage input h_0 = x, h_1, ..., and of the output h_S."""
        return [s.x for s in self.stages] + [self.stages[-1].y]


def basic_block(n: int, cin: int, c: int, hw: int, stride: int = 1, name: str = "") -> Block:
    s1 = Conv(n, cin, c, hw, 3, stride)
    s2 = Conv(n, c, c, s1.ohw, 3)
    proj = Conv(n, cin, c, hw, 1, stride) if (stride != 1 or cin != c) else None
    return Block(name or f"PreActBasicBlock {c}ch {hw}^2 N{n}", (s1, s2), proj)


def bottleneck(n: int, cin: int, c: int, hw: int, stride: int = 1, name: str = "") -> Block:
    ohw = Conv(n, c, c, hw, 3, stride).ohw
    stages = (Conv(n, cin, c, hw, 1), Conv(n, c, c, hw, 3, stride), Conv(n, c, 4 * c, ohw, 1))
    proj = Conv(n, cin, 4 * c, hw, 1, stride) if (stride != 1 or cin != 4 * c) else None
    return Block(name or f"PreActBottleneck {cin}/{c}ch {hw}^2 N{n}", stages, proj)


BLOCKS = [  # mirrors benchmarks/cases.py BLOCK_CASES
    basic_block(256, 64, 64, 56),
    basic_block(256, 128, 128, 28),
    basic_block(256, 256, 256, 14),
    basic_block(256, 512, 512, 7),
    bottleneck(128, 64, 16, 32),
    bottleneck(128, 128, 32, 16),
    bottleneck(128, 256, 64, 8),
]


def conv_flops(b: Block) -> Traffic:
    f = sum(s.flops for s in b.stages) + (b.projection.flops if b.projection else 0.0)
    return Traffic(fwd_flops=f, bwd_flops=2 * f)


def fused_bytes(b: Block) -> Traffic:
    """DRAM bytes of fusedres's kernel sequence for one block training step (module docstring)."""
    h = b.acts()
    out = h[-1]
    S = len(b.stages)
    fwd = h[0]  # bn_stats(x)
    bwd = 0.0
    if b.projection:
        p = b.projection
        fwd += p.x + p.w + p.y  # projection fprop with the bn1-relu prologue
        bwd += p.y + p.x  # projection wgrad (recomputes relu(bn1(x)))
        bwd += p.y + p.w + p.x  # projection dgrad -> gradient of a1, added in dgrad1's epilogue
    for i, s in enumerate(b.stages):
        last = i == S - 1
        fwd += s.x + s.w + s.y + (out if last else 0.0)  # + shortcut read in the last epilogue
        bwd += s.y + s.x  # wgrad: dh_{i+1}, h_i
        bwd += s.y + s.w + s.x + s.x + (b.projection.x if (i == 0 and b.projection) else 0.0)  # dgrad+mask
        bwd += 3 * s.x + (h[0] if (i == 0 and not b.projection) else 0.0)  # BN apply (+ dout for identity)
    return Traffic(fwd_bytes=fwd, bwd_bytes=bwd)


def eager_bytes(b: Block) -> Traffic:
    """DRAM bytes of PyTorch eager's kernels for the same block training step (module docstring)."""
    h = b.acts()
    fwd = bwd = 0.0
    for s in b.stages:
        fwd += 3 * s.x + 2 * s.x  # BN stats + apply, ReLU
        fwd += s.x + s.w + s.y  # conv
        bwd += s.y + s.w + s.x  # dgrad
        bwd += s.y + s.x  # wgrad on the stored activation
        bwd += 3 * s.x + 5 * s.x  # ReLU backward, BN backward (reduce + apply)
    if b.projection:
        p = b.projection
        fwd += p.x + p.w + p.y
        bwd += (p.y + p.w + p.x) + (p.y + p.x) + 3 * p.x  # dgrad, wgrad, accumulate into d(a1)
    else:
        bwd += 3 * h[0]  # dx = dout + BN1-backward output
    fwd += 3 * h[-1]  # shortcut add
    return Traffic(fwd_bytes=fwd, bwd_bytes=bwd)


def routed_bytes(b: Block) -> Traffic:
    """DRAM bytes of fusedres with every convolution on the cuDNN route (module docstring)."""
    h = b.acts()
    fwd = bwd = 0.0
    for i, s in enumerate(b.stages):
        fwd += s.x + 2 * s.x + (s.x + s.w + s.y)  # statistics, BN-ReLU apply, cuDNN conv
        bwd += 2 * s.x + (s.y + s.x + s.w)  # apply recomputed, cuDNN wgrad
        bwd += s.y + s.w + s.x  # cuDNN dgrad
        if i == 0 and b.projection:
            bwd += 3 * s.x  # da += d(a1) from the projection's dgrad
        bwd += 3 * s.x + 3 * s.x + (h[0] if (i == 0 and not b.projection) else 0.0)  # partials -> dz, apply
    if b.projection:
        p = b.projection
        fwd += 2 * p.x + (p.x + p.w + p.y)  # its own apply pass, cuDNN conv
        bwd += 2 * p.x + (p.y + p.x + p.w) + (p.y + p.w + p.x)  # apply, wgrad, dgrad
    fwd += 3 * h[-1]  # y += shortcut
    return Traffic(fwd_bytes=fwd, bwd_bytes=bwd)


def compile_bytes(b: Block) -> Traffic:
    """ESTIMATE of torch.compile's bytes: eager with BN-apply+ReLU fused (3 -> 2 passes' worth less)
    forward and ReLU-backward + BN-backward fused (8 -> 5) backward; convs unchanged."""
    e = eager_bytes(b)
    saved_fwd = sum(2 * s.x for s in b.stages)  # apply+ReLU: read x, write a (2) instead of 4
    saved_bwd = sum(3 * s.x for s in b.stages)
    return Traffic(fwd_bytes=e.fwd_bytes - saved_fwd, bwd_bytes=e.bwd_bytes - saved_bwd)


def saved_bytes(b: Block) -> tuple[float, float]:
    """Activation bytes kept for backward: (fused, eager). Fused keeps each stage input; eager keeps
    each BN input and each ReLU output (the conv input)."""
    stage_in = sum(s.x for s in b.stages)
    return stage_in, 2 * stage_in


def launches(b: Block) -> tuple[int, tuple[int, int]]:
    """Kernel launches of one training step: (fused, (eager low, eager high)); see module docstring."""
    S, P = len(b.stages), int(b.projection is not None)
    triton = (1 + 2 * S + P) + (5 * S + 3 * P)  # fwd: stats, S x (finalize, fprop), proj; bwd per stage 5
    fused = triton + S  # + num_batches_tracked per BatchNorm
    ops = {  # ATen ops per block, as TorchDispatchMode logs them
        "num_batches_tracked add_": S,
        "native_batch_norm (train, channels_last)": S,
        "relu": S,
        "convolution (cuDNN fprop)": S + P,
        "add": 2,  # shortcut add forward, gradient accumulation backward
        "convolution_backward (dgrad + wgrad)": S + P,
        "threshold_backward": S,
        "native_batch_norm_backward (channels_last)": S,
    }
    lo = sum(n * ATEN_KERNELS[k][0] for k, n in ops.items())
    hi = sum(n * ATEN_KERNELS[k][1] for k, n in ops.items())
    return fused, (lo, hi)


def aten_ops(b: Block) -> int:
    """ATen ops that launch kernels in one eager training step (the ``ops`` of :func:`launches`)."""
    S, P = len(b.stages), int(b.projection is not None)
    return 5 * S + 2 * (S + P) + 2


# --------------------------------------------------------------------------- the network


def resnet164(n: int = 128) -> tuple[list[Block], Traffic, Traffic]:
    """The 54 bottlenecks of preact_resnet(164) at batch n, and the stem + head traffic (fused, eager).

    Stages of 18 blocks, 16/32/64 wide (x4 out), at 32^2, 16^2, 8^2; the first block of stages 2 and 3
    has stride 2, every first block a projection shortcut (16 -> 64 channels in stage 1).
    """
    blocks, cin, hw = [], 16, 32
    for stage, width in enumerate((16, 32, 64)):
        for j in range(18):
            stride = 2 if (stage > 0 and j == 0) else 1
            blocks.append(bottleneck(n, cin, width, hw, stride))
            cin, hw = 4 * width, blocks[-1].stages[-1].ohw
    stem = Conv(n, 3, 16, 32, 3)
    stem_t = Traffic(stem.flops, stem.flops, stem.x + stem.w + stem.y, stem.y + stem.x)  # no dgrad
    head = n * 256 * 8 * 8 * BYTES  # the activation entering the final BN-ReLU-pool
    fused_head = Traffic(fwd_bytes=2 * head, bwd_bytes=5 * head)  # stats + pool; pool-bwd, apply
    eager_head = Traffic(fwd_bytes=6 * head, bwd_bytes=8 * head)  # BN 3, ReLU 2, mean 1; ReLU-bwd, BN-bwd
    return blocks, stem_t + fused_head, stem_t + eager_head


# --------------------------------------------------------------------------- printing


def floor_us(flops: float, nbytes: float, device: str) -> tuple[float, str]:
    peak, bw = DEVICES[device]
    tc, tm = flops / peak * 1e6, nbytes / bw * 1e6
    return max(tc, tm), ("compute" if tc >= tm else "memory")


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f}" if b < 1e8 else f"{b / 1e6:.0f}"


def _us(t: float) -> str:
    return f"{t:.1f}" if t < 100 else f"{t:.0f}"


def layer_table() -> list[str]:
    out = [
        "| layer | role | GFLOP | fused MB | eager MB | FLOP/B (fused) | H100 floor µs | H200 floor µs | bound |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, c in LAYERS:
        for role, f, fb, eb in layer_roles(c):
            t1, bound = floor_us(f, fb, "H100 SXM")
            t2, bound2 = floor_us(f, fb, "H200")
            b = bound if bound == bound2 else f"{bound} (H100) / {bound2} (H200)"
            out.append(
                f"| {name} | {role} | {f / 1e9:.2f} | {_mb(fb)} | {_mb(eb)} | {f / fb:.0f} | {_us(t1)} | "
                f"{_us(t2)} | {b} |"
            )
    return out


def block_rows(
    blocks: list[tuple[str, Traffic, Traffic, Traffic, Traffic, Traffic, tuple[float, float]]],
) -> list[str]:
    out = [
        "| case | GFLOP fwd+bwd | fused MB | cuDNN-route MB | compile MB (est.) | eager MB | "
        "eager/fused bytes | H100 floor µs (fused / eager) | H200 floor µs (fused / eager) | "
        "bound (fused, H100) | saved MB fused / eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, fl, fu, ro, co, ea, (sf, se) in blocks:
        f1, b1 = floor_us(fl.flops, fu.bytes, "H100 SXM")
        e1, _ = floor_us(fl.flops, ea.bytes, "H100 SXM")
        f2, _ = floor_us(fl.flops, fu.bytes, "H200")
        e2, _ = floor_us(fl.flops, ea.bytes, "H200")
        out.append(
            f"| {name} | {fl.flops / 1e9:.1f} | {_mb(fu.bytes)} | {_mb(ro.bytes)} | {_mb(co.bytes)} | "
            f"{_mb(ea.bytes)} | "
            f"{ea.bytes / fu.bytes:.2f} | {_us(f1)} / {_us(e1)} | {_us(f2)} / {_us(e2)} | {b1} | "
            f"{_mb(sf)} / {_mb(se)} |"
        )
    return out


def launch_table(triton_us: list[float], aten_us: float, graph_us: float) -> list[str]:
    head = " | ".join(f"fused host µs @{t:g}/Triton launch" for t in triton_us)
    out = [
        f"| case | fused launches (Triton + ATen) | eager kernels (ATen ops) | H100 floor µs (fused) | {head} | "
        f"eager host µs @{aten_us:g}/ATen op | fused graph gaps µs @{graph_us:g}/kernel | host / floor |",
        "|---|---:|---:|---:|" + "---:|" * len(triton_us) + "---:|---:|---:|",
    ]
    for b in BLOCKS:
        fused, (lo, hi) = launches(b)
        S = len(b.stages)
        tri = fused - S
        floor, _ = floor_us(conv_flops(b).flops, fused_bytes(b).bytes, "H100 SXM")
        hosts = [tri * t + S * aten_us for t in triton_us]
        eager_host = aten_ops(b) * aten_us
        ratio = " - ".join(f"{h / floor:.1f}x" for h in hosts)
        out.append(
            f"| {b.name} | {fused} ({tri} + {S}) | {lo}-{hi} ({aten_ops(b)}) | {_us(floor)} | "
            + " | ".join(_us(h) for h in hosts)
            + f" | {_us(eager_host)} | {_us(fused * graph_us)} | {ratio} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--triton-launch-us",
        default="5,30,120",
        help="host cost of one Triton launch in µs, comma-separated (default: 5,30,120)",
    )
    ap.add_argument(
        "--aten-launch-us",
        type=float,
        default=6.0,
        help="host cost of one eager ATen op with autograd, µs (default: 6)",
    )
    ap.add_argument(
        "--graph-us",
        type=float,
        default=2.0,
        help="GPU-side gap per kernel when replayed from a CUDA graph, µs (default: 2)",
    )
    args = ap.parse_args(argv)
    triton_us = [float(t) for t in args.triton_launch_us.split(",")]

    print("## Layers (one kernel role each, bf16)\n")
    print("\n".join(layer_table()))

    rows = [
        (b.name, conv_flops(b), fused_bytes(b), routed_bytes(b), compile_bytes(b), eager_bytes(b), saved_bytes(b))
        for b in BLOCKS
    ]
    blocks, fused_extra, eager_extra = resnet164()
    tot_f = sum((conv_flops(b) for b in blocks), Traffic()) + Traffic(fused_extra.fwd_flops, fused_extra.bwd_flops)
    tot_fu = sum((fused_bytes(b) for b in blocks), Traffic()) + Traffic(
        0, 0, fused_extra.fwd_bytes, fused_extra.bwd_bytes
    )
    tot_ea = sum((eager_bytes(b) for b in blocks), Traffic()) + Traffic(
        0, 0, eager_extra.fwd_bytes, eager_extra.bwd_bytes
    )
    tot_co = sum((compile_bytes(b) for b in blocks), Traffic()) + Traffic(
        0, 0, eager_extra.fwd_bytes, eager_extra.bwd_bytes
    )
    tot_ro = sum((routed_bytes(b) for b in blocks), Traffic()) + Traffic(
        0, 0, fused_extra.fwd_bytes, fused_extra.bwd_bytes
    )
    saved = (sum(saved_bytes(b)[0] for b in blocks), sum(saved_bytes(b)[1] for b in blocks))
    rows.append(
        ("preact_resnet(164) N128 (54 bottlenecks + stem + head)", tot_f, tot_fu, tot_ro, tot_co, tot_ea, saved)
    )
    print("\n## Blocks and the network (one training step, forward + backward, bf16)\n")
    print("\n".join(block_rows(rows)))

    n_f = sum(launches(b)[0] for b in blocks)
    lo = sum(launches(b)[1][0] for b in blocks)
    hi = sum(launches(b)[1][1] for b in blocks)
    print("\n## Kernel launches per training step\n")
    print("\n".join(launch_table(triton_us, args.aten_launch_us, args.graph_us)))
    floor_net, _ = floor_us(tot_f.flops, tot_fu.bytes, "H100 SXM")
    n_t = n_f - sum(len(b.stages) for b in blocks)
    print(
        f"\npreact_resnet(164) N128, the 54 blocks alone: fused {n_f} launches ({n_t} Triton), eager {lo}-{hi} "
        f"kernels from {sum(aten_ops(b) for b in blocks)} ATen ops; fused floor of the whole step on H100 "
        f"{_us(floor_net)} µs; fused host time at "
        + ", ".join(f"{t:g} µs/Triton launch: {n_t * t / 1000:.1f} ms" for t in triton_us)
        + f"; eager host time at {args.aten_launch_us:g} µs/ATen op: "
        f"{sum(aten_ops(b) for b in blocks) * args.aten_launch_us / 1000:.1f} ms."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
