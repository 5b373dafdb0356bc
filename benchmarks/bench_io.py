"""Checkpoint I/O benchmark: tasd save/load against torch.save/torch.load and raw os.write/os.read.

One process, the same data (``--size-gib`` GiB as 64 equal float32 tensors) and the same directory
(a fresh temporary directory, or a new subdirectory of ``--dir``; removed at the end). A single-rank
gloo process group makes the manager run its real collective path. Each figure is repeated
``--repeats`` times (median and min):

* tasd save: ``LocalCheckpointManager.save`` (staging copy + write + checksums + fsync + cleanup of
  the previous iteration); the first save (which allocates the staging buffer) is reported apart.
* tasd restart: find_latest + load on a fresh manager, what a restarted job pays (find_latest reads
  and verifies the part whole, load hands out what it read); and load on the manager that saved
  (reads and verifies the file again).
* torch.save + fsync, torch.load(weights_only=True).
* raw write: one contiguous buffer, 64 MiB os.write calls + fsync (buffered; O_DIRECT as extra info),
  raw read: os.readv in 64 MiB chunks into a fresh numpy buffer; as extra information also into a
  buffer whose pages are already faulted in (the disk alone, no memory allocation).

Every load and read runs in a fresh process, as after a restart: within one process, a loop of
loads gets memory back from the previous iteration already faulted in (glibc heap reuse), which a
restarted job never has, and faulting in fresh pages costs ~0.3 s/GiB on small VMs.

Before every load/read the file is fsynced and evicted with POSIX_FADV_DONTNEED (best effort; it
does nothing on tmpfs such as /dev/shm). GB/s are decimal (1e9 bytes/s) of tensor bytes.

Run:  .venv/bin/python benchmarks/bench_io.py [--size-gib 1] [--dir DIR] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

import tasd
from tasd import device
from tasd.managers import LocalCheckpointManager

CHUNK = 64 << 20
N_TENSORS = 64
console = Console()


def make_tensors(size_gib: float) -> list[torch.Tensor]:
    numel = int(size_gib * (1 << 30)) // N_TENSORS // 4 // 1024 * 1024  # 4096-byte multiples
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(numel, generator=gen) for _ in range(N_TENSORS)]


def fsync(path: Path, evict: bool = False) -> None:
    """fsync ``path``; with ``evict`` also drop it from the page cache (best effort)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if evict:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn, repeats: int, before=None) -> list[float]:
    """Run ``before()`` (untimed) then ``fn()`` (timed), ``repeats`` times. What ``fn`` returns is
    freed after the clock stops, so that no figure includes unmapping a loaded buffer."""
    out = []
    for _ in range(repeats):
        if before:
            before()
        t0 = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t0)
        del result
    return out


def _time_in_child(fn, args, conn) -> None:
    t0 = time.perf_counter()
    result = fn(*args)
    conn.send(time.perf_counter() - t0)
    del result


def timed_fresh(fn, args: tuple, repeats: int, before=None) -> list[float]:
    """Like :func:`timed`, each run in a new process (spawned: torch imported before the clock)."""
    ctx = mp.get_context("spawn")
    out = []
    for _ in range(repeats):
        if before:
            before()
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_time_in_child, args=(fn, args, send))
        proc.start()
        out.append(recv.recv())
        proc.join()
    return out


def raw_read(path: Path, nbytes: int, buf=None):
    """Read ``path`` whole into ``buf`` (default: a fresh numpy buffer) with 64 MiB readv calls."""
    buf = np.empty(nbytes, np.uint8) if buf is None else buf
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while got < len(mv):
            n = os.readv(fd, [mv[got:got + CHUNK]])
            if n == 0:
                raise EOFError(f"{path} is short")
            got += n
    finally:
        os.close(fd)
    return buf


def torch_load(path: Path):
    return torch.load(path, weights_only=True)


def tasd_restart(root: Path):
    """What a restarted job calls: a fresh manager's find_latest, then load."""
    mgr = LocalCheckpointManager(root, "bench")
    if mgr.find_latest() < 0:
        raise RuntimeError("no checkpoint found")
    return mgr.load()


