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
        description="Train a tiny DDP model on N gloo ranks (processes) on CPU, save local checkpoints "
                    "(asynchronously by default: training stalls only while tensors are staged), "
                    "restart in fresh processes, load, and check model, optimizer and resumed training "
                    "bitwise against the original run. With --backend megatron: a megatron-core GPT with "
                    "tensor parallelism (--tp) and the distributed optimizer, Megatron-LM's local-checkpoint "
                    "flags, saves and two-step loads through tasd.adapters.megatron, and async saves on "
                    "megatron-core's own AsyncCallsQueue (needs the megatron extra). With --backend fsdp: an FSDP2 "
                    "model (fully_shard on a CPU device mesh) saved and restored with tasd.adapters.fsdp's "
                    "FSDPCheckpointer, LR scheduler and data position included.")
    p.add_argument("--backend", choices=("basic", "megatron", "fsdp"), default="basic",
                   help="basic: a torch model in a BasicTensorAwareStateDict (default); megatron: a megatron-core "
                        "GPT through the Megatron-LM adapter; fsdp: an FSDP2 model through tasd.adapters.fsdp")
    p.add_argument("--ranks", type=_positive_int, default=4, help="number of ranks (default: 4)")
    p.add_argument("--tp", type=_positive_int, default=None,
                   help="megatron: tensor-parallel size, dividing --ranks (default: 2 for an even number of "
                        "ranks, else 1); data parallel over the rest")
    p.add_argument("--algo", choices=("fully_parallel", "atomic"), default=None,
                   help="megatron: --non-persistent-local-ckpt-algo (default: fully_parallel)")
    p.add_argument("--steps", type=_positive_int, default=12, help="training steps to checkpoint (default: 12)")
    p.add_argument("--save-every", type=_positive_int, default=4, help="steps between checkpoints (default: 4)")
    p.add_argument("--dir", default=None, help="checkpoint root (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints after a successful run")
    p.add_argument("--replication", choices=("ring", "clique", "none"), default=None,
                   help="replication strategy (default: ring; clique, as in Megatron-LM, with --backend megatron)")
    p.add_argument("--replication-factor", type=_positive_int, default=2, help="copies of each part (default: 2)")
    p.add_argument("--replication-jump", type=_positive_int, default=1, help="rank distance between copies (default: 1)")
    p.add_argument("--lose-rank", type=int, default=None,
                   help="rank whose node is lost before the restart (default: the last rank, with replication)")
    p.add_argument("--no-node-loss", action="store_true", help="restart without losing a node")
    p.add_argument("--save-mode", choices=("async-persistent", "async-temporal", "sync"), default="async-persistent",
                   help="async saves on a persistent worker (default) or a process forked per save, or "
                        "synchronous saves (megatron: async-persistent or sync, as Megatron-LM requires the "
                        "persistent worker for --async-save)")
    p.set_defaults(handler=_run_demo, parser=p)


def _run_demo(args: argparse.Namespace) -> int:
    if args.steps < args.save_every:
        args.parser.error(f"--steps ({args.steps}) must be at least --save-every ({args.save_every})")
    lose_rank = None if args.no_node_loss else (-1 if args.lose_rank is None else args.lose_rank)
    if args.backend == "megatron":
        return _run_megatron_demo(args, lose_rank)
    for flag, value in (("--tp", args.tp), ("--algo", args.algo)):
        if value is not None:
            args.parser.error(f"{flag} applies to --backend megatron only")
    if args.backend == "fsdp":
        return _run_fsdp_demo(args, lose_rank)
    from tasd.demo import run_demo
    from tasd.managers import ReplicationConfig

    strategy = args.replication or "ring"
    replication = None
    if strategy != "none" and args.ranks > 1:
        replication = ReplicationConfig(strategy=strategy, replication_factor=args.replication_factor,
                                        replication_jump=args.replication_jump)
    return run_demo(ranks=args.ranks, steps=args.steps, save_every=args.save_every, directory=args.dir,
                    keep=args.keep, replication=replication, lose_rank=lose_rank, save_mode=args.save_mode)


