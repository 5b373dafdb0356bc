"""Run a function on N ranks as local processes joined by a gloo process group.

Used by ``tasd demo`` and the multi-process tests: each rank is a real process with its own
directory standing for its node's local disk, so deleting a directory is losing a node.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

import torch.distributed as dist


class RankFailure(RuntimeError):
    """One or more ranks raised, died or timed out; ``failures`` maps rank -> report."""

    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        super().__init__("\n".join(f"--- rank {r} ---\n{m}" for r, m in sorted(failures.items())))


def _rank_main(fn: Callable, rank: int, world_size: int, store_path: str, timeout_s: float,
               args: tuple, kwargs: dict, results: Any) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        try:
            # Every rank has finished connecting before any runs ``fn``: a rank whose ``fn`` returns
            # at once would otherwise exit while a peer is still connecting to it (that peer's init
            # then fails with "connection closed by peer").
            dist.barrier()
            out = fn(rank, world_size, *args, **kwargs)
        finally:
            dist.destroy_process_group()
        # Plain pickle copies tensor data; the queue's own pickling would pass shared memory that
        # dies with this process before the parent reads it.
        results.put((rank, True, pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)))
    except BaseException:  # report everything, including KeyboardInterrupt/SystemExit
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 120.0,
              collective_timeout_s: float = 30.0, preload: Sequence[str] = (), **kwargs: Any) -> list[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes and return their
    results in rank order. ``fn`` and its arguments must be picklable (module-level function).

    Processes start from a fork server (torch imported once), so starting ranks is cheap. The fork
    server also imports the modules named in ``preload`` (e.g. a framework every rank imports),
    when this call is the one that starts it (the first of this process; the server stays).
    Every collective inside times out after ``collective_timeout_s``; the whole run after
    ``timeout_s``, when remaining ranks are killed. Raises RankFailure with each failed rank's
    traceback.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tasd", "tasd.managers", *preload])
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="tasd-store-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, name=f"rank{r}",
                             args=(fn, r, world_size, store, collective_timeout_s, args, kwargs, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outcomes: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(outcomes) < world_size and time.monotonic() < deadline:
                try:
                    rank, ok, out = results.get(timeout=0.2)
                except queue.Empty:
                    if all(not p.is_alive() for p in procs) and results.empty():
                        break
                    continue
                # Results come from this function's own child processes: trusted bytes.
                outcomes[rank] = (ok, pickle.loads(out) if ok else out)
        finally:
            for p in procs:
                p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
                if p.is_alive():
                    p.kill()
                    p.join()
    failures = {r: out for r, (ok, out) in outcomes.items() if not ok}
    for r, p in enumerate(procs):
        if r not in outcomes:
            failures[r] = (f"no result: exit code {p.exitcode}" if p.exitcode is not None and p.exitcode != -9
                           else f"timed out after {timeout_s}s and was killed")
    if failures:
        raise RankFailure(failures)
    return [outcomes[r][1] for r in range(world_size)]

