"""Replication benchmark: peer exchange, recovery of a lost rank and flatness of save in tensor count.

Everything is measured inside rank processes started with tasd.launch.run_ranks (gloo on loopback,
one process per rank). Each timed step starts right after a dist.barrier(), so all ranks start
together, and is timed with time.perf_counter; one untimed warm-up, then ``--repeats`` runs, median.
A run's time is that of its slowest rank unless a row names a rank. GB/s are decimal (1e9 bytes/s)
of one part's data section (what each rank sends and receives). Ring replication, factor 2, jump 1.

1. Exchange (world 2 and 4): each rank's part (``--size-mib`` MiB as a BasicTensorAwareStateDict of
   16 float32 tensors, staged with tasd.staging.stage, prefix from encode_prefix) moved with
   exchange_parts under the ring save plan (r sends to r+1 and receives from r-1) on a group from
   dist.new_group(backend="gloo"), receiving into pooled buffers as a save does; against, in the same processes and interleaved, the same bytes
   as one uint8 tensor sent with dist.batch_isend_irecv (one isend, one irecv per rank) into a
   preallocated buffer ("raw"); as extra information, raw into a freshly allocated buffer, as
   exchange_parts must return one ("raw, fresh buffer").
2. Recovery (world 2 and 4): one run_ranks call saves an iteration with LocalCheckpointManager; rank
   1's directory is deleted; a second call times find_latest() + load() on every rank (a fresh
   manager per run, its exchange group created before the clock, parts evicted from the page cache
   with POSIX_FADV_DONTNEED, best effort), then the least a recovery must do, raw: the holder reads
   the replica file into fresh memory and sends it, rank 1 receives it into fresh memory. The lost
   rank's load() (after find_latest, which reads and verifies every part a rank holds) is compared
   with that; load() is collective, so every rank returns when the slowest is done. The issue sets
   no target for recovery: the ratio is reported, not judged.
3. Flatness (world 2): LocalCheckpointManager.save of ``--size-mib / 4`` MiB split into 1, 100 and
   10,000 float32 tensors; wall time and SaveStats phases (each the slowest rank's).

Run:  .venv/bin/python benchmarks/bench_replication.py [--size-mib 256] [--dir DIR] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.table import Table

import tasd
from tasd import device
from tasd.launch import run_ranks
from tasd.managers import LocalCheckpointManager, ReplicationConfig
from tasd.managers.exchange import OutgoingPart, Transfer, exchange_parts
from tasd.managers.fileformat import PartMeta, encode_prefix
from tasd.serialization import dumps
from tasd.staging import HostBufferPool, stage

from report import console, parse_args, slowest, verdict  # benchmarks/report.py

N_TENSORS = 16
CONFIG = ReplicationConfig(strategy="ring", replication_factor=2, replication_jump=1)
PHASES = ("stage_s", "exchange_s", "write_s", "finalize_s")
RUN = {"timeout_s": 600.0, "collective_timeout_s": 300.0}


def make_state(nbytes: int, n: int, seed: int) -> tasd.BasicTensorAwareStateDict:
    gen = torch.Generator().manual_seed(seed)
    return tasd.BasicTensorAwareStateDict({"layers": [torch.rand(nbytes // 4 // n, generator=gen) for _ in range(n)]})


def clocked(fn):
    """(seconds, result) of ``fn()`` started right after a barrier; the result is freed by the caller."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def raw_p2p(send: torch.Tensor | None, dst: int, recv: torch.Tensor | None, src: int, group) -> torch.Tensor | None:
    ops = [dist.P2POp(dist.isend, send, dst, group)] if send is not None else []
    ops += [dist.P2POp(dist.irecv, recv, src, group)] if recv is not None else []
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    return recv


def manager(root: Path) -> LocalCheckpointManager:
    return LocalCheckpointManager(root, "bench", CONFIG.build())


