"""``tasd bench``: run named scenarios, show progress and tables, write JSON, plots and Markdown.

:func:`run_bench` composes the scenarios of :mod:`tasd.bench.scenarios` (each with its own config;
``quick`` picks their small versions), in a fresh work directory that is removed at the end. A
scenario that fails is reported (its error in the table and the JSON) and the run goes on; the
exit code is then 1.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import tasd
from tasd.bench import nvrx_shim
from tasd.bench.harness import Context, ScenarioResult
from tasd.bench.measure import Figure
from tasd.bench.scenarios import SCENARIOS
from tasd.bench.targets import judge

logger = logging.getLogger(__name__)

NOTES = (
    "Times are the slowest rank's, median [min-max] over the repeats after one warm-up; GB/s are "
    "decimal, of the state's tensor bytes per rank.",
    "Memory: PSS of a rank and its worker processes, added by the method's warm-up call (peak while "
    "it ran, steady once it completed; persistent workers are started before, their own memory not "
    "counted); disk: bytes the rank and its workers sent to storage in that call.",
    "Restart and recovery loads run in fresh processes after the files were evicted from the page "
    "cache (posix_fadvise, best effort: tmpfs keeps its pages); restart_warm's without eviction.",
)


def unknown_scenarios(names: Sequence[str]) -> list[str]:
    """The names in ``names`` that are not scenarios."""
    return [n for n in names if n not in SCENARIOS]


def _mounted_fs(path: Path) -> str:
    best, fs = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype, opts = line.split()[:4]
                if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
                    best, fs = mnt, f"{fstype} on {mnt} ({dev}, {opts})"
    except OSError:
        pass
    return fs


def machine(work: Path) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import psutil
        mem = psutil.virtual_memory().total
    except ModuleNotFoundError:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_bytes": mem, "filesystem": _mounted_fs(work),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch.__version__, "tasd": tasd.__version__,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "nvrx": nvrx_shim.nvrx_version() or "not installed"}


def _fmt_s(f: Figure) -> str:
    return f"{f.median_s:.3f}" if f.median_s is not None else "-"


def _fmt_range(f: Figure) -> str:
    return f"{f.min_s:.3f}-{f.max_s:.3f}" if f.times_s else "-"


def _fmt_mib(n: int | None) -> str:
    return f"{n / (1 << 20):.0f}" if n is not None else "-"


def _point(f: Figure) -> str:
    if "lost_ranks" in f.params:  # the scale simulation
        p = f.params
        return f"W{p['world']:,} F{p['factor']} {p['strategy']}, {p['lost_ranks']:,} lost"
    p = f.params
    if "tp" in p:  # the megatron scenario: a GPT's parallelism and size
        return (f"W{p['world']} TP{p['tp']} DP{p['dp']} F{p['factor']} GPT L{p['layers']} h{p['hidden']} "
                f"{p['nbytes'] / (1 << 20):.0f}MiB x{p['n_tensors']:,}")
    lost = f", rank {p['lost']} lost" if p.get("lost") is not None else ""
    return f"W{p['world']} F{p['factor']} {p['nbytes'] / (1 << 20):.0f}MiB x{p['n_tensors']:,}{lost}"


def _ratios(f: Figure) -> str:
    if f.error:
        return f.error
    return "  ".join(f"{r:.2f}x {m}" for m, r in f.ratios.items())


COLUMNS = ("point", "method", "median s", "range s", "GB/s", "tasd vs others", "peak MiB", "steady MiB", "disk MiB")


def rows(figures: list[Figure]) -> list[tuple[str, ...]]:
    """One table row per figure (the cells of :data:`COLUMNS`)."""
    return [(_point(f), f.method, _fmt_s(f), _fmt_range(f), f"{f.gb_s:.2f}" if f.gb_s else "-", _ratios(f),
             _fmt_mib(f.mem_peak_bytes), _fmt_mib(f.mem_steady_bytes), _fmt_mib(f.disk_write_bytes))
            for f in figures]


def table(name: str, figures: list[Figure]) -> Table:
    t = Table(title=f"{name}: {SCENARIOS[name].summary}", title_justify="left")
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("point", "method", "tasd vs others") else "right",
                     overflow="fold")
    for f, row in zip(figures, rows(figures)):
        t.add_row(*row, style="bold" if f.kind == "tasd" else ("dim" if f.kind == "limit" else None))
    return t


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.2f}"
    return str(v)


def extra_table(t: dict) -> Table:
    """A scenario's extra table (:class:`tasd.bench.harness.ExtraTable` as a dict) as a rich Table."""
    out = Table(title=t["title"], title_justify="left")
    for i, c in enumerate(t["columns"]):
        out.add_column(c, justify="right" if i else "left", overflow="fold")
    for row in t["rows"]:
        out.add_row(*(_cell(v) for v in row))
    return out


def targets_table(verdicts: list[dict]) -> Table:
    t = Table(title="targets (ratios of figures from this run)", title_justify="left")
    for c in ("target", "ratio", "verdict"):
        t.add_column(c, justify="right" if c == "ratio" else "left")
    for v in verdicts:
        verdict = "[green]met" if v["met"] else ("[red]missed" if v["met"] is False else f"n/a: {v['why']}")
        t.add_row(v["target"], f"{v['ratio']:.2f}x" if v["ratio"] is not None else "-", verdict)
    return t


