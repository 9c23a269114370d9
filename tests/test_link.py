"""Linked blocks (issue #13, fusedres.blocks.run_linked): where fusedres runs blocks one after
another (PreActResNet, PreActSequential), block k's last convolution finalizes block k+1's first
BatchNorm and hands that off instead of its output's statistics partials.

The linked step must give the unlinked step's bits (outputs, every gradient, running statistics,
num_batches_tracked); a Finalize made for another BatchNorm is never taken; a hook between two
blocks means no link (it could change the output in place after the statistics were taken)."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from _helpers import CHAIN_KERNELS, HandWrittenPreAct, launched, randomize_bn
from torch import nn

import fusedres
from fusedres import PreActBasicBlock, PreActSequential, blocks
from fusedres._fused.batchnorm import set_link
from fusedres.models import preact_resnet
from fusedres.ops import bn as bn_ops
from fusedres.testing import set_fused

CL = torch.channels_last


def _unlinked():
    """Every link refused: the blocks run exactly as when called one by one."""
    return mock.patch.object(blocks, "_link", lambda *args: None)


def _train_step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """Everything a training step changes (output, input and parameter gradients, buffers), and
    the bn_finalize launches it ran."""
    x = x.clone().requires_grad_(True)
    before = fusedres.launch_counts["bn_finalize_kernel"]
    with launched(*CHAIN_KERNELS):
        out = model(x)
        out.backward(dy)
    finalizes = fusedres.launch_counts["bn_finalize_kernel"] - before
    state = {"out": out.detach(), "x.grad": x.grad}
    state.update({f"{n}.grad": p.grad for n, p in model.named_parameters()})
    state.update({n: b.clone() for n, b in model.named_buffers()})
    return state, finalizes


def _assert_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    bad = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not bad, f"differ from the unlinked step: {bad}"


@pytest.mark.parametrize("depth,kind,reference", [(8, "basic", "two-launch"), (11, "bottleneck", "default")])
def test_network_step_linked_is_bitwise_unlinked(poison, depth, kind, reference):
    """preact_resnet(8) / preact_resnet(11, bottleneck), N=2, 8x8: the first BatchNorm of every
    block but the first is finalized by the block before — across stages, into the projection
    blocks that open stages 2 and 3 — and the linked step has the bits of the unlinked step: of the
    default path (bottleneck) and of the two-launch reference (basic: producer_reductions(False),
    where no producer finalizes anything, so nothing is linked either; bit for bit the default
    path by tests/test_ticket.py). One reference each for the interpreter's time."""
    torch.manual_seed(0)
    model = randomize_bn(preact_resnet(depth, block=kind)).to(memory_format=CL)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=CL)
    dy = torch.randn(2, 10)
    with _unlinked(), bn_ops.producer_reductions(reference == "default"):
        ref, n_unlinked = _train_step(copy.deepcopy(model), x, dy)
    got, n_linked = _train_step(copy.deepcopy(model), x, dy)
    # linked: the head's only; unlinked, blocks 2 and 3 (three stages of one block) too; the
    # two-launch path finalizes each of its 7 BatchNorms (2 per block, the head's) in a launch
    assert n_linked == 1 and n_unlinked == (3 if reference == "default" else 7)
    _assert_equal(got, ref)


def _blocks(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [randomize_bn(PreActBasicBlock(8, 8), seed=i).to(memory_format=CL) for i in range(n)]


def _input() -> torch.Tensor:
    return torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)