# -- rank functions (module level: run_ranks pickles them) ------------------------------------------
def exchange_rank(rank: int, world: int, nbytes: int, repeats: int) -> dict[str, list[float]]:
    sd = make_state(nbytes, N_TENSORS, rank)
    staged = stage(sd.pop_tensors(), HostBufferPool())
    prefix = encode_prefix(PartMeta(0, rank, world, "bench", CONFIG.settings), dumps(sd), staged.layouts, staged.buffer)
    data, nxt, prv = staged.buffer, (rank + 1) % world, (rank - 1) % world
    plan, outgoing = [Transfer(rank, rank, nxt), Transfer(prv, prv, rank)], {rank: OutgoingPart(prefix, data)}
    group, landing = dist.new_group(backend="gloo"), device.empty_host(data.numel())
    pool = HostBufferPool()  # as in a save: received parts land in pooled buffers, reused after the first
    runs = {"exchange_parts": lambda: exchange_parts(plan, outgoing, group, pool=pool),
            "raw": lambda: raw_p2p(data, nxt, landing, prv, group),
            "raw, fresh buffer": lambda: raw_p2p(data, nxt, device.empty_host(data.numel()), prv, group)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeats + 1):
        for k, fn in runs.items():
            t, out = clocked(fn)
            if k == "exchange_parts":
                assert list(out) == [prv] and out[prv].header.meta.owner_rank == prv
                pool.release(out[prv].buffer)
            del out  # freed after the clock stops
            if i:
                times[k].append(t)
    return times


def save_rank(rank: int, world: int, root: Path, nbytes: int) -> None:
    manager(root).save(make_state(nbytes, N_TENSORS, rank), 1)


