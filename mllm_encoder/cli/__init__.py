"""The ``clip-moe`` command line: one module per group of subcommands."""

import argparse
import logging
from typing import List, Optional

from mllm_encoder.cli import dmu, eval_mllm, eval_zero_shot, model


def build_parser() -> argparse.ArgumentParser:
    """Assemble the ``clip-moe`` parser from the subcommand modules."""
    parser = argparse.ArgumentParser(prog="clip-moe", description="CLIP-MoE: build, train, convert and evaluate.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model.register(commands)
    dmu.register(commands)
    evaluation = commands.add_parser("eval", help="evaluate encoders (zero-shot) and MLLMs (MME, POPE)")
    eval_commands = evaluation.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    eval_zero_shot.register(eval_commands)
    eval_mllm.register(eval_commands)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``clip-moe`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    args.func(args)
