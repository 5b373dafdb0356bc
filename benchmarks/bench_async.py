"""Async save benchmark: the training stall of tasd's asynchronous local save against a plain copy
into a preallocated buffer and against torch.distributed.checkpoint.async_save, all in one run.

Two ranks (tasd.launch.run_ranks, gloo on loopback, one process each), each with a state dict of
``--size-mib`` MiB (default 1024) in 16 float32 tensors under keys of its own. Every timed call
starts right after a dist.barrier() and is timed with time.perf_counter on each rank; a run's
figure is the slowest rank's, and the median over ``--repeats`` runs is reported. After each timed
call the save is completed outside the clock (blocking finalize, removal of superseded files, the
DCP future, os.sync()), as the minutes between real checkpoints would, so every call starts on a
quiet machine. The methods are interleaved within each run:

- copy: ``dst.copy_(src)`` per tensor into preallocated tensors (the least a snapshot costs);
- tasd, no replication: ``LocalCheckpointManager.save(..., is_async=True)`` plus
  ``AsyncCallsQueue.schedule_async_request`` on a persistent queue (started before the clock);
- tasd, clique factor 2: the same with every part replicated on the other rank (the exchange and
  the replica write run in a background thread, the own part in the worker);
- DCP: ``torch.distributed.checkpoint.async_save(state_dict, checkpoint_id=...)`` (default
  thread checkpointer and stager), returning a future.

The first save of each method (allocation of staging memory, worker start for DCP's thread) is
shown apart. Targets (issue 4): tasd stall <= 1.5x copy; factor 2 <= 1.2x no replication; tasd
below DCP.

Run:  .venv/bin/python benchmarks/bench_async.py [--size-mib 1024] [--dir DIR] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from rich.table import Table

from tasd import BasicTensorAwareStateDict
from tasd.launch import run_ranks
from tasd.managers import LocalCheckpointManager, ReplicationConfig
from tasd.managers.async_ckpt import AsyncCallsQueue, AsyncRequest

from report import console, parse_args, slowest, verdict  # benchmarks/report.py

N_TENSORS = 16
METHODS = ("copy", "tasd", "tasd_f2", "dcp")
LABELS = {"copy": "plain copy into preallocated buffers", "tasd": "tasd async save, no replication",
          "tasd_f2": "tasd async save, clique factor 2", "dcp": "torch DCP async_save"}
RUN = {"timeout_s": 1800.0, "collective_timeout_s": 600.0}


def stall_rank(rank: int, world: int, root: str, nbytes: int, repeats: int) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(rank)
    sd = {f"rank{rank}.layer{i}": torch.rand(nbytes // 4 // N_TENSORS, generator=gen) for i in range(N_TENSORS)}
    dst = {k: torch.empty_like(v) for k, v in sd.items()}
    queue = AsyncCallsQueue(persistent=True)
    queue.schedule_async_request(AsyncRequest(None, (), []))  # start the worker before the clock
    queue.maybe_finalize_async_calls(blocking=True)
    managers = {"tasd": LocalCheckpointManager(Path(root) / "none", "bench"),
                "tasd_f2": LocalCheckpointManager(Path(root) / "f2", "bench", ReplicationConfig(
                    strategy="clique", replication_factor=2, replication_jump=1).build())}
    counter = {"iteration": 0, "dcp": 0}

    def copy() -> None:
        for k, v in sd.items():
            dst[k].copy_(v)

    def tasd_save(m: LocalCheckpointManager):
        counter["iteration"] += 1
        queue.schedule_async_request(m.save(BasicTensorAwareStateDict(sd), counter["iteration"], is_async=True))

        def complete() -> None:
            queue.maybe_finalize_async_calls(blocking=True)
            m.wait_for_cleanup()
        return complete

    def dcp_save():
        counter["dcp"] += 1
        path = Path(root) / "dcp" / str(counter["dcp"])
        future = dcp.async_save(sd, checkpoint_id=str(path))

        def complete() -> None:
            future.result()
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path.parent / str(counter["dcp"] - 1), ignore_errors=True)
        return complete

    calls = {"copy": copy, "tasd": lambda: tasd_save(managers["tasd"]),
             "tasd_f2": lambda: tasd_save(managers["tasd_f2"]), "dcp": dcp_save}
    out: dict[str, list[float]] = {f"{m}_first": [] for m in METHODS} | {m: [] for m in METHODS}
    for run in range(repeats + 1):
        for method in METHODS:
            dist.barrier()
            t0 = time.perf_counter()
            complete = calls[method]()
            out[method if run else f"{method}_first"].append(time.perf_counter() - t0)
            if complete is not None:
                complete()
            os.sync()  # dirty pages written back before the next call, as between real checkpoints
    queue.close()
    return out


def main() -> None:
    args, nbytes = parse_args(__doc__, 1024.0, "state dict size per rank", 5, N_TENSORS)
    work = Path(tempfile.mkdtemp(prefix="tasd-bench-async-", dir=args.dir))
    try:
        console.print(f"dir {work}; {nbytes / (1 << 20):.0f} MiB per rank, 2 ranks; {os.cpu_count()} CPUs; "
                      f"{args.repeats} runs")
        per_rank = run_ranks(stall_rank, 2, str(work), nbytes, args.repeats, **RUN)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s = {k: slowest([r[k] for r in per_rank]) for k in per_rank[0]}
    tab = Table(title=f"training stall of one save of {nbytes / (1 << 20):.0f} MiB per rank (slowest rank, median)")
    for c in ("method", "stall s", "GB/s", "vs copy", "first save s"):
        tab.add_column(c, justify="left" if c == "method" else "right")
    for m in METHODS:
        tab.add_row(LABELS[m], f"{s[m]:.3f}", f"{nbytes / 1e9 / s[m]:.2f}", f"{s[m] / s['copy']:.2f}x",
                    f"{s[m + '_first']:.3f}")
    console.print(tab)
    verdicts: dict[str, dict] = {}
    verdict("tasd async stall <= 1.5x plain copy", s["tasd"] / s["copy"], s["tasd"] <= 1.5 * s["copy"], verdicts)
    verdict("tasd async stall with factor 2 <= 1.2x without replication", s["tasd_f2"] / s["tasd"],
            s["tasd_f2"] <= 1.2 * s["tasd"], verdicts)
    verdict("tasd async stall below DCP async_save's", s["tasd"] / s["dcp"], s["tasd"] < s["dcp"], verdicts)
    verdict("tasd async stall with factor 2 below DCP async_save's", s["tasd_f2"] / s["dcp"],
            s["tasd_f2"] < s["dcp"], verdicts)
    if args.json:
        Path(args.json).write_text(json.dumps({"size_bytes": nbytes, "repeats": args.repeats,
                                               "per_rank_times_s": per_rank, "slowest_median_s": s,
                                               "targets": verdicts}, indent=2))


if __name__ == "__main__":
    main()
