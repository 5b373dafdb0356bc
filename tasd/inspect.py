"""``tasd inspect ROOT``: what local checkpoints exist under a root and what is recoverable.

Reads only headers (``--verify`` also checks every checksum); never loads hollow state dicts, so it
is safe on untrusted directories. Layout read: ``ROOT/<session>/<rank>/iter_<it>_<owner>_local.tasd``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tasd.managers.config import describe_settings
from tasd.managers.errors import CorruptCheckpointError
from tasd.managers.partio import read_header, verify_part

_PART = re.compile(r"^iter_(\d+)_(\d+)_local\.tasd$")


@dataclass
class PartInfo:
    session: str
    holder: int
    iteration: int
    owner: int
    size: int
    world_size: int | None
    replication: dict | None
    problem: str | None


def scan(root: Path, verify: bool = False) -> list[PartInfo]:
    """Every part file under ``root`` (sessions, then ranks), with its header or the reason it is
    unusable. Not collective; reads headers only unless ``verify``."""
    parts = []
    for path in sorted(Path(root).glob("*/*/iter_*_local.tasd")):
        m = _PART.match(path.name)
        if not m or not path.parent.name.isdigit():
            continue
        info = PartInfo(path.parent.parent.name, int(path.parent.name), int(m.group(1)), int(m.group(2)),
                        path.stat().st_size, None, None, None)
        try:
            header = verify_part(path) if verify else read_header(path)
            info.world_size, info.replication = header.meta.world_size, header.meta.replication
            if (header.meta.iteration, header.meta.owner_rank) != (info.iteration, info.owner):
                info.problem = f"header says iteration {header.meta.iteration} owner {header.meta.owner_rank}"
        except (CorruptCheckpointError, OSError) as e:
            info.problem = str(e).split(" is unusable: ")[-1]
        parts.append(info)
    return parts


def summarize(parts: list[PartInfo]) -> list[dict]:
    """Per (session, iteration): world size, settings, owners held by which ranks, and which
    owners are missing (recoverable when none is)."""
    groups: dict[tuple[str, int], list[PartInfo]] = defaultdict(list)
    for p in parts:
        groups[(p.session, p.iteration)].append(p)
    out = []
    for (session, iteration), ps in sorted(groups.items()):
        good = [p for p in ps if p.problem is None]
        world = max((p.world_size for p in good), default=None)
        holders: dict[int, list[int]] = defaultdict(list)
        for p in good:
            holders[p.owner].append(p.holder)
        missing = sorted(set(range(world)) - set(holders)) if world else []
        out.append({"session": session, "iteration": iteration, "world_size": world,
                    "replication": good[0].replication if good else None, "holders": dict(holders),
                    "missing": missing, "bad": [p for p in ps if p.problem], "recoverable": bool(world) and not missing})
    return out


def run_inspect(root: str, verify: bool = False, console: Console | None = None) -> int:
    """Print the report; 0 when every newest iteration per session is recoverable, 1 otherwise."""
    console = console or Console()
    if not Path(root).is_dir():
        console.print(f"[red]{root} is not a directory[/]")
        return 1
    rows = summarize(scan(Path(root), verify))
    if not rows:
        console.print(f"no tasd checkpoints under {root}")
        return 1
    table = Table(title=f"tasd checkpoints under {root}" + (" (checksums verified)" if verify else " (headers only)"))
    for col in ("session", "iteration", "world", "replication", "parts (owner: held by)", "status"):
        table.add_column(col)
    for r in rows:
        held = "; ".join(f"{o}: {','.join(map(str, sorted(h)))}" for o, h in sorted(r["holders"].items()))
        status = "[green]recoverable[/]" if r["recoverable"] else (
            f"[red]missing rank(s) {r['missing']}[/]" if r["world_size"] else "[red]no usable part[/]")
        if r["bad"]:
            status += "".join(f"\n[yellow]unusable on rank {p.holder}: part of {p.owner}: {p.problem}[/]" for p in r["bad"])
        table.add_row(r["session"] or "''", str(r["iteration"]), str(r["world_size"] or "?"),
                      describe_settings(r["replication"]), held, status)
    console.print(table)
    newest = {}
    for r in rows:
        newest[r["session"]] = r
    return 0 if all(r["recoverable"] for r in newest.values()) else 1
