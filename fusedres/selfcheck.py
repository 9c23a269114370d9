"""``fusedres check``: the fused op and the fused blocks against float64 PyTorch, as two tables.

Every result is judged by the rule of :mod:`fusedres.testing`: the fused error against a
float64 reference is within twice eager PyTorch's own error in the same dtype, plus a small
floor. A row also fails when the Triton kernels it should have launched did not run. Every
convolution is pinned to the Triton kernels, as in the tests, even where the measured dispatch
table (:mod:`fusedres.ops.route`) would hand it to cuDNN: the check is of our kernels.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from . import _runtime
from .blocks import PreActBasicBlock, PreActBottleneck
from .ops import route
from .testing import CaseResult, atol, check_bn_relu_conv2d, check_module, tf32

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

OP_CASES = [
    # (n, c, h, w, cout, ksize, stride, padding, residual)
    (2, 19, 9, 7, 21, 3, 1, 1, True),
    (3, 16, 8, 8, 32, 3, 2, 1, False),
    (2, 24, 7, 9, 40, 1, 1, 0, True),
    (2, 8, 9, 9, 16, 1, 2, 0, False),
]

# (block, in_channels, channels, stride): an identity and a projection shortcut of each block.
# Tiny under the interpreter (each case costs about a second there), moderate on a GPU.
BLOCK_CASES_CPU = [
    (PreActBasicBlock, 16, 16, 1),
    (PreActBasicBlock, 8, 16, 2),
    (PreActBottleneck, 32, 8, 1),
    (PreActBottleneck, 16, 8, 2),
]
BLOCK_CASES_CUDA = [
    (PreActBasicBlock, 64, 64, 1),
    (PreActBasicBlock, 32, 64, 2),
    (PreActBottleneck, 64, 16, 1),
    (PreActBottleneck, 64, 32, 2),
]
BLOCK_BATCH_CPU, BLOCK_SIZE_CPU = 2, 6
BLOCK_BATCH_CUDA, BLOCK_SIZE_CUDA = 8, 16

#: What a block's training step must launch, per role — forward, input gradient, weight gradient —
#: and the kernels that carry each out (the two gradients alone, or in one merged launch).
BLOCK_KERNELS = {
    "conv_fprop_kernel": ("conv_fprop_kernel",),
    "conv_dgrad_kernel": ("conv_dgrad_kernel", "conv_bwd_kernel"),
    "conv_wgrad_kernel": ("conv_wgrad_kernel", "conv_bwd_kernel"),
}

#: Columns of the block table: the quantities of :func:`fusedres.testing.check_module`, grouped.
_GROUPS = {
    "output": ("out", "eval_out"),
    "input grad": ("grad_input",),
    "param grads": ("grad ",),
    "running stats": ("buffer ",),
}
_GRADIENT_GROUPS = ("input grad", "param grads")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ratio(r: CaseResult, key: str, dtype: torch.dtype) -> float:
    """How close ``key`` is to failing: fused error over the acceptance bound."""
    return r.fused[key] / (2.0 * r.eager[key] + atol(dtype, r.device))


def _crashed(e: Exception) -> str:
    """A row whose run raised: the table goes on, the row fails with the error's first line."""
    return f"FAIL: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _op_row(device: torch.device, dtype: torch.dtype, case: tuple, training: bool) -> tuple[str, bool]:
    n, c, h, w, cout, k, s, p, res = case
    before = _runtime.launch_counts["conv_fprop_kernel"]
    r = check_bn_relu_conv2d(n=n, c=c, h=h, w=w, cout=cout, ksize=k, stride=s, padding=p, dtype=dtype,
                             device=device, training=training, residual=res)
    launched = _runtime.launch_counts["conv_fprop_kernel"] > before
    bad = r.failures(dtype)
    worst = max(r.fused, key=lambda q: _ratio(r, q, dtype))
    ok = launched and not bad
    verdict = "ok" if ok else ("FAIL: " + "; ".join(bad) if launched else "FAIL: Triton did not run")
    return f"{r.fused[worst]:>16.2e} {r.eager[worst]:>10.2e}  {verdict}", ok


def op_table(device: torch.device, quick: bool = False) -> int:
    """Print the table of :func:`fusedres.bn_relu_conv2d` cases (``quick``: the first only); return
    the number of failed rows."""
    print(f"{'bn_relu_conv2d case':<34} {'dtype':<9} {'mode':<6} {'worst fused err':>16} {'eager err':>10}  result")
    failed = 0
    for dtype in DTYPES:
        for case in OP_CASES[:1] if quick else OP_CASES:
            for training in (True, False):
                try:
                    text, ok = _op_row(device, dtype, case, training)
                except Exception as e:  # reported in its row; the other rows still run
                    text, ok = f"{'-':>16} {'-':>10}  {_crashed(e)}", False
                failed += not ok
                n, c, h, w, cout, k, s, _, res = case
                name = f"{n}x{c}x{h}x{w} -> {cout} k{k} s{s}{' +res' if res else ''}"
                print(f"{name:<34} {_dtype_name(dtype):<9} {'train' if training else 'eval':<6} {text}")
    return failed


