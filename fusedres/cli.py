"""The ``fusedres`` command (``python -m fusedres``): ``check``, ``bench``, ``train`` and ``inspect``.

Without a command it runs ``check``, then ``bench`` when a CUDA GPU is present. Without CUDA,
``check`` and ``train --fused`` re-run the command under the Triton interpreter
(``TRITON_INTERPRET=1``, which must be set before triton is imported) so that the real kernels
run on the CPU. A user error ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

import torch

from . import _runtime

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: printed as ``fusedres: error: <message>``, exit status 2, no traceback."""


def reexec_under_interpreter(argv: list[str], note: str | None = None) -> NoReturn:
    """Replace this process by ``python -m fusedres ARGV`` with ``TRITON_INTERPRET=1``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Set, yet triton did not pick it up: re-running would loop.
        raise CLIError("TRITON_INTERPRET=1 is set but the Triton interpreter is off (triton was imported first?)")
    if note:
        print(f"fusedres: note: {note}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "fusedres", *argv], env)


def _check_device(argv: list[str]) -> torch.device:
    """CUDA when present; else the CPU, under the interpreter (re-running the command if needed)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not _runtime.INTERPRET:
        reexec_under_interpreter(argv)
    return torch.device("cpu")


def build_parser() -> argparse.ArgumentParser:
    from . import train

    parser = argparse.ArgumentParser(
        prog="fusedres", description="Triton-fused pre-activation ResNet blocks: self-check, benchmark, training.",
        epilog="Without a command: check, then bench when a CUDA GPU is present.")
    sub = parser.add_subparsers(dest="command", metavar="{check,bench,train,inspect}")
    cp = sub.add_parser("check", help="the fused op and blocks against float64 PyTorch (errors per block and dtype)",
                        description="Run the fused op and blocks against float64 PyTorch on this machine (CUDA, "
                                    "or the Triton interpreter on the CPU) and print their errors next to eager "
                                    "PyTorch's own. Exit status 1 when any row fails.")
    cp.add_argument("--quick", action="store_true",
                    help="one op case and one block of each kind (identity shortcut), every dtype (about a "
                         "third of the time)")
    sub.add_parser("bench", help="fused vs eager vs torch.compile block training steps on the current GPU",
                   description="Time block training steps (bf16, channels_last), fused vs eager vs "
                               "torch.compile, with peak memory. Without a CUDA GPU: says so, exits 0.")
    tp = sub.add_parser("train", help="train preact_resnet(depth) on CIFAR-10 or synthetic data",
                        description=train.__doc__.replace("``", ""),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(tp)
    ip = sub.add_parser("inspect", help="which residual blocks of a torchvision/timm model convert() fuses, why not",
                        description="Build each model without pretrained weights (on the meta device: nothing is "
                                    "downloaded or allocated) and print, per residual block, whether "
                                    "fusedres.convert() fuses it and why not, then a one-line summary.")
    ip.add_argument("models", nargs="+", metavar="SOURCE:NAME",
                    help="torchvision:<classification model> or timm:<model> (torchvision:resnet50, timm:resnet50d)")
    ip.add_argument("--markdown", action="store_true",
                    help="one markdown table row per model (model, blocks fused / total, why not) instead")
    return parser


def build_model(spec: str) -> torch.nn.Module:
    """The model named ``SOURCE:NAME``, randomly initialised (meta device when it builds there)."""
    source, _, name = spec.partition(":")
    if not name or source not in ("torchvision", "timm"):
        raise CLIError(f"expected SOURCE:NAME with SOURCE torchvision or timm (e.g. torchvision:resnet50, "
                       f"timm:resnet50d), got {spec!r}")
    try:
        if source == "torchvision":
            import torchvision

            if name not in torchvision.models.list_models(module=torchvision.models):
                raise CLIError(f"{spec}: not a torchvision classification model")

            def build() -> torch.nn.Module:
                return torchvision.models.get_model(name, weights=None)
        else:
            import timm

            if not timm.is_model(name):
                raise CLIError(f"{spec}: not a timm model")

            def build() -> torch.nn.Module:
                return timm.create_model(name, pretrained=False)
    except ImportError as e:
        raise CLIError(f"{spec}: {source} is not installed ({e})") from None
    try:
        with torch.device("meta"):  # shapes are all inspect() reads
            return build()
    except Exception:  # a model whose construction computes with its tensors: build it for real
        return build()


def _inspect(specs: list[str], markdown: bool) -> int:
    from .convert import inspect

    models = [(spec, build_model(spec)) for spec in specs]  # every name checked before any output
    for spec, model in models:
        report = inspect(model, spec)
        if markdown:
            why = sorted({b.reason for b in report.left})
            print(f"| {spec} | {len(report.fused)} / {len(report.blocks)} | {'; '.join(why) or '-'} |")
        else:
            print(report)
    return 0


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return _inspect(args.models, args.markdown)
    if args.command == "train":
        from . import train

        return train.run(args, argv)
    if args.command == "bench":
        from . import quickbench

        return quickbench.run()
    from . import selfcheck

    status = selfcheck.run(_check_device(argv), quick=getattr(args, "quick", False))
    if args.command is None and torch.cuda.is_available():
        from . import quickbench

        print()
        status = max(status, quickbench.run())
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fusedres`` and ``python -m fusedres``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except CLIError as e:
        sys.stdout.flush()
        print(f"fusedres: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fusedres: interrupted", file=sys.stderr)
        return 130
