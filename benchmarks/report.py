"""Reporting shared by the benchmark scripts: the console, per-rank aggregation, target verdicts."""

from __future__ import annotations

import argparse
import shutil
import statistics

from rich.console import Console

console = Console(width=shutil.get_terminal_size((120, 24)).columns)  # not 80 when piped


def slowest(per_rank: list[list[float]]) -> float:
    """Median over runs of the slowest rank's time."""
    return statistics.median(max(run) for run in zip(*per_rank))


def verdict(line: str, ratio: float, ok: bool, into: dict) -> None:
    """Print PASS/MISS for one target and record it in ``into``."""
    into[line] = {"pass": ok, "ratio": ratio}
    console.print(f"{'[green]PASS' if ok else '[red]MISS'}[/]  {line} ({ratio:.2f}x)")


def parse_args(doc: str, size_mib: float, size_help: str, repeats: int, n_tensors: int) -> tuple[argparse.Namespace, int]:
    """The multi-rank benchmarks' command line (``--size-mib --dir --repeats --json``) and the part
    size in bytes, rounded down to ``n_tensors`` float32 tensors of equal size."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--size-mib", type=float, default=size_mib, help=size_help)
    ap.add_argument("--dir", help="directory for checkpoints (a subdirectory is created and removed)")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--json", help="write all figures to this JSON file")
    args = ap.parse_args()
    return args, int(args.size_mib * (1 << 20)) // (4 * n_tensors) * (4 * n_tensors)
