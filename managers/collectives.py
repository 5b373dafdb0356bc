"""Small collectives the managers use to agree: a fixed number of operations whatever the number
of files or tensors, all data exchanged as plain bytes (never pickles from peers).

Every function here is collective over ``group`` (all ranks must call it in the same order) and
works without torch.distributed initialized (a world of one). A dead peer makes the underlying
collective fail after the process group's timeout; that error propagates as it comes.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from tasd import device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_size(group: Any = None) -> tuple[int, int]:
    """(global rank, size of ``group``), (0, 1) without torch.distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size(group)


def comm_device(group: Any = None) -> torch.device:
    """The device collectives of ``group`` need: CUDA for NCCL, CPU otherwise (gloo)."""
    if is_distributed() and dist.get_backend(group) == "nccl":
        return device.default_device()
    return torch.device("cpu")


def group_timeout(group: Any = None) -> Any:
    """The timeout (a timedelta) ``group``'s collectives were created with, or None when it cannot
    be read; new groups should inherit it (``dist.new_group`` otherwise defaults to 30 minutes)."""
    if not is_distributed():
        return None
    pg = group if group is not None else dist.group.WORLD
    try:
        return pg._get_backend(comm_device(group)).options._timeout
    except Exception:  # private API: absent in some torch versions or backends
        return None


#: Longest error text a rank contributes to :func:`gather_failures` (characters).
MAX_FAILURE_TEXT = 2000

_cpu_groups: dict[Any, Any] = {}


def cpu_group(group: Any = None) -> Any:
    """tasd's own gloo process group with the members of ``group`` (the world when None): the group
    every small agreement collective of tasd runs on, so that tasd never issues work on the
    training's communicators (NCCL or gloo), never waits for the GPU, and a failure or timeout of
    its traffic cannot leave the training's groups unusable. None without torch.distributed (a
    world of one).

    Created on the first call for ``group`` and cached for the life of the process; that first call
    is collective over ``group``'s members (over the world for the world group) and must be made on
    the training thread at a point all ranks reach together (tasd makes it inside its collective
    calls: save, find_latest, load, a queue's finalize). It inherits the job's collective timeout
    (:func:`group_timeout`). Later calls are local.
    """
    if not is_distributed():
        return None
    key = group if group is not None and group is not dist.group.WORLD else None
    found = _cpu_groups.get(key)
    if found is None:
        timeout = group_timeout(group)
        if key is None:
            found = dist.new_group(backend="gloo", timeout=timeout)
        else:  # only the members call it
            found = dist.new_group(dist.get_process_group_ranks(group), backend="gloo", timeout=timeout,
                                   use_local_synchronization=True)
        _cpu_groups[key] = found
    return found


def all_reduce_max(values: list[int], group: Any = None) -> list[int]:
    """Element-wise maximum of ``values`` over the group (one all_reduce)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def all_gather_bytes(data: bytes, group: Any = None) -> list[bytes]:
    """Every rank's ``data``, in group rank order: two all_gathers (sizes, then padded bytes)."""
    if not is_distributed():
        return [bytes(data)]
    dev = comm_device(group)
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=dev)
    if data:
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return [o[:n].cpu().numpy().tobytes() for o, n in zip(out, lengths)]


def all_gather_json(obj: Any, group: Any = None) -> list[Any]:
    """:func:`all_gather_bytes` of ``obj`` as JSON (safe to decode from any peer)."""
    return [json.loads(b) for b in all_gather_bytes(json.dumps(obj).encode(), group)]


def gather_failures(error: BaseException | None, group: Any = None) -> dict[int, str]:
    """Agree on whether any rank failed: one all_reduce when none did; when some did, also their
    messages (rank -> message, each cut to MAX_FAILURE_TEXT characters). Every rank gets the
    same answer."""
    if all_reduce_max([1 if error is not None else 0], group)[0] == 0:
        return {}
    rank = rank_and_size(group)[0]
    text = None if error is None else f"{type(error).__name__}: {error}"[:MAX_FAILURE_TEXT]
    mine = {"rank": rank, "error": text}
    return {m["rank"]: m["error"] for m in all_gather_json(mine, group) if m["error"] is not None}
