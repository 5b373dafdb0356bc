"""The ``tasd`` command line: one subcommand per function, each with its options beside it.

Add a subcommand by writing an ``_add_<name>(subparsers)`` function that registers its parser and
sets ``handler`` (a function of the parsed args returning an exit code), and listing it in
``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
from typing import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


# -- tasd demo ----------------------------------------------------------------------------------
def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="save, crash, restart and resume a small multi-rank CPU job",
        description="Train a tiny DDP model on N gloo ranks (processes) on CPU, save local checkpoints, "
                    "restart in fresh processes, load, and check model, optimizer and resumed training "
                    "bitwise against the original run.")
    p.add_argument("--ranks", type=_positive_int, default=4, help="number of ranks (default: 4)")
    p.add_argument("--steps", type=_positive_int, default=12, help="training steps to checkpoint (default: 12)")
    p.add_argument("--save-every", type=_positive_int, default=4, help="steps between checkpoints (default: 4)")
    p.add_argument("--dir", default=None, help="checkpoint root (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints after a successful run")
    p.set_defaults(handler=_run_demo, parser=p)


def _run_demo(args: argparse.Namespace) -> int:
    from tasd.demo import run_demo

    if args.steps < args.save_every:
        args.parser.error(f"--steps ({args.steps}) must be at least --save-every ({args.save_every})")
    return run_demo(ranks=args.ranks, steps=args.steps, save_every=args.save_every,
                    directory=args.dir, keep=args.keep)


_SUBCOMMANDS = (_add_demo,)


def build_parser() -> argparse.ArgumentParser:
    from tasd import __version__

    parser = argparse.ArgumentParser(prog="tasd", description="tasd: fast local checkpointing for PyTorch training")
    parser.add_argument("--version", action="version", version=f"tasd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.handler(args)