def markdown(report: dict) -> str:
    """The report's machine, tables and targets as Markdown (what docs/performance.md shows)."""
    m = report["machine"]
    out = [f"Measured {report['created']} with `tasd bench{' --quick' if report['quick'] else ''}` on: "
           f"{m['cpu']}, {m['cpu_count']} CPUs, {m['memory_bytes'] / (1 << 30):.0f} GiB, {m['filesystem']}; "
           f"{m['os']}; torch {m['torch']}; CUDA device: {m['cuda_device'] or 'none'}; "
           f"nvidia-resiliency-ext: {m['nvrx']}.", ""]
    for name, sc in report["scenarios"].items():
        out += [f"### {name}: {SCENARIOS[name].summary}", ""]
        if sc.get("error"):
            out += [f"Failed: `{sc['error']}`", ""]
            continue
        out += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        figures = [Figure(**{k: v for k, v in f.items() if k in Figure.__dataclass_fields__}) for f in sc["figures"]]
        for f, row in zip(figures, rows(figures)):
            cells = [f"**{c}**" if f.kind == "tasd" and i in (1, 2) else c for i, c in enumerate(row)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        for t in sc.get("tables", []):
            out += [f"#### {t['title']}", "", "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
            out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in t["rows"]]
            out.append("")
    out += ["### Targets", "", "| target | ratio | verdict |", "|---|---|---|"]
    for v in report["targets"]:
        verdict = "met" if v["met"] else ("**missed**" if v["met"] is False else f"n/a: {v['why']}")
        ratio = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x"
        out.append(f"| {v['target']} | {ratio} | {verdict} |")
    return "\n".join(out) + "\n"


def _configs(names: Sequence[str], quick: bool, repeats: int | None) -> dict[str, Any]:
    out = {}
    for name in names:
        cfg_cls = SCENARIOS[name].config
        cfg = cfg_cls.quick() if quick else cfg_cls()
        if repeats is not None:
            cfg.repeats = repeats
        out[name] = cfg
    return out


def run_bench(names: Sequence[str] | None = None, *, quick: bool = False, json_path: str | None = None,
              plots_dir: str | None = None, markdown_path: str | None = None, directory: str | None = None,
              repeats: int | None = None, console: Console | None = None) -> int:
    """Run the scenarios ``names`` (default: all, in order) and report; returns the exit code (0,
    or 1 when a scenario failed). Raises ValueError for an unknown scenario name or ``repeats`` < 1.
    ``directory``: where the checkpoints go (a new subdirectory, removed at the end; default the
    system's temporary directory). Not collective: it starts the rank processes itself."""
    names = list(dict.fromkeys(names or SCENARIOS))
    unknown = unknown_scenarios(names)
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    console = console or Console(width=max(shutil.get_terminal_size((160, 24)).columns, 160))
    configs = _configs(names, quick, repeats)
    work = Path(tempfile.mkdtemp(prefix="tasd-bench-", dir=directory))
    version = nvrx_shim.nvrx_version()
    report: dict[str, Any] = {"created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                              "quick": quick, "scenario_names": names,
                              "machine": machine(work), "notes": list(NOTES), "scenarios": {}}
    report["notes"].append(nvrx_shim.SHIM_NOTE if version else
                           f"{nvrx_shim.DISTRIBUTION} not installed: its rows say so")
    results: dict[str, list[Figure]] = {}
    failed = False
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("starting", total=None)
            ctx = Context(work, nvrx=version is not None, cuda=torch.cuda.is_available(),
                          step=lambda text: progress.update(task, description=text))
            for i, name in enumerate(names, 1):
                progress.update(task, description=f"[{i}/{len(names)}] {name}")
                t0 = time.monotonic()
                entry: dict[str, Any] = {"config": _as_dict(configs[name])}
                try:
                    res: ScenarioResult = SCENARIOS[name].run(configs[name], ctx)
                except Exception as e:  # report and go on with the other scenarios
                    failed = True
                    logger.error("scenario %s failed:\n%s", name, traceback.format_exc())
                    entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                    progress.console.print(f"{name} failed: {escape(entry['error'])}", style="red")
                else:
                    results[name] = res.figures
                    entry.update(x=res.x, notes=res.notes, figures=[f.to_json() for f in res.figures],
                                 tables=[dataclasses.asdict(t) for t in res.tables])
                    progress.console.print(table(name, res.figures))
                    for extra in entry["tables"]:
                        progress.console.print(extra_table(extra))
                    for note in res.notes:
                        progress.console.print(escape(note), style="dim")
                    if plots_dir:
                        path = _plot(name, res, Path(plots_dir), report["machine"])
                        entry["plot"] = str(path) if path else None
                entry["elapsed_s"] = time.monotonic() - t0
                report["scenarios"][name] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["targets"] = judge(results)
    if report["targets"]:
        console.print(targets_table(report["targets"]))
    for note in report["notes"]:
        console.print(escape(note), style="dim")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str))
    if markdown_path:
        Path(markdown_path).write_text(markdown(report))
    return 1 if failed else 0


def _plot(name: str, res: ScenarioResult, directory: Path, m: dict) -> Path | None:
    from tasd.bench.plots import plot_scenario

    where = f"{m['cpu_count']} CPUs, {m['filesystem'].split(' (')[0]}" + (f", {m['cuda_device']}" if m["cuda_device"] else "")
    return plot_scenario(name, res.figures, res.x, directory, f"tasd bench {name}: {SCENARIOS[name].summary} ({where})")


def _as_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
