"""What ``tasd bench`` times inside a rank process: tasd, the machine's limits and the peers, all on
the same state dict and under the same directory.

A :class:`Point` (picklable) says what to measure: world size, bytes and tensors per rank, clique
replication factor. :class:`RankBench` holds one rank's state dict (float32 tensors under keys of
its own, on the rank's device) and builds :class:`~tasd.bench.measure.Method` objects by name from
:data:`METHODS` (label, kind, factory). Every method saves into ``ROOT/<method>/`` and removes what
it superseded in its completion (outside the clock). Peers that are not installed are left out by
:func:`available`.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from tasd import BasicTensorAwareStateDict, device
from tasd.bench import nvrx_shim
from tasd.bench.measure import Completion, Method, run_methods
from tasd.managers import LocalCheckpointManager
from tasd.managers.async_ckpt import AsyncCallsQueue, AsyncRequest
from tasd.managers.partio import fsync_path
from tasd.managers.replication import CliqueReplicationStrategy, parse_group_sequence

CHUNK = 64 << 20
SESSION = "bench"


@dataclass(frozen=True)
class Point:
    """One measurement point: ``world`` ranks, ``size_bytes`` per rank in ``n_tensors`` float32
    tensors, clique replication with ``factor`` copies (1: none) and jump ``jump``."""

    world: int
    size_bytes: int
    n_tensors: int
    factor: int = 2
    jump: int = 1

    @property
    def numel(self) -> int:
        """Elements per tensor (at least one)."""
        return max(1, self.size_bytes // 4 // self.n_tensors)

    @property
    def nbytes(self) -> int:
        """Tensor bytes per rank actually used (``size_bytes`` rounded down to whole tensors)."""
        return self.numel * 4 * self.n_tensors

    def params(self) -> dict:
        return asdict(self) | {"nbytes": self.nbytes}


def make_state(point: Point, rank: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """This rank's state dict: ``point.n_tensors`` tensors of random float32 (seeded by rank), keys
    ``rank{rank}.layer{i}`` (distinct per rank, so that DCP does not deduplicate them)."""
    gen = torch.Generator().manual_seed(rank)
    return {f"rank{rank}.layer{i:05d}": torch.rand(point.numel, generator=gen).to(dev) for i in range(point.n_tensors)}


def first_tensor(point: Point, rank: int) -> torch.Tensor:
    """The first tensor of :func:`make_state` (on CPU), to check what a load returned."""
    return torch.rand(point.numel, generator=torch.Generator().manual_seed(rank))


def tasd_strategy(point: Point) -> CliqueReplicationStrategy | None:
    """tasd's clique strategy for ``point`` (collective over each clique: creates its exchange group), or None."""
    return CliqueReplicationStrategy.from_replication_params(point.jump, point.factor) if point.factor > 1 else None


def nvrx_strategy(point: Point) -> Any:
    """NVRx's CliqueReplicationStrategy for ``point`` (collective), or None. Needs the shim applied."""
    if point.factor == 1:
        return None
    from nvidia_resiliency_ext.checkpointing.local.replication.strategies import CliqueReplicationStrategy as C
    return C.from_replication_params(point.jump, point.factor)


def write_file(path: Path, data: torch.Tensor, direct: bool = False) -> None:
    """Write the bytes of 1-D uint8 host tensor ``data`` to a new ``path`` in 64 MiB ``os.write``
    calls, then fsync (``direct``: O_DIRECT; ``data`` must then be 4096-aligned)."""
    view = memoryview(data.numpy()).cast("B")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        for o in range(0, len(view), CHUNK):
            chunk = view[o:o + CHUNK]
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
        os.fsync(fd)
    finally:
        os.close(fd)