def _group_keys(r: CaseResult, group: str) -> list[str]:
    return [k for k in r.fused if k.startswith(_GROUPS[group])]


_CELL = 18


def _block_row(block: nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> tuple[str, bool]:
    judged_groups = tuple(_GROUPS) if dtype == torch.float32 else ("output", "running stats")
    before = {k: _runtime.launch_counts[k] for role in BLOCK_KERNELS.values() for k in role}
    # Full fp32 products for the fp32 rows, as in the tests: with small batches, BatchNorm's
    # backward amplifies TF32's 10-bit products into 1e-2 gradient errors.
    with tf32(False):
        r = check_module(block, shape, dtype=dtype, device=device, steps=2)
    missing = [name for name, role in BLOCK_KERNELS.items()
               if all(_runtime.launch_counts[k] == before[k] for k in role)]
    cells, bad = [], []
    for group in _GROUPS:
        keys = _group_keys(r, group)
        worst = max(keys, key=lambda q: _ratio(r, q, dtype))
        mark = "*" if group not in judged_groups else " "
        cells.append(f"{r.fused[worst]:.1e}/{r.eager[worst]:.1e}{mark}".rjust(_CELL))
        if group in judged_groups:
            bad += [f for f in r.failures(dtype) if f.split(":")[0] in keys]
    if missing:
        verdict = "FAIL: Triton did not run " + ", ".join(missing)
    else:
        verdict = "FAIL: " + "; ".join(bad) if bad else "ok"
    return f"{''.join(cells)}  {verdict}", not bad and not missing


def block_table(device: torch.device, quick: bool = False) -> int:
    """Print the table of block cases (two training steps, then eval; ``quick``: the identity-shortcut
    case of each block); return the number of failed rows.

    Gradients are judged in float32 only. At bf16/fp16 a pre-activation within a rounding of
    zero flips its ReLU mask against the float64 reference, and one flip moves every gradient of
    that BatchNorm's channel: the gradient error of a chain of stages is heavy-tailed, for eager
    PyTorch as for the fused kernels, so one run says little (tests/_helpers.py has the
    measurements). Those gradients are printed, marked ``*``, and not judged.
    """
    cuda = device.type == "cuda"
    cases = BLOCK_CASES_CUDA if cuda else BLOCK_CASES_CPU
    if quick:
        cases = [case for case in cases if case[3] == 1 and case[1] == case[2] * case[0].expansion]
    batch, size = (BLOCK_BATCH_CUDA, BLOCK_SIZE_CUDA) if cuda else (BLOCK_BATCH_CPU, BLOCK_SIZE_CPU)
    header = "".join(f"{g + ' f/e':>{_CELL}}" for g in _GROUPS)
    print(f"{'block, input':<40} {'dtype':<9}{header}  result")
    failed = 0
    for dtype in DTYPES:
        for cls, cin, ch, stride in cases:
            torch.manual_seed(0)
            block: nn.Module = cls(cin, ch, stride)
            try:
                text, ok = _block_row(block, (batch, cin, size, size), device, dtype)
            except Exception as e:  # reported in its row; the other rows still run
                text, ok = f"{'-':>{_CELL * len(_GROUPS)}}  {_crashed(e)}", False
            failed += not ok
            shortcut = "proj" if hasattr(block, "shortcut") else "id"
            name = f"{cls.__name__}({cin},{ch},{stride}) {shortcut}, {batch}x{cin}x{size}x{size}"
            print(f"{name:<40} {_dtype_name(dtype):<9}{text}")
    print("f/e: worst fused / eager PyTorch error against float64 (two training steps, then eval)")
    print("*: shown, not judged: at bf16/fp16 a chain of BatchNorm-ReLU stages flips ReLU masks, so one "
          "run's gradient error is heavy-tailed for eager PyTorch and fused alike")
    return failed


def run(device: torch.device, quick: bool = False) -> int:
    """``fusedres check`` on ``device`` (``--quick``: ``quick``): print both tables; 0 when every row
    passed, else 1."""
    start = time.perf_counter()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter"
    print(f"fusedres self-check on {where} (torch {torch.__version__}), convolutions on the Triton kernels")
    with route.force("triton"):
        failed = op_table(device, quick)
        middle = time.perf_counter()
        print()
        failed += block_table(device, quick)
    end = time.perf_counter()
    took = f"op {middle - start:.0f} s, blocks {end - middle:.0f} s"
    print(f"all checks passed ({took})" if not failed else f"{failed} checks FAILED ({took})")
    return 1 if failed else 0
