"""Where the training stall of an async save goes, phase by phase, on the rank's default device
(its GPU where CUDA is present): the diagnostic behind the tensor-count target of ``tasd bench``.

Two ranks (processes on gloo) save ``--mib`` MiB in ``--tensors`` tensors back to back with clique
replication (factor 2) on a persistent AsyncCallsQueue; each phase of ``LocalCheckpointManager.save``
is timed by wrapping the function that does it, without a profiler (a profiler slows one rank and
the agreement then charges the other with the wait). Prints, per rank, the median over the saves
after two warm-ups of: the whole save call, scheduling its request, and each phase (popping the
tensors, staging = queueing the copies, pickling the hollow state, the agreement, waiting for the
copies). Phases nest: staging and pickling are inside the snapshot.

Run:  .venv/bin/python benchmarks/save_phases.py [--tensors 10032] [--mib 256] [--saves 10]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tasd import BasicTensorAwareStateDict, basic, device, staging
from tasd.launch import run_ranks
from tasd.managers import LocalCheckpointManager, base_manager
from tasd.managers.async_ckpt import AsyncCallsQueue, AsyncRequest
from tasd.managers.replication import CliqueReplicationStrategy

#: (label, owner object, attribute): the functions timed, each under its label.
PHASES = (
    ("snapshot", base_manager.BaseCheckpointManager, "_snapshot"),
    ("  pop_tensors", basic.BasicTensorAwareStateDict, "pop_tensors"),
    ("  stage (queue copies)", base_manager, "stage"),
    ("  pickle hollow", base_manager, "dumps"),
    ("agreement", base_manager.BaseCheckpointManager, "_agree_or_raise"),
    ("wait for copies", staging.Staged, "wait"),
)


def _timed(times: dict, label: str, owner: object, name: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.setdefault(label, []).append(time.perf_counter() - t)
    setattr(owner, name, wrapper)


def rank_body(rank: int, world: int, root: str, n_tensors: int, nbytes: int, saves: int) -> dict[str, float]:
    times: dict[str, list[float]] = {}
    for label, owner, name in PHASES:
        _timed(times, label, owner, name)
    dev = device.default_device()
    numel = max(1, nbytes // 4 // n_tensors)
    state = {f"layer{i:05d}": torch.rand(numel).to(dev) for i in range(n_tensors)}
    mgr = LocalCheckpointManager(Path(root) / str(rank), "phases", CliqueReplicationStrategy.from_replication_params(1, 2))
    queue = AsyncCallsQueue(persistent=True)
    queue.schedule_async_request(AsyncRequest(os.getpid, (), []))  # starts the worker outside the clock
    queue.maybe_finalize_async_calls(blocking=True)
    for it in range(1, saves + 3):
        if it == 3:
            times.clear()  # two warm-ups
        dist.barrier()
        t0 = time.perf_counter()
        request = mgr.save(BasicTensorAwareStateDict(state), it, is_async=True)
        t1 = time.perf_counter()
        queue.schedule_async_request(request)
        t2 = time.perf_counter()
        times.setdefault("save call", []).append(t1 - t0)
        times.setdefault("schedule request", []).append(t2 - t1)
        queue.maybe_finalize_async_calls(blocking=True)
        mgr.wait_for_cleanup()
    queue.close()
    return {label: statistics.median(v) for label, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=10_032)
    parser.add_argument("--mib", type=float, default=256)
    parser.add_argument("--saves", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tasd-phases-") as root:
        results = run_ranks(rank_body, 2, root, args.tensors, int(args.mib * (1 << 20)), args.saves, timeout_s=600)
    where = torch.cuda.get_device_name() if device.cuda_available() else "CPU"
    print(f"{args.mib:g} MiB in {args.tensors} tensors per rank, 2 ranks, on {where}; median ms over {args.saves} saves")
    labels = ["save call", "schedule request"] + [label for label, _, _ in PHASES]
    for label in labels:
        print(f"{label:<24}" + "".join(f"{r[label] * 1e3:>10.2f}" if label in r else f"{'-':>10}" for r in results))


if __name__ == "__main__":
    main()