def wait_until(done: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    """Poll ``done()`` every millisecond; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s}s")
        time.sleep(0.001)


_NVRX_FILE = re.compile(r"iter_(\d+)_\d+_local\.pt$")


def nvrx_cleaned(directory: Path, iteration: int) -> bool:
    """Whether NVRx's background cleanup removed every file older than ``iteration`` from ``directory``."""
    return not any((m := _NVRX_FILE.match(p.name)) and int(m.group(1)) < iteration for p in directory.iterdir())


def dcp_path(root: Path, iteration: int) -> Path:
    """Where the DCP methods save ``iteration`` under a rank's benchmark ``root``."""
    return root / "dcp" / f"step_{iteration}"


def newest_dcp(root: Path) -> Path | None:
    """The newest DCP checkpoint the DCP methods saved under ``root`` (None: none)."""
    return max((root / "dcp").glob("step_*"), key=lambda p: int(p.name.split("_")[1]), default=None)


def remove_dcp_but(root: Path, iteration: int, rank: int) -> None:
    """Remove every DCP checkpoint under ``root`` but ``iteration``'s: rank 0 removes them between
    two barriers (collective on the default group)."""
    dist.barrier()
    if rank == 0:
        for p in (root / "dcp").glob("step_*"):
            if p != dcp_path(root, iteration):
                shutil.rmtree(p)
    dist.barrier()


def _noop() -> None:
    """An async call that does nothing (starts a persistent worker before any clock)."""


class Workers:
    """Background workers one rank process keeps across benchmark points: tasd's persistent
    AsyncCallsQueue, started (collectively) before any measurement, so that neither its start nor
    its process's own memory is counted in a figure. :meth:`close` is collective."""

    def __init__(self) -> None:
        self._tasd: AsyncCallsQueue | None = None

    def tasd_queue(self) -> AsyncCallsQueue:
        if self._tasd is None:
            self._tasd = AsyncCallsQueue(persistent=True)
            self._tasd.schedule_async_request(AsyncRequest(_noop, (), []))
            self._tasd.maybe_finalize_async_calls(blocking=True)
        return self._tasd

    def close(self) -> None:
        if self._tasd is not None:
            self._tasd.close()
            self._tasd = None


class RankBench:
    """One rank's side of a benchmark point: the state dict and everything the methods share
    (managers, queues, buffers), created on first use. Methods of one RankBench are interleaved
    by :func:`tasd.bench.measure.run_methods`; call :meth:`close` at the end (collective).
    ``workers``: the process's :class:`Workers` (shared by the points it measures)."""

    def __init__(self, rank: int, world: int, point: Point, root: Path, workers: Workers):
        if world != point.world:
            raise ValueError(f"point is for world size {point.world}, not {world}")
        self.rank, self.world, self.point, self.root = rank, world, point, Path(root)
        self.workers = workers
        self.dev = device.default_device()
        self.state = make_state(point, rank, self.dev)
        self.iteration = 0
        self._cache: dict[str, Any] = {}
        self._closers: list[Callable[[], None]] = []

    # -- shared resources -----------------------------------------------------------------------
    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def dir(self, method: str) -> Path:
        """This rank's directory for ``method`` (created)."""
        path = self.root / method / str(self.rank)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def flat(self) -> torch.Tensor:
        """The state's bytes in one 4096-aligned host buffer (what raw writes and sends move)."""
        def make() -> torch.Tensor:
            buf = device.empty_host(self.point.nbytes, pin=False)
            torch.cat([t.reshape(-1).view(torch.uint8).cpu() for t in self.state.values()], out=buf)
            return buf
        return self._once("flat", make)

    def next_iteration(self) -> int:
        self.iteration += 1
        return self.iteration

    def tasd_manager(self, direct_io: bool | None = None) -> LocalCheckpointManager:
        """tasd's manager for this point, under ``tasd/`` with the default write path, under
        ``tasd_direct/`` with ``direct_io=True`` (every part written with O_DIRECT)."""
        subdir = "tasd" if direct_io is None else "tasd_direct"
        return self._once(subdir, lambda: LocalCheckpointManager(
            self.root / subdir, SESSION, tasd_strategy(self.point), direct_io=direct_io))

    def nvrx_manager(self) -> Any:
        def make() -> Any:
            nvrx_shim.apply()
            from nvidia_resiliency_ext.checkpointing.local.ckpt_managers.local_manager import (
                LocalCheckpointManager as NVRxManager)
            return NVRxManager(self.root / "nvrx", SESSION, nvrx_strategy(self.point))
        return self._once("nvrx_manager", make)

    def close(self) -> None:
        """Finalize and stop this point's async queues (collective)."""
        for close in reversed(self._closers):
            close()
        self._closers.clear()

    # -- limits ---------------------------------------------------------------------------------
    def copy(self) -> Method:
        """Copy every tensor into preallocated host memory (host-to-host; from a host copy of the
        state where it lives on a GPU): the least a snapshot costs."""
        src = self.state if self.dev.type == "cpu" else {k: v.cpu() for k, v in self.state.items()}
        dst = {k: torch.empty_like(v) for k, v in src.items()}

        def call() -> None:
            for k, v in src.items():
                dst[k].copy_(v)
        return Method("copy", call)

    def d2h_pinned(self) -> Method:
        """Copy every (CUDA) tensor into preallocated pinned host memory, then wait for the copies."""
        dst = {k: device.host_like(v) for k, v in self.state.items()}

        def call() -> None:
            for k, v in self.state.items():
                dst[k].copy_(v, non_blocking=True)
            device.synchronize()
        return Method("d2h_pinned", call)

    def _write(self, direct: bool) -> Method:
        name = "write_direct" if direct else "write"
        path = self.dir(name) / "state.bin"

        def call() -> Completion:
            write_file(path, self.flat(), direct)
            return lambda: path.unlink()
        return Method(name, call)

    def write(self) -> Method:
        """Write the state's bytes to a file with buffered os.write + fsync."""
        return self._write(False)

    def write_direct(self) -> Method:
        """The same with O_DIRECT (bypassing the page cache) + fsync."""
        return self._write(True)

    def send_recv(self) -> Method:
        """Send the state's bytes to every other member of this rank's clique and receive theirs
        into preallocated buffers: one gloo isend/irecv per peer (batch_isend_irecv)."""
        peers = next(g for g in parse_group_sequence(self.point.jump, max(self.point.factor, 1), self.world)
                     if self.rank in g)
        peers = [p for p in peers if p != self.rank]
        group = self._once("p2p_group", lambda: dist.new_group(backend="gloo"))
        landing = {p: device.empty_host(self.point.nbytes, pin=False) for p in peers}

        def call() -> None:
            ops = [dist.P2POp(dist.isend, self.flat(), p, group) for p in peers]
            ops += [dist.P2POp(dist.irecv, landing[p], p, group) for p in peers]
            for work in dist.batch_isend_irecv(ops) if ops else []:
                work.wait()
        return Method("send_recv", call)

    # -- tasd -----------------------------------------------------------------------------------
    def tasd_async(self) -> Method:
        """LocalCheckpointManager.save(is_async=True) + schedule_async_request on a persistent tasd
        AsyncCallsQueue (its worker started before the clock); the stall is what the caller waits."""
        mgr, queue = self.tasd_manager(), self.workers.tasd_queue()

        def call() -> Completion:
            queue.schedule_async_request(mgr.save(BasicTensorAwareStateDict(self.state), self.next_iteration(),
                                                  is_async=True))

            def complete() -> None:
                queue.maybe_finalize_async_calls(blocking=True)
                mgr.wait_for_cleanup()
            return complete
        return Method("tasd_async", call)

    def tasd_sync(self, direct_io: bool | None = None) -> Method:
        """LocalCheckpointManager.save (synchronous: stage, exchange, write, fsync, publish), with
        the default write path or ``direct_io``."""
        mgr = self.tasd_manager(direct_io)

        def call() -> Completion:
            mgr.save(BasicTensorAwareStateDict(self.state), self.next_iteration())
            return mgr.wait_for_cleanup
        return Method("tasd_sync" if direct_io is None else "tasd_sync_direct", call)

    def tasd_sync_direct(self) -> Method:
        """:meth:`tasd_sync` with ``direct_io=True``: every part written with O_DIRECT."""
        return self.tasd_sync(direct_io=True)

    def tasd_exchange(self) -> Method:
        """A synchronous save's replica exchange, as the manager measures it (``last_save.exchange_s``)."""
        sync = self.tasd_sync()
        return Method("tasd_exchange", sync.call, measure=lambda: self.tasd_manager().last_save.exchange_s)

    # -- peers ----------------------------------------------------------------------------------
    def torch_save(self) -> Method:
        """torch.save of the state dict to a new file + fsync."""
        directory = self.dir("torch")

        def call() -> Completion:
            it = self.next_iteration()
            path = directory / f"state_{it}.pt"
            torch.save(self.state, path)
            fsync_path(path)
            return lambda: [p.unlink() for p in directory.glob("state_*.pt") if p != path]
        return Method("torch_save", call)

    def _dcp_path(self, it: int) -> Path:
        return dcp_path(self.root, it)

    def _dcp_cleanup(self, it: int) -> Completion:
        return lambda: remove_dcp_but(self.root, it, self.rank)

    def dcp_save(self) -> Method:
        """torch.distributed.checkpoint.save of the state dict (collective)."""
        import torch.distributed.checkpoint as dcp

        def call() -> Completion:
            it = self.next_iteration()
            dcp.save(self.state, checkpoint_id=str(self._dcp_path(it)))
            return self._dcp_cleanup(it)
        return Method("dcp_save", call)

    def dcp_async(self) -> Method:
        """torch.distributed.checkpoint.async_save (default stager and thread); the stall is until
        it returns its future."""
        import torch.distributed.checkpoint as dcp

        def call() -> Completion:
            it = self.next_iteration()
            future = dcp.async_save(self.state, checkpoint_id=str(self._dcp_path(it)))
            cleanup = self._dcp_cleanup(it)

            def complete() -> None:
                future.result()
                cleanup()
            return complete
        return Method("dcp_async", call)

    def _nvrx_complete(self, it: int) -> None:
        mgr = self.nvrx_manager()
        wait_until(lambda: nvrx_cleaned(mgr.local_ckpt_dir, it), f"NVRx cleanup before iteration {it}")

    def nvrx_sync(self) -> Method:
        """NVRx LocalCheckpointManager.save (synchronous; replication inside save)."""
        from tasd.bench.nvrx_state import CPUStateDict
        mgr = self.nvrx_manager()

        def call() -> Completion:
            it = self.next_iteration()
            mgr.save(CPUStateDict(self.state), it)
            return lambda: self._nvrx_complete(it)
        return Method("nvrx_sync", call)

    def nvrx_async(self) -> Method:
        """NVRx LocalCheckpointManager.save(is_async=True) + its AsyncCallsQueue(persistent=False)
        (a forked process per save; its persistent queue cannot take a replicated request)."""
        from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncCallsQueue as NVRxQueue

        from tasd.bench.nvrx_state import CPUStateDict
        mgr = self.nvrx_manager()
        queue = self._once("nvrx_queue", lambda: NVRxQueue(persistent=False))

        def call() -> Completion:
            it = self.next_iteration()
            queue.schedule_async_request(mgr.save(CPUStateDict(self.state), it, is_async=True))

            def complete() -> None:
                queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
                self._nvrx_complete(it)
            return complete
        return Method("nvrx_async", call)

    def nvrx_torch_async(self) -> Method:
        """NVRx TorchAsyncCheckpoint.async_save (torch.save in its persistent worker)."""
        def make() -> Any:
            nvrx_shim.apply()
            from nvidia_resiliency_ext.checkpointing.async_ckpt.torch_ckpt import TorchAsyncCheckpoint
            ckpt = TorchAsyncCheckpoint(persistent_queue=True)
            self._closers.append(lambda: ckpt.finalize_async_save(blocking=True, terminate=True))
            warm = self.dir("nvrx_torch") / "start.pt"  # starts its worker before any measurement
            ckpt.async_save({}, warm)
            ckpt.finalize_async_save(blocking=True)
            warm.unlink()
            return ckpt
        ckpt, directory = self._once("nvrx_torch", make), self.dir("nvrx_torch")

        def call() -> Completion:
            path = directory / f"state_{self.next_iteration()}.pt"
            ckpt.async_save(self.state, path)

            def complete() -> None:
                ckpt.finalize_async_save(blocking=True)
                for p in directory.glob("state_*.pt"):
                    if p != path:
                        p.unlink()
            return complete
        return Method("nvrx_torch_async", call)

    def nvrx_replicate(self) -> Method:
        """NVRx CliqueReplicationStrategy.replicate of the state dict (what its save runs in the
        foreground: one all_gather_object, then one broadcast per tensor per clique member)."""
        from tasd.bench.nvrx_state import CPUStateDict
        self.nvrx_manager()  # applies the shim
        strategy = self._once("nvrx_strategy", lambda: nvrx_strategy(self.point))

        def call() -> None:
            strategy.replicate(CPUStateDict(self.state), (self.next_iteration(), self.rank, SESSION))
        return Method("nvrx_replicate", call)


@dataclass(frozen=True)
class MethodInfo:
    label: str
    kind: str  # "tasd" | "limit" | "peer"
    needs: tuple[str, ...] = ()  # of "nvrx", "cuda", "replication"


#: Every in-process method: name -> how it is shown and what it needs.
METHODS: dict[str, MethodInfo] = {
    "copy": MethodInfo("copy into preallocated host memory", "limit"),
    "d2h_pinned": MethodInfo("device-to-host copy into preallocated pinned memory", "limit", ("cuda",)),
    "write": MethodInfo("write + fsync (buffered os.write)", "limit"),
    "write_direct": MethodInfo("write + fsync (O_DIRECT)", "limit"),
    "send_recv": MethodInfo("gloo send/recv to clique peers, preallocated buffers", "limit", ("replication",)),
    "tasd_async": MethodInfo("tasd save(is_async=True) + schedule (stall)", "tasd"),
    "tasd_sync": MethodInfo("tasd save (synchronous)", "tasd"),
    "tasd_sync_direct": MethodInfo("tasd save (synchronous), every part O_DIRECT (direct_io=True)", "tasd"),
    "tasd_exchange": MethodInfo("tasd replica exchange of a save (SaveStats.exchange_s)", "tasd", ("replication",)),
    "torch_save": MethodInfo("torch.save + fsync", "peer"),
    "dcp_save": MethodInfo("torch.distributed.checkpoint.save", "peer"),
    "dcp_async": MethodInfo("torch.distributed.checkpoint.async_save (stall)", "peer"),
    "nvrx_sync": MethodInfo("NVRx LocalCheckpointManager.save", "peer", ("nvrx",)),
    "nvrx_async": MethodInfo("NVRx LocalCheckpointManager.save(is_async=True) + schedule (stall)", "peer", ("nvrx",)),
    "nvrx_torch_async": MethodInfo("NVRx TorchAsyncCheckpoint.async_save (stall)", "peer", ("nvrx",)),
    "nvrx_replicate": MethodInfo("NVRx CliqueReplicationStrategy.replicate", "peer", ("nvrx", "replication")),
}


def available(names: list[str], point: Point, nvrx: bool, cuda: bool) -> tuple[list[str], dict[str, str]]:
    """Split ``names`` into those that can run at ``point`` here and {name: why not} for the rest."""
    run, skipped = [], {}
    for name in names:
        needs = METHODS[name].needs
        if "nvrx" in needs and not nvrx:
            skipped[name] = f"{nvrx_shim.DISTRIBUTION} not installed"
        elif "cuda" in needs and not cuda:
            skipped[name] = "no CUDA device"
        elif "replication" in needs and point.factor < 2:
            skipped[name] = "no replication at factor 1"
        else:
            run.append(name)
    return run, skipped


def methods_rank(rank: int, world: int, points: list[Point], root: str, names: list[list[str]],
                 repeats: int) -> list[dict]:
    """Rank function for run_ranks: time ``names[i]`` at ``points[i]``, one point after the other,
    each under a directory of its own in ``root`` (see measure.run_methods); one result per point."""
    workers, out = Workers(), []
    try:
        for i, point in enumerate(points):
            bench = RankBench(rank, world, point, Path(root) / f"point{i}", workers)
            try:
                out.append(run_methods([getattr(bench, n)() for n in names[i]], repeats, between=os.sync))
            finally:
                bench.close()
            del bench
    finally:
        workers.close()
    return out


def setup_rank(rank: int, world: int, point: Point, root: str, names: list[str], iteration: int = 1) -> None:
    """Rank function for run_ranks: save ``iteration`` once with each method in ``names`` (for
    restart and recovery runs, which load what this leaves under ``root``; a later call saves a
    later iteration, replacing the earlier one)."""
    workers = Workers()
    bench = RankBench(rank, world, point, Path(root), workers)
    bench.iteration = iteration - 1
    try:
        for name in names:
            dist.barrier()
            done = getattr(bench, name)().call()
            if done is not None and name not in ("write", "write_direct"):  # keep the raw file
                done()
    finally:
        bench.close()
        workers.close()
    os.sync()
