"""The ``fusedres`` command (``python -m fusedres``): ``check``, ``bench`` and ``train``.

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
    sub = parser.add_subparsers(dest="command", metavar="{check,bench,train}")
    sub.add_parser("check", help="the fused op and blocks against float64 PyTorch (errors per block and dtype)",
                   description="Run the fused op and blocks against float64 PyTorch on this machine (CUDA, or "
                               "the Triton interpreter on the CPU) and print their errors next to eager "
                               "PyTorch's own. Exit status 1 when any row fails.")
    sub.add_parser("bench", help="fused vs eager vs torch.compile block training steps on the current GPU",
                   description="Time block training steps (bf16, channels_last), fused vs eager vs "
                               "torch.compile, with peak memory. Without a CUDA GPU: says so, exits 0.")
    tp = sub.add_parser("train", help="train preact_resnet(depth) on CIFAR-10 or synthetic data",
                        description=train.__doc__.replace("``", ""),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(tp)
    return parser


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from . import train

        return train.run(args, argv)
    if args.command == "bench":
        from . import quickbench

        return quickbench.run()
    from . import selfcheck

    status = selfcheck.run(_check_device(argv))
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