def recover_rank(rank: int, world: int, root: Path, nbytes: int, repeats: int, lost: int) -> dict[str, list[float]]:
    holder = CONFIG.build().holders(lost, world)[0]
    pair = dist.new_group(backend="gloo")
    replica = root / "bench" / str(holder) / f"iter_0000001_{lost}_local.tasd"
    times: dict[str, list[float]] = {"find_latest": [], "find_latest + load": [], "load": [], "raw": []}

    def raw_recovery():
        if rank == holder:  # read the replica whole into fresh memory, then send it
            with open(replica, "rb") as f:
                data = f.read()
            raw_p2p(torch.frombuffer(bytearray(data), dtype=torch.uint8), lost, None, holder, pair)
        elif rank == lost:
            raw_p2p(None, holder, device.empty_host(replica.stat().st_size), holder, pair)
    for i in range(repeats + 1):
        mgr = manager(root)
        assert mgr.repl_strategy.group is not None  # creates the exchange group (collective) before the clock
        for path in (root / "bench" / str(rank)).glob("*.tasd"):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        dist.barrier()
        t0 = time.perf_counter()
        mgr.find_latest()
        t1 = time.perf_counter()
        sd, _ = mgr.load()
        t2 = time.perf_counter()
        if i == 0:  # first tensor is the first draw of the owner's generator
            first = torch.rand(nbytes // 4 // N_TENSORS, generator=torch.Generator().manual_seed(rank))
            assert torch.equal(sd.state_dict["layers"][0], first), f"rank {rank} loaded wrong data"
        del sd
        if rank == holder:
            fd = os.open(replica, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        t, _ = clocked(raw_recovery)
        if i:
            times["find_latest"].append(t1 - t0)
            times["find_latest + load"].append(t2 - t0)
            times["load"].append(t2 - t1)
            times["raw"].append(t)
    return times


def flat_rank(rank: int, world: int, root: Path, nbytes: int, counts: list[int], repeats: int) -> dict:
    out = {}
    for n in counts:
        sd, mgr, runs = make_state(nbytes, n, rank), manager(root / f"n{n}"), []
        for it in range(1, repeats + 2):  # iteration 1 is the warm-up (allocates the staging buffer)
            t, _ = clocked(lambda: mgr.save(sd, it))
            if it > 1:
                runs.append({"save_s": t, **{k: getattr(mgr.last_save, k) for k in PHASES}})
        mgr.wait_for_cleanup()
        out[n] = runs
    return out


# -- aggregation and reporting ------------------------------------------------------------------
def table(title: str, cols: tuple[str, ...]) -> Table:
    t = Table(title=title)
    for c in cols:
        t.add_column(c, justify="left" if c in ("world", "what") else "right")
    return t


def bench_exchange(nbytes: int, repeats: int, verdicts: dict) -> dict:
    gb, out = nbytes / 1e9, {}
    tab = table(f"1. exchange of {nbytes / (1 << 20):.0f} MiB per rank, ring save plan (gloo, loopback)",
                ("world", "what", "s (slowest rank)", "s per rank", "GB/s per rank", "vs raw"))
    for world in (2, 4):
        per_rank = run_ranks(exchange_rank, world, nbytes, repeats, **RUN)
        s = {k: slowest([r[k] for r in per_rank]) for k in per_rank[0]}
        for k in s:
            ranks = " / ".join(f"{statistics.median(r[k]):.3f}" for r in per_rank)
            tab.add_row(str(world), k, f"{s[k]:.3f}", ranks, f"{gb / s[k]:.2f}", f"{s['raw'] / s[k]:.2f}x")
        out[world] = {"per_rank_times_s": per_rank, "slowest_median_s": s}
    console.print(tab)
    for world, r in out.items():
        ratio = r["slowest_median_s"]["raw"] / r["slowest_median_s"]["exchange_parts"]
        verdict(f"exchange >= 0.8x raw gloo send/recv, world {world}", ratio, ratio >= 0.8, verdicts)
    return out


def bench_recovery(work: Path, nbytes: int, repeats: int, verdicts: dict, lost: int = 1) -> dict:
    out = {}
    tab = table(f"2. recovery of rank {lost} (lost its directory), {nbytes / (1 << 20):.0f} MiB per part",
                ("world", "what", "find_latest s", "load s", "find_latest + load s", "load vs raw"))
    for world in (2, 4):
        root, holder = work / f"recovery-w{world}", CONFIG.build().holders(lost, world)[0]
        run_ranks(save_rank, world, root, nbytes, **RUN)
        shutil.rmtree(root / "bench" / str(lost))
        per_rank = run_ranks(recover_rank, world, root, nbytes, repeats, lost, **RUN)
        shutil.rmtree(root)
        med = lambda r, k: statistics.median(per_rank[r][k])  # noqa: E731
        raw = med(lost, "raw")
        rows = {f"rank {lost}: lost its part, fetches it": lost, f"rank {holder}: intact, holder, sends it": holder}
        rows.update({f"rank {r}: intact, not a sender": r for r in range(world) if r not in (lost, holder)})
        for k, r in rows.items():
            tab.add_row(str(world), k, f"{med(r, 'find_latest'):.3f}", f"{med(r, 'load'):.3f}",
                        f"{med(r, 'find_latest + load'):.3f}", f"{raw / med(r, 'load'):.2f}x")
        tab.add_row(str(world), f"raw: rank {holder} reads the replica and sends it to rank {lost}", "",
                    f"{raw:.3f}", "", "1.00x")
        out[world] = {"per_rank_times_s": per_rank, "holder": holder, "lost": lost,
                      "ratio": raw / med(lost, "load")}
    console.print(tab)
    for world, r in out.items():
        console.print(f"recovery, world {world}: the lost rank's load takes {1 / r['ratio']:.2f}x the raw "
                      "read + send (no target; reported)")
    return out


def bench_flatness(work: Path, nbytes: int, repeats: int, verdicts: dict, counts=(1, 100, 10_000)) -> dict:
    per_rank = run_ranks(flat_rank, 2, work / "flat", nbytes, list(counts), repeats, **RUN)
    tab = table(f"3. save of {nbytes / (1 << 20):.0f} MiB per rank in n tensors, world 2 (slowest rank per phase)",
                ("tensors", "save s", "GB/s", *(p.removesuffix("_s") + " s" for p in PHASES)))
    flat = {}
    for n in counts:
        flat[n] = {k: slowest([[run[k] for run in r[n]] for r in per_rank]) for k in ("save_s", *PHASES)}
        tab.add_row(f"{n:,}", f"{flat[n]['save_s']:.3f}", f"{nbytes / 1e9 / flat[n]['save_s']:.2f}",
                    *(f"{flat[n][p]:.3f}" for p in PHASES))
    console.print(tab)
    ratio = flat[counts[-1]]["exchange_s"] / flat[counts[0]]["exchange_s"]
    verdict(f"exchange time at {counts[-1]:,} tensors <= 1.5x at {counts[0]} tensor", ratio, ratio <= 1.5, verdicts)
    return {"size_bytes": nbytes, "per_rank": per_rank, "slowest_median_s": flat}


def main() -> None:
    args, nbytes = parse_args(__doc__, 256.0, "part size per rank (flatness: a quarter)", 3, N_TENSORS)
    work = Path(tempfile.mkdtemp(prefix="tasd-bench-repl-", dir=args.dir))
    verdicts: dict[str, dict] = {}
    try:
        console.print(f"dir {work}; {nbytes / (1 << 20):.0f} MiB per rank; ring, factor 2, jump 1; "
                      f"{os.cpu_count()} CPUs")
        res = {"size_bytes": nbytes, "repeats": args.repeats, "dir": str(work),
               "exchange": bench_exchange(nbytes, args.repeats, verdicts),
               "recovery": bench_recovery(work, nbytes, args.repeats, verdicts),
               "flatness": bench_flatness(work, nbytes // 4, args.repeats, verdicts), "targets": verdicts}
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