def _with_link(producer: nn.Module, consumer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``producer(x)`` with its last convolution finalizing ``consumer``'s first BatchNorm, as the
    loop runs it — but the caller decides what runs next."""
    link = blocks._link(producer, consumer, x)
    assert link is not None
    set_link(x, link)
    try:
        return producer(x)
    finally:
        set_link(None)


def test_finalize_made_for_another_batchnorm_is_not_taken(poison):
    """Block a finalized c's first BatchNorm and handed that off with its output; b, called on
    that output outside the loop, must compute its own statistics (c's would normalise with c's
    weight and bias, and leave b's running statistics untouched)."""
    a, b, c = _blocks(3)
    twin_a, twin_b = copy.deepcopy(a), copy.deepcopy(b)
    x = _input()
    c_mean = c.bn1.running_mean.clone()
    with torch.no_grad():
        # (the unlinked producer first: the linked one must not take its launch plans)
        ref = twin_b(twin_a(x).clone())  # (a statistics pass of its own, as b must run)
        out = b(_with_link(a, c, x))
    assert not torch.equal(c.bn1.running_mean, c_mean)  # the link did finalize c's BatchNorm
    assert torch.equal(out, ref)
    for (name, got), want in zip(b.named_buffers(), twin_b.buffers()):
        assert torch.equal(got, want), name


def test_finalize_for_swapped_running_stats_is_not_taken(poison):
    """The consumer's running statistics buffers and batch counter replaced after the link was made
    (tensors the loop could not know, as ``load_state_dict(assign=True)`` would swap them): what the
    link updated is no longer the consumer's, so the consumer updates its new buffers itself, once.
    (Replacing only some of them would leave the others updated twice: the edge
    fusedres.blocks.run_linked names, a swap from another thread.)"""
    a, b = _blocks(2)
    twin_a, twin_b = copy.deepcopy(a), copy.deepcopy(b)
    x = _input()
    with torch.no_grad():
        ref = twin_b(twin_a(x).clone())
    link = blocks._link(a, b, x)
    b.bn1.running_mean = b.bn1.running_mean.clone()
    b.bn1.running_var = b.bn1.running_var.clone()
    b.bn1.num_batches_tracked = b.bn1.num_batches_tracked.clone()
    set_link(x, link)
    try:
        with torch.no_grad():
            h = a(x)
    finally:
        set_link(None)
    with torch.no_grad():
        out = b(h)  # unlinked, after a linked producer of its shape
    assert torch.equal(out, ref)
    for (name, got), want in zip(b.named_buffers(), twin_b.buffers()):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("where", ["module", "global"])
def test_hook_between_blocks_is_not_linked(poison, where):
    """A forward hook modifying block 0's output in place: the same result and running statistics
    as eager PyTorch (no link made, no stale statistics taken), fresh statistics of the modified
    tensor computed by block 1."""
    seq = PreActSequential(*_blocks(2))
    eager = set_fused(copy.deepcopy(seq), False)
    x = _input()

    def hook(module, args, output):
        if module is seq[0] or module is eager[0]:
            output.mul_(2.0).add_(0.5)

    handles = []
    if where == "module":
        handles = [seq[0].register_forward_hook(hook), eager[0].register_forward_hook(hook)]
    else:
        handles = [nn.modules.module.register_module_forward_hook(hook)]
    try:
        with torch.no_grad():
            before = fusedres.launch_counts["bn_stats_kernel"]
            with launched("conv_fprop_kernel"):
                out = seq(x)
            assert fusedres.launch_counts["bn_stats_kernel"] - before == 2  # block 1 read its input again
            ref = eager(x)
    finally:
        for hd in handles:
            hd.remove()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for (name, got), want in zip(seq.named_buffers(), eager.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_no_link_where_not_certain():
    """The link is refused wherever block k+1's first BatchNorm might not take it."""
    x = _input()
    cases = {
        "eval": lambda a, b: b.bn1.eval(),
        "momentum None": lambda a, b: setattr(b.bn1, "momentum", None),
        "unfused producer": lambda a, b: setattr(a, "fused", False),
        "unfused consumer": lambda a, b: setattr(b, "fused", False),
        "SyncBatchNorm": lambda a, b: setattr(b, "bn1", nn.SyncBatchNorm(8)),
        "forward replaced": lambda a, b: setattr(b, "forward", b.forward),
        "forward hook": lambda a, b: a.register_forward_hook(lambda m, args, out: None),
        "pre-hook": lambda a, b: b.register_forward_pre_hook(lambda m, args: None),
        "backward hook": lambda a, b: a.register_full_backward_hook(lambda m, gi, go: None),
        "other channels": lambda a, b: setattr(b, "in_channels", 4),
        "not a block": lambda a, b: None,
    }
    for name, change in cases.items():
        a, b = _blocks(2)
        assert blocks._link(a, b, x) is not None
        change(a, b)
        if name == "not a block":
            b = nn.Sequential(b)
        assert blocks._link(a, b, x) is None, name
    assert blocks._links_allowed(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not blocks._links_allowed(x)


def test_preact_resnet_state_dict_keys_unchanged():
    """The stages are PreActSequential: the same keys as nn.Sequential stages."""
    model = preact_resnet(8)
    assert all(type(layer) is PreActSequential for layer in model.layers)
    plain = copy.deepcopy(model)
    plain.layers = nn.ModuleList(nn.Sequential(*layer) for layer in model.layers)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert type(model.layers[0][:1]) is PreActSequential


# --------------------------------------------------------------------------------------------
# convert(): a plain nn.Sequential of consecutive fused pre-activation blocks becomes a
# PreActSequential (linked), in hand-written pre-activation ResNets and timm's ResNetV2 stages


def _hand_written_net() -> nn.Module:
    torch.manual_seed(0)
    stage = nn.Sequential(HandWrittenPreAct(8, 8), HandWrittenPreAct(8, 8), HandWrittenPreAct(8, 16, 2))
    return randomize_bn(nn.Sequential(stage, nn.Sequential(HandWrittenPreAct(16, 16)), nn.Flatten()))


def _resnetv2() -> nn.Module:
    resnetv2 = pytest.importorskip("timm.models.resnetv2")
    from timm.layers import BatchNormAct2d, create_conv2d

    torch.manual_seed(0)
    return randomize_bn(resnetv2.ResNetV2(layers=[3, 1], channels=(8, 16), num_classes=5, stem_chs=8,
                                          conv_layer=create_conv2d, norm_layer=BatchNormAct2d))


@pytest.mark.parametrize("family", ["hand-written", "resnetv2"])
def test_converted_network_linked_is_bitwise_unlinked(poison, family):
    """convert() makes the plain nn.Sequential holding consecutive fused pre-activation blocks a
    PreActSequential — the stage of three hand-written blocks (into the projection block that
    closes it), the ResNetV2 stage of three (timm's BatchNormAct2d takes the planned path), not
    a container with one block — and reports it; a training step then finalizes the first
    BatchNorm of blocks 2 and 3 in the blocks before them, with the unlinked step's bits."""
    model = _hand_written_net() if family == "hand-written" else _resnetv2()
    report = fusedres.inspect(model)
    converted = fusedres.convert(model).to(memory_format=CL)
    if family == "hand-written":
        assert report.linked == ["0"] and type(converted[0]) is PreActSequential
        assert type(converted) is nn.Sequential and type(converted[1]) is nn.Sequential
        x, dy = torch.randn(2, 8, 6, 6), torch.randn(2, 16 * 3 * 3)
    else:
        assert report.linked == ["stages.0.blocks"] and type(converted.stages[0].blocks) is PreActSequential
        assert type(converted.stages[1].blocks) is nn.Sequential
        x, dy = torch.randn(2, 3, 16, 16), torch.randn(2, 5)
    assert "linked (each block's last convolution finalizes the next block's first BatchNorm)" in str(report)
    assert list(converted.state_dict()) == list(model.state_dict())
    x = x.contiguous(memory_format=CL)
    with _unlinked():
        ref, n_unlinked = _train_step(copy.deepcopy(converted), x, dy)
    got, n_linked = _train_step(copy.deepcopy(converted), x, dy)
    assert n_unlinked - n_linked == 2  # blocks 2 and 3 of the linked stage
    _assert_equal(got, ref)


def test_inspect_names_fusedres_networks_linked():
    """A PreActSequential is reported as linked as it is (no class to swap), a subclass of
    nn.Sequential with a forward of its own is not linked, nor a container with no two fused
    pre-activation blocks in a row."""

    class Own(nn.Sequential):
        def forward(self, x):  # noqa: ANN001, ANN202
            return super().forward(x)

    assert fusedres.inspect(preact_resnet(20)).linked == ["layers.0", "layers.1", "layers.2"]  # 3 blocks each
    model = nn.Sequential(PreActSequential(*_blocks(2)), Own(*_blocks(2)),
                          nn.Sequential(_blocks(1)[0], nn.Identity(), _blocks(1)[0]))
    assert fusedres.inspect(model).linked == ["0"]
    converted = fusedres.convert(model)
    assert [type(m) for m in converted] == [PreActSequential, Own, nn.Sequential]
