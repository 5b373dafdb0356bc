"""Loads timed in fresh processes, as after a restart: ``tasd bench``'s restart and recovery runs.

Within one process a loop of loads gets memory back from the previous iteration already faulted in
(allocator reuse), which a restarted job never has, so every timed load here is one call of
:func:`load_rank` in new rank processes (tasd.launch.run_ranks). The caller evicts the files from
the page cache first (:func:`tasd.bench.measure.evict`, best effort), and for a recovery removes
the lost rank's directories. A load is timed from the constructor of the manager (where there is
one) to the loaded state dict: what a restarted job calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from tasd.bench import nvrx_shim
from tasd.bench.measure import timed_once
from tasd.bench.methods import CHUNK, SESSION, Point, first_tensor, newest_dcp, nvrx_strategy, tasd_strategy
from tasd.managers import LocalCheckpointManager


@dataclass(frozen=True)
class Load:
    """One fresh-process load: ``method`` (a key of :data:`LOADS`) of what setup saved at ``point``
    under ``root``; ``lost``: the rank whose directories were removed (recovery), or None."""

    method: str
    point: Point
    root: str
    lost: int | None = None


def read_file(path: Path, nbytes: int) -> np.ndarray:
    """Read ``path`` whole into a freshly allocated buffer with 64 MiB readv calls."""
    buf = np.empty(nbytes, np.uint8)
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while got < len(mv):
            n = os.readv(fd, [mv[got:got + CHUNK]])
            if n == 0:
                raise EOFError(f"{path} is shorter than {nbytes} bytes")
            got += n
    finally:
        os.close(fd)
    return buf


def _raw_path(root: Path, rank: int) -> Path:
    return root / "write" / str(rank) / "state.bin"


def _read(rank: int, load: Load) -> Callable[[], Any]:
    path = _raw_path(Path(load.root), rank)
    return lambda: read_file(path, load.point.nbytes)


def _read_send(rank: int, load: Load) -> Callable[[], Any]:
    """The least a recovery must do: the lost rank's holder reads a part of the same size (its own
    raw file) into fresh memory and sends it; the lost rank receives it into fresh memory."""
    holder = tasd_strategy_holder(load)
    group = dist.new_group(backend="gloo")

    def run() -> Any:
        if rank == holder:
            data = torch.from_numpy(read_file(_raw_path(Path(load.root), rank), load.point.nbytes))
            dist.send(data, load.lost, group=group)
            return data
        if rank == load.lost:
            data = torch.empty(load.point.nbytes, dtype=torch.uint8)
            dist.recv(data, holder, group=group)
            return data
        return None
    return run


def tasd_strategy_holder(load: Load) -> int:
    """The first holder of the lost rank's part under clique placement (pure)."""
    from tasd.managers.replication import parse_group_sequence
    group = next(g for g in parse_group_sequence(load.point.jump, load.point.factor, load.point.world)
                 if load.lost in g)
    return next(r for r in group if r != load.lost)


def _tasd(rank: int, load: Load, subdir: str = "tasd") -> Callable[[], Any]:
    def run() -> Any:
        mgr = LocalCheckpointManager(Path(load.root) / subdir, SESSION, tasd_strategy(load.point))
        if mgr.find_latest() < 0:
            raise RuntimeError(f"rank {rank}: tasd found no checkpoint under {load.root}")
        return mgr.load()[0].state_dict
    return run


def _torch_load(rank: int, load: Load) -> Callable[[], Any]:
    paths = sorted((Path(load.root) / "torch" / str(rank)).glob("state_*.pt"))
    return lambda: torch.load(paths[-1], weights_only=True)


def _dcp_load(rank: int, load: Load) -> Callable[[], Any]:
    import torch.distributed.checkpoint as dcp

    path = newest_dcp(Path(load.root))
    if path is None:
        raise RuntimeError(f"rank {rank}: no DCP checkpoint under {Path(load.root) / 'dcp'}")

    def run() -> Any:  # DCP loads in place: the destination tensors are allocated in the clock
        sd = {f"rank{rank}.layer{i:05d}": torch.empty(load.point.numel) for i in range(load.point.n_tensors)}
        dcp.load(sd, checkpoint_id=str(path))
        return sd
    return run


def _nvrx(rank: int, load: Load) -> Callable[[], Any]:
    nvrx_shim.apply()
    from nvidia_resiliency_ext.checkpointing.local.ckpt_managers.local_manager import LocalCheckpointManager as M

    def run() -> Any:
        mgr = M(Path(load.root) / "nvrx", SESSION, nvrx_strategy(load.point))
        if mgr.find_latest() < 0:
            raise RuntimeError(f"rank {rank}: NVRx found no checkpoint under {load.root}")
        return mgr.load()[0].state_dict
    return run


#: name -> (label, kind, factory of the timed function on one rank).
LOADS: dict[str, tuple[str, str, Callable[[int, Load], Callable[[], Any]]]] = {
    "read": ("read of the own part's bytes into fresh memory", "limit", _read),
    "read_send": ("holder reads the part, sends it; lost rank receives (fresh memory)", "limit", _read_send),
    "tasd_load": ("tasd fresh manager: find_latest + load", "tasd", _tasd),
    "tasd_load_direct": ("tasd fresh manager: find_latest + load, parts written with O_DIRECT", "tasd",
                         lambda rank, load: _tasd(rank, load, "tasd_direct")),
    "torch_load": ("torch.load (weights_only)", "peer", _torch_load),
    "dcp_load": ("torch.distributed.checkpoint.load (into new tensors)", "peer", _dcp_load),
    "nvrx_load": ("NVRx fresh manager: find_latest + load", "peer", _nvrx),
}
#: What setup must save for each load (methods of tasd.bench.methods.RankBench).
SAVED_BY = {"read": "write", "read_send": "write", "tasd_load": "tasd_sync", "tasd_load_direct": "tasd_sync_direct", "torch_load": "torch_save",
            "dcp_load": "dcp_save", "nvrx_load": "nvrx_sync"}


def load_rank(rank: int, world: int, load: Load, probe: bool) -> dict:
    """Rank function for run_ranks: time one load (collective), with memory/disk probes when
    ``probe``. When probed, the loaded state is checked against what setup saved."""
    fn = LOADS[load.method][2](rank, load)
    if not probe:
        return timed_once(fn, probe_memory=False)
    holder: dict[str, Any] = {}

    def keep() -> Any:
        holder["out"] = fn()
        return None
    out = timed_once(keep, probe_memory=True)
    _check(rank, load, holder.pop("out"))
    return out


def _check(rank: int, load: Load, loaded: Any) -> None:
    """Raise AssertionError when a loaded state dict's first tensor is not what rank ``rank`` saved."""
    if load.method in ("read", "read_send"):
        return
    got = loaded[f"rank{rank}.layer00000"]
    if not torch.equal(got.cpu(), first_tensor(load.point, rank)):
        raise AssertionError(f"rank {rank}: {load.method} returned other data than was saved")
