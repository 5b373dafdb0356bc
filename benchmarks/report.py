"""Reporting shared by the benchmark scripts: the console, per-rank aggregation, target verdicts."""

from __future__ import annotations

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
