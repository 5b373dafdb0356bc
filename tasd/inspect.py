"""``tasd inspect ROOT``: what local checkpoints exist under a root and what is recoverable.

Reads only headers (``--verify`` also checks every checksum); never loads hollow state dicts, so it
is safe on untrusted directories: anything named like a part that is not a usable regular file (a
FIFO, a symbolic link, a damaged file) is listed as a problem, never waited on or followed. Layout
read: ``ROOT/<session>/<rank>/iter_<it>_<owner>_local.tasd`` (names: :mod:`tasd.managers.partnames`).
A checkpoint is one save: parts of one (session, iteration) with different save ids are different
checkpoints, each recoverable only from its own parts.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasd.managers.config import describe_settings
from tasd.managers.errors import CorruptCheckpointError
from tasd.managers.partio import read_header, verify_part
from tasd.managers.partnames import parse_part_name

#: Missing ranks listed by name per checkpoint (the rest are counted).
SHOW_MISSING = 16


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
    save_id: str | None = None


def _rank_dir(name: str) -> int | None:
    return int(name) if name.isascii() and name.isdigit() and len(name) <= 9 else None


def scan(root: Path, verify: bool = False) -> list[PartInfo]:
    """Every file named like a published part under ``root`` (sessions, then ranks), with its
    header or the reason it is unusable. Not collective; reads headers only unless ``verify``."""
    parts = []
    for path in sorted(Path(root).glob("*/*/iter_*_local.tasd")):
        name, holder = parse_part_name(path.name), _rank_dir(path.parent.name)
        if name is None or not name.published or holder is None:
            continue
        try:
            size = os.lstat(path).st_size
        except OSError:
            continue  # vanished since the listing
        info = PartInfo(path.parent.parent.name, holder, name.iteration, name.owner, size, None, None, None)
        try:
            header = verify_part(path) if verify else read_header(path)
            meta = header.meta
            info.world_size, info.replication, info.save_id = meta.world_size, meta.replication, meta.save_id
            if (meta.iteration, meta.owner_rank) != (info.iteration, info.owner):
                info.problem = f"header says iteration {meta.iteration} owner {meta.owner_rank}"
        except (CorruptCheckpointError, OSError) as e:
            info.problem = str(e).split(" is unusable: ")[-1]
        parts.append(info)
    return parts


def summarize(parts: list[PartInfo]) -> list[dict]:
    """One row per checkpoint, i.e. per (session, iteration, save id): world size, settings,
    owners held by which ranks, the missing owners (recoverable when none is) and the unusable
    files of that (session, iteration) (on its first row; a row of save id None when no part of
    that iteration is usable)."""
    groups: dict[tuple[str, int], list[PartInfo]] = defaultdict(list)
    for p in parts:
        groups[(p.session, p.iteration)].append(p)
    out = []
    for (session, iteration), ps in sorted(groups.items()):
        bad = [p for p in ps if p.problem]
        saves: dict[str, list[PartInfo]] = defaultdict(list)
        for p in ps:
            if p.problem is None:
                saves[p.save_id or ""].append(p)
        for k, save_id in enumerate(sorted(saves) or [None]):
            good = saves.get(save_id, []) if save_id is not None else []
            world = max((p.world_size for p in good), default=None)
            holders: dict[int, list[int]] = defaultdict(list)
            for p in good:
                holders[p.owner].append(p.holder)
            missing, n_missing = [], 0
            if world:
                n_missing = world - len(holders)
                r = 0
                while len(missing) < min(n_missing, SHOW_MISSING):  # at most len(holders) + SHOW_MISSING steps
                    if r not in holders:
                        missing.append(r)
                    r += 1
            out.append({"session": session, "iteration": iteration, "save_id": save_id, "world_size": world,
                        "replication": good[0].replication if good else None, "holders": dict(holders),
                        "missing": missing, "n_missing": n_missing, "bad": bad if k == 0 else [],
                        "recoverable": bool(world) and n_missing == 0})
    return out


def run_inspect(root: str, verify: bool = False, console: Console | None = None) -> int:
    """Print the report; 0 when the newest iteration of every session has a recoverable
    checkpoint, 1 otherwise."""
    console = console or Console()
    if not Path(root).is_dir():
        console.print(f"[red]{escape(str(root))} is not a directory[/]")
        return 1
    rows = summarize(scan(Path(root), verify))
    if not rows:
        console.print(f"no tasd checkpoints under {escape(str(root))}")
        return 1
    table = Table(title=f"tasd checkpoints under {escape(str(root))}"
                  + (" (checksums verified)" if verify else " (headers only)"))
    for col in ("session", "iteration", "save", "world", "replication", "parts (owner: held by)", "status"):
        table.add_column(col)
    for r in rows:
        held = "; ".join(f"{o}: {','.join(map(str, sorted(h)))}" for o, h in sorted(r["holders"].items()))
        more = f" and {r['n_missing'] - len(r['missing'])} more" if r["n_missing"] > len(r["missing"]) else ""
        status = "[green]recoverable[/]" if r["recoverable"] else (
            f"[red]missing rank(s) {r['missing']}{more}[/]" if r["world_size"] else "[red]no usable part[/]")
        if r["bad"]:
            status += "".join(f"\n[yellow]unusable on rank {p.holder}: part of {p.owner}: {escape(p.problem)}[/]"
                              for p in r["bad"])
        table.add_row(escape(r["session"]) or "''", str(r["iteration"]),
                      escape(r["save_id"]) if r["save_id"] is not None else "?", str(r["world_size"] or "?"),
                      escape(describe_settings(r["replication"])), held, status)
    console.print(table)
    newest: dict[str, tuple[int, bool]] = {}
    for r in rows:
        it, ok = newest.get(r["session"], (-1, False))
        newest[r["session"]] = (r["iteration"], (ok and it == r["iteration"]) or r["recoverable"])
    return 0 if all(ok for _, ok in newest.values()) else 1
