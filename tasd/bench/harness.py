"""What every ``tasd bench`` scenario uses: the run context and the two ways to measure a point.

* :func:`measure_points`: one ``run_ranks`` call in which each rank times in-process methods
  (:mod:`tasd.bench.methods`) interleaved, after a warm-up round, at one point after the other.
* :func:`load_point`: one setup call that saves with every method whose output is to be loaded,
  then each load timed in fresh rank processes (:mod:`tasd.bench.fresh`), interleaved by repeat,
  the first (warm-up) run of each probed for memory and checked against what was saved.

A peer that fails (NVRx occasionally races its own cleanup thread) does not sink the point: the
point is run again without that peer, whose row then carries the error.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tasd.bench.fresh import LOADS, SAVED_BY, Load, load_rank
from tasd.bench.measure import Figure, evict, figure, rotated
from tasd.bench.methods import METHODS, SESSION, Point, available, methods_rank, setup_rank
from tasd.launch import RankFailure, run_ranks

logger = logging.getLogger(__name__)

#: Limits for every run_ranks call of the benchmarks (seconds).
RUN = {"timeout_s": 1800.0, "collective_timeout_s": 300.0}


@dataclass
class Context:
    """What a scenario needs from the runner: where to write (``work``: removed by the runner),
    which optional peers and devices exist, and ``step(text)`` to report progress."""

    work: Path
    nvrx: bool
    cuda: bool
    step: Callable[[str], None] = lambda text: None

    def scratch(self, name: str) -> Path:
        """A new empty directory under ``work`` for one point."""
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))


@dataclass
class ExtraTable:
    """A table of what a scenario measured besides times (bytes, operation counts), shown after
    its main table and kept in the JSON (``tables``) and the Markdown: ``rows`` of plain values
    (ints, floats, strings), one per row, in the order of ``columns``."""

    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)


@dataclass
class ScenarioResult:
    """A scenario's figures, the parameter its plot puts on the x axis (None: a bar chart of one
    point), notes for the reader and extra tables."""

    figures: list[Figure]
    x: str | None = None
    notes: list[str] = field(default_factory=list)
    tables: list[ExtraTable] = field(default_factory=list)


def _short(failure: BaseException) -> str:
    lines = [ln for ln in str(failure).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(failure).__name__


def describe(point: Point) -> str:
    return (f"{point.world} ranks, {point.nbytes / (1 << 20):.0f} MiB per rank in {point.n_tensors:,} tensors, "
            f"clique factor {point.factor}")


def measure_points(ctx: Context, scenario: str, points: list[Point], names: list[str], repeats: int) -> list[Figure]:
    """Time in-process ``names`` at each of ``points`` (one world size), the points one after the
    other in the same rank processes (see the module docstring); one Figure per name and point."""
    if len({p.world for p in points}) != 1:
        raise ValueError(f"{scenario}: points of one run need one world size, got {[p.world for p in points]}")
    world = points[0].world
    plan = [available(names, p, ctx.nvrx, ctx.cuda) for p in points]
    failed: dict[str, str] = {}
    ctx.step(f"{scenario}: " + "; ".join(describe(p) for p in points))
    while True:
        root = ctx.scratch(scenario)
        try:
            per_rank = run_ranks(methods_rank, world, points, str(root),
                                 [[n for n in runnable if n not in failed] for runnable, _ in plan], repeats, **RUN)
            break
        except RankFailure as e:
            peers = [n for n in names if "nvrx" in METHODS[n].needs and n not in failed]
            if not peers:
                raise
            logger.warning("%s failed with NVRx in the run; again without it: %s", scenario, _short(e))
            failed.update({n: f"failed: {_short(e)}" for n in peers})
        finally:
            shutil.rmtree(root, ignore_errors=True)
    figures = []
    for i, (point, (runnable, skipped)) in enumerate(zip(points, plan)):
        for n in names:
            label, kind = METHODS[n].label, METHODS[n].kind
            why = skipped.get(n) or failed.get(n)
            if why:
                figures.append(Figure(scenario, n, label, kind, point.params(), nbytes=point.nbytes, error=why))
            else:
                figures.append(figure(scenario, n, label, kind, point.params(), point.nbytes,
                                      [r[i][n] for r in per_rank]))
    return figures


def _lose(root: Path, lost: int) -> None:
    """Remove every directory of rank ``lost`` under ``root`` (its node is gone)."""
    for method in ("tasd", "nvrx"):
        shutil.rmtree(root / method / SESSION / str(lost), ignore_errors=True)
    for d in root.glob(f"*/{lost}"):
        shutil.rmtree(d, ignore_errors=True)


def load_point(ctx: Context, scenario: str, point: Point, loads: list[str], repeats: int,
               lost: int | None = None, right_after_save: bool = False) -> list[Figure]:
    """Save with what ``loads`` need, then time each load in fresh processes (see the module
    docstring), the loads of each repeat in a rotated order. ``lost``: remove that rank's
    directories before every load (recovery). ``right_after_save``: save anew before every load
    and leave the page cache as the save left it (a restart right after a save); otherwise the
    files are evicted from the page cache before every load."""
    saves, why_not = available(list(dict.fromkeys(SAVED_BY[n] for n in loads)), point, ctx.nvrx, ctx.cuda)
    runnable = [n for n in loads if SAVED_BY[n] in saves]
    errors = {n: why_not[SAVED_BY[n]] for n in loads if n not in runnable}
    root = ctx.scratch(scenario)
    try:
        ctx.step(f"{scenario}: saving for the loads, {describe(point)}")
        run_ranks(setup_rank, point.world, point, str(root), saves, **RUN)
        results: dict[str, list[list[dict]]] = {n: [] for n in runnable}
        for i in range(repeats + 1):
            for name in rotated(list(results), i):
                ctx.step(f"{scenario}: {name} in fresh processes, run {i + 1} of {repeats + 1}, {describe(point)}")
                if right_after_save:
                    run_ranks(setup_rank, point.world, point, str(root), [SAVED_BY[name]], i + 2, **RUN)
                if lost is not None:
                    _lose(root, lost)
                if not right_after_save:
                    evict(root)
                try:
                    results[name].append(run_ranks(load_rank, point.world, Load(name, point, str(root), lost),
                                                   i == 0, **RUN))
                except RankFailure as e:
                    if not name.startswith("nvrx"):
                        raise
                    logger.warning("%s: %s failed: %s", scenario, name, _short(e))
                    errors[name] = f"failed: {_short(e)}"
                    del results[name]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures = []
    for name, runs in results.items():
        per_rank = [{"times_s": [run[r]["time_s"] for run in runs[1:]], **{k: v for k, v in runs[0][r].items()
                                                                            if k != "time_s"}}
                    for r in range(point.world)]
        label, kind, _ = LOADS[name]
        figures.append(figure(scenario, name, label, kind, point.params() | {"lost": lost}, point.nbytes, per_rank))
    for name, why in errors.items():
        label, kind, _ = LOADS[name]
        figures.append(Figure(scenario, name, label, kind, point.params() | {"lost": lost}, nbytes=point.nbytes,
                              error=why))
    return figures


def fresh_resumes(ctx: Context, scenario: str, names: list[str], saved: list[str], infos: dict, saved_by: dict,
                  repeats: int, root: str, params: dict, start: Callable[[str, bool], list[dict]],
                  where: str = "") -> list[Figure]:
    """One figure per resume method of ``names`` (``infos[name]`` has ``label`` and ``kind``), each
    timed in fresh processes: ``start(name, first)`` runs the ranks once and returns each rank's
    dict with ``time_s`` (and, on the ``first`` run, what else its figure keeps). One warm-up, then
    ``repeats`` runs, the methods in rotated order, the page cache of ``root`` evicted before each.
    A method whose save (``saved_by[name]``) is not among ``saved`` gets a figure naming it."""
    runnable = [n for n in names if saved_by[n] in saved]
    results: dict[str, list[list[dict]]] = {n: [] for n in runnable}
    for i in range(repeats + 1):
        for name in rotated(runnable, i):
            ctx.step(f"{scenario}{where}: {name} in fresh processes, run {i + 1} of {repeats + 1}")
            evict(Path(root))
            results[name].append(start(name, i == 0))
    figures = []
    for name in names:
        info = infos[name]
        if name not in results:
            figures.append(Figure(scenario, name, info.label, info.kind, dict(params), nbytes=params["nbytes"],
                                  error=f"needs {saved_by[name]} among the methods"))
            continue
        runs = results[name]
        per_rank = [{"times_s": [run[r]["time_s"] for run in runs[1:]],
                     **{k: v for k, v in runs[0][r].items() if k != "time_s"}} for r in range(len(runs[0]))]
        figures.append(figure(scenario, name, info.label, info.kind, params, params["nbytes"], per_rank))
    return figures