def bench_raw(work: Path, flat: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    view = memoryview(flat.numpy()).cast("B")
    path = work / "raw.bin"

    def write(direct: bool):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
        try:
            for o in range(0, len(view), CHUNK):
                chunk = view[o:o + CHUNK]
                while chunk:
                    chunk = chunk[os.write(fd, chunk):]
            os.fsync(fd)
        finally:
            os.close(fd)

    unlink, evict = (lambda: path.unlink(missing_ok=True)), (lambda: fsync(path, True))  # untimed
    res = {"raw write (O_DIRECT)": timed(lambda: write(True), repeats, before=unlink)}
    res["raw write"] = timed(lambda: write(False), repeats, before=unlink)  # leaves the file for read
    res["raw read"] = timed_fresh(raw_read, (path, len(view)), repeats, before=evict)
    faulted = np.ones(len(view), np.uint8)
    res["raw read (pages already faulted)"] = timed(lambda: raw_read(path, len(view), faulted), repeats, before=evict)
    assert bytes(faulted[:4096]) == bytes(view[:4096])
    path.unlink()
    return res


def bench_torch(work: Path, tensors: list[torch.Tensor], repeats: int) -> dict[str, list[float]]:
    path = work / "torch.pt"
    res = {"torch.save + fsync": timed(lambda: (torch.save({"layers": tensors}, path), fsync(path)), repeats)}
    res["torch.load"] = timed_fresh(torch_load, (path,), repeats, before=lambda: fsync(path, True))
    path.unlink()
    return res


def bench_tasd(work: Path, tensors: list[torch.Tensor], repeats: int) -> tuple[dict, list[dict]]:
    sd = tasd.BasicTensorAwareStateDict({"layers": tensors})
    mgr = LocalCheckpointManager(work, session_id="bench")
    parts = lambda: [fsync(p, True) for p in (work / "bench").rglob("*.tasd")]  # noqa: E731
    it = iter(range(1, 1 << 30))
    res = {"tasd first save": timed(lambda: mgr.save(sd, next(it)), 1)}
    phases = [vars(mgr.last_save).copy()]
    res["tasd save"] = []
    for _ in range(repeats):
        res["tasd save"] += timed(lambda: mgr.save(sd, next(it)), 1)
        phases.append(vars(mgr.last_save).copy())
    res["tasd restart: find_latest + load"] = timed_fresh(tasd_restart, (work,), repeats, before=parts)
    loaded, _ = tasd_restart(work)
    assert torch.equal(loaded.state_dict["layers"][-1], tensors[-1])
    del loaded
    res["tasd load (same mgr)"] = timed(mgr.load, repeats, before=parts)
    return res, phases


def report(times: dict[str, list[float]], nbytes: int) -> dict:
    stats = {k: {"times_s": v, "median_s": statistics.median(v), "min_s": min(v),
                 "gb_s": nbytes / 1e9 / statistics.median(v)} for k, v in times.items()}
    table = Table(title=f"{nbytes / (1 << 30):.2f} GiB, {N_TENSORS} tensors (ratio = bandwidth / raw)")
    for col in ("what", "median s", "min s", "GB/s", "ratio vs raw"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for k, s in stats.items():
        ref = stats["raw read" if any(w in k for w in ("load", "read")) else "raw write"]
        s["ratio_vs_raw"] = s["gb_s"] / ref["gb_s"]
        table.add_row(k, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}", f"{s['gb_s']:.2f}", f"{s['ratio_vs_raw']:.2f}x")
    console.print(table)
    return stats


def targets(stats: dict) -> dict[str, bool]:
    bw = lambda k: stats[k]["gb_s"]  # noqa: E731
    res = {
        "tasd save >= 0.8x raw write bandwidth": bw("tasd save") >= 0.8 * bw("raw write"),
        "tasd load >= 0.8x raw read bandwidth": bw("tasd restart: find_latest + load") >= 0.8 * bw("raw read"),
        "tasd save faster than torch.save": bw("tasd save") > bw("torch.save + fsync"),
        "tasd load faster than torch.load": bw("tasd restart: find_latest + load") > bw("torch.load"),
    }
    for line, ok in res.items():
        console.print(f"{'[green]PASS' if ok else '[red]MISS'}[/]  {line}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--dir", help="directory to benchmark in (a subdirectory is created and removed)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write all figures to this JSON file")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="tasd-bench-") if args.dir is None else None
    work = Path(tmp.name if tmp else tempfile.mkdtemp(prefix="tasd-bench-", dir=args.dir))
    try:
        dist.init_process_group("gloo", init_method=f"file://{work / 'pg-store'}", rank=0, world_size=1)
        tensors = make_tensors(args.size_gib)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        flat = device.empty_host(nbytes)  # 4096-aligned: usable with O_DIRECT
        torch.cat([t.view(torch.uint8) for t in tensors], out=flat)
        console.print(f"dir {work}; page-cache eviction before reads is best effort (posix_fadvise)")
        console.print("raw write/read ...")
        times = bench_raw(work, flat, args.repeats)
        del flat
        console.print("torch.save/torch.load ...")
        times.update(bench_torch(work, tensors, args.repeats))
        console.print("tasd save/find_latest/load ...")
        tasd_times, phases = bench_tasd(work, tensors, args.repeats)
        times.update(tasd_times)
        order = ["raw write", "raw write (O_DIRECT)", "tasd first save", "tasd save", "torch.save + fsync",
                 "raw read", "raw read (pages already faulted)", "tasd restart: find_latest + load",
                 "tasd load (same mgr)", "torch.load"]
        stats = report({k: times[k] for k in order}, nbytes)
        console.print("tasd save phases (s): " + "; ".join(
            f"stage {p['stage_s']:.3f} write {p['write_s']:.3f} finalize {p['finalize_s']:.3f}" for p in phases))
        verdict = targets(stats)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"size_bytes": nbytes, "n_tensors": N_TENSORS, "dir": str(work), "repeats": args.repeats,
                 "results": stats, "tasd_save_phases": phases, "targets": verdict}, indent=2))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if tmp:
            tmp.cleanup()
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
