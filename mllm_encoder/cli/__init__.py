"""The ``clip-moe`` command line: one module per group of subcommands.

A failing command prints one line, ``clip-moe COMMAND: error: MESSAGE``, to stderr and exits with status 1
(130 when interrupted); ``--debug`` or ``MLLM_ENCODER_DEBUG=1`` shows the Python traceback instead.
"""

import argparse
import logging
import os
import sys
from typing import List, Optional

from mllm_encoder.cli import dmu, eval_mllm, eval_zero_shot, model
from mllm_encoder.locking import LockError

DEBUG_ENV = "MLLM_ENCODER_DEBUG"
# Errors that describe bad input or a broken environment: their message is the whole story.
USER_ERRORS = (ValueError, OSError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    """Assemble the ``clip-moe`` parser from the subcommand modules."""
    parser = argparse.ArgumentParser(prog="clip-moe", description="CLIP-MoE: build, train, convert and evaluate.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model.register(commands)
    dmu.register(commands)
    evaluation = commands.add_parser("eval", help="evaluate encoders (zero-shot) and MLLMs (MME, POPE)")
    eval_commands = evaluation.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    eval_zero_shot.register(eval_commands)
    eval_mllm.register(eval_commands)
    return parser


def error_line(error: BaseException) -> str:
    """One line describing ``error``: the message of a user error, the type too for anything else."""
    message = " ".join(str(error).split()) or type(error).__name__
    if type(error) is ValueError or isinstance(error, LockError):  # bad input, or another run holds the output
        return message
    if isinstance(error, USER_ERRORS):
        return f"{type(error).__name__}: {message}"
    return f"internal error ({type(error).__name__}: {message}); rerun with --debug and report the traceback"


def _check_device(device: Optional[str]) -> None:
    """Refuse ``--device cuda`` (or ``cuda:N``) on a machine where torch finds no CUDA GPU, before any work."""
    if not device or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch {torch.__version__} finds no CUDA GPU here; use --device cpu")


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``clip-moe`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        _check_device(getattr(args, "device", None))
        args.func(args)
        return
    words = ["clip-moe", args.command, getattr(args, "eval_command", None), getattr(args, "dmu_command", None)]
    command = " ".join(filter(None, words))
    try:
        _check_device(getattr(args, "device", None))
        args.func(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        print(f"{command}: error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None