def _run_fsdp_demo(args: argparse.Namespace, lose_rank: int | None) -> int:
    from tasd.fsdp_demo import run_fsdp_demo

    strategy = args.replication or "ring"
    replication = None
    if strategy != "none" and args.ranks > 1:
        replication = {"strategy": strategy, "replication_factor": args.replication_factor,
                       "replication_jump": args.replication_jump}
    return run_fsdp_demo(ranks=args.ranks, steps=args.steps, save_every=args.save_every, directory=args.dir,
                         keep=args.keep, replication=replication, lose_rank=lose_rank,
                         save_mode=args.save_mode).exit_code


def _run_megatron_demo(args: argparse.Namespace, lose_rank: int | None) -> int:
    from tasd.megatron_demo import run_megatron_demo

    strategy = args.replication or "clique"
    tp = args.tp if args.tp is not None else (2 if args.ranks % 2 == 0 else 1)
    return run_megatron_demo(ranks=args.ranks, tp=tp, steps=args.steps, save_every=args.save_every,
                             directory=args.dir, keep=args.keep,
                             replication=None if strategy == "none" or args.ranks == 1 else strategy,
                             replication_factor=args.replication_factor, replication_jump=args.replication_jump,
                             lose_rank=lose_rank, save_mode=args.save_mode,
                             algo=args.algo or "fully_parallel").exit_code


# -- tasd inspect -------------------------------------------------------------------------------
def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="show the local checkpoints under a root and what is recoverable",
        description="List every part under ROOT/<session>/<rank>/ by session and iteration: which rank holds "
                    "which owner's part, the replication settings, and whether every owner's part exists "
                    "somewhere (recoverable). Reads headers only; --verify also checks every checksum. "
                    "Exit code 0 when the newest iteration of every session is recoverable.")
    p.add_argument("root", help="the root_local_ckpt_dir given to LocalCheckpointManager")
    p.add_argument("--verify", action="store_true", help="read whole parts and check their checksums")
    p.set_defaults(handler=lambda args: __import__("tasd.inspect", fromlist=["run_inspect"]).run_inspect(
        args.root, verify=args.verify))


# -- tasd bench ---------------------------------------------------------------------------------
def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from tasd.bench.scenarios import SCENARIOS

    listing = "; ".join(f"{name}: {s.summary}" for name, s in SCENARIOS.items())
    p = subparsers.add_parser(
        "bench", help="measure tasd against the machine's limits and its peers",
        description="Run benchmark scenarios on ranks started as local processes (gloo), each measuring "
                    "tasd, the machine's limits and the peers (torch.save/load, torch.distributed.checkpoint, "
                    "nvidia-resiliency-ext when installed) on the same state and directory. Prints tables "
                    "while it runs and the issue's targets as ratios at the end. Scenarios: " + listing)
    p.add_argument("--scenario", nargs="+", action="extend", metavar="NAME", default=None,
                   help="scenarios to run, in the order given (default: all)")
    p.add_argument("--quick", action="store_true", help="the small version of each scenario (all in < 2 minutes)")
    p.add_argument("--json", metavar="F", default=None, help="write every figure to this JSON file")
    p.add_argument("--plots", metavar="DIR", default=None, help="draw one PNG per scenario into this directory")
    p.add_argument("--markdown", metavar="F", default=None, help="write the tables and targets as Markdown")
    p.add_argument("--dir", default=None, help="where checkpoints are written (a new subdirectory, removed at "
                                               "the end; default: the system's temporary directory)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed runs per figure after the warm-up (default: each scenario's own)")
    p.set_defaults(handler=_run_bench, parser=p)


def _run_bench(args: argparse.Namespace) -> int:
    from tasd.bench import run_bench, unknown_scenarios
    from tasd.bench.scenarios import SCENARIOS

    unknown = unknown_scenarios(args.scenario or [])
    if unknown:
        args.parser.error(f"unknown scenario(s): {', '.join(unknown)} (known: {', '.join(SCENARIOS)})")
    return run_bench(args.scenario, quick=args.quick, json_path=args.json, plots_dir=args.plots,
                     markdown_path=args.markdown, directory=args.dir, repeats=args.repeats)


_SUBCOMMANDS = (_add_demo, _add_inspect, _add_bench)


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
