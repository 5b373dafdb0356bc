"""Small collectives the managers use to agree: a fixed number of operations whatever the number
of files or tensors, all data exchanged as plain bytes (never pickles from peers).

Every function here is collective over ``group`` (all ranks must call it in the same order) and
works without torch.distributed initialized (a world of one). A dead peer makes the underlying
collective fail after the process group's timeout; that error propagates as it comes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
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


_OPS = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "bor": dist.ReduceOp.BOR}


def all_reduce(values: torch.Tensor, op: str, group: Any = None) -> torch.Tensor:
    """``values`` (a 1-D integer tensor) reduced element-wise over the group with ``op`` ("max",
    "min" or "bor": bitwise or), one all_reduce; returned as a new CPU tensor."""
    t = values.to(comm_device(group), copy=True)
    if is_distributed():
        dist.all_reduce(t, op=_OPS[op], group=group)
    return t.cpu()


def all_reduce_max(values: list[int], group: Any = None) -> list[int]:
    """Element-wise maximum of ``values`` over the group (one all_reduce)."""
    return all_reduce(torch.tensor(values, dtype=torch.int64), "max", group).tolist()


def rank_bitmap(ranks: Any, world: int) -> torch.Tensor:
    """A W-bit bitmap (``ceil(W / 64)`` int64 words) with the bits of ``ranks`` set."""
    bits = np.zeros((world + 63) // 64 * 64, dtype=np.uint8)
    bits[np.fromiter(ranks, dtype=np.int64)] = 1
    return torch.from_numpy(np.packbits(bits, bitorder="little").view(np.int64))


def bitmap_ranks(words: torch.Tensor, world: int, present: bool = True) -> list[int]:
    """The ranks whose bit is set in ``words`` (from :func:`rank_bitmap`), ascending; with
    ``present=False`` those whose bit is clear."""
    bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[:world]
    return np.flatnonzero(bits if present else bits == 0).tolist()


#: How many failed ranks' messages :func:`gather_failures` carries (the others are named only).
MAX_FAILURE_REPORTS = 4
#: What :class:`Failures` says for a failed rank whose message was not gathered.
NOT_GATHERED = "(message not gathered)"


class Failures(dict):
    """rank -> message of every failed rank (:data:`NOT_GATHERED` beyond the first
    MAX_FAILURE_REPORTS), with a short description for error messages."""

    def describe(self, shown: int = MAX_FAILURE_REPORTS) -> str:
        """"rank(s) [1, 5] (2 in all): rank 1: ...; rank 5: ..." with at most ``shown`` ranks
        listed and quoted."""
        ranks = sorted(self)
        listed = ", ".join(map(str, ranks[:shown])) + (", ..." if len(ranks) > shown else "")
        quoted = "; ".join(f"rank {r}: {self[r]}" for r in ranks[:shown] if self[r] != NOT_GATHERED)
        return f"rank(s) [{listed}] ({len(ranks)} in all): {quoted}"


def gather_failures(error: BaseException | None, group: Any = None) -> Failures:
    """Agree on whether any rank failed: one all_reduce when none did; when some did, which ones
    (a W-bit bitmap, one BOR all_reduce) and the messages of the lowest MAX_FAILURE_REPORTS of them
    (each cut to MAX_FAILURE_TEXT bytes of UTF-8, one MAX all_reduce of as many slots), so that the
    cost does not grow with the number of failed ranks or the length of their messages. Every rank
    gets the same answer."""
    if all_reduce_max([1 if error is not None else 0], group)[0] == 0:
        return Failures()
    rank, world = rank_and_size(group)
    failed = bitmap_ranks(all_reduce(rank_bitmap([rank] if error is not None else [], world), "bor", group), world)
    quoted = failed[:MAX_FAILURE_REPORTS]
    slots = torch.zeros((len(quoted), MAX_FAILURE_TEXT), dtype=torch.uint8)
    if rank in quoted:
        text = f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:MAX_FAILURE_TEXT]
        slots[quoted.index(rank), :len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    slots = all_reduce(slots.view(-1), "max", group).view(len(quoted), MAX_FAILURE_TEXT)
    out = Failures({r: NOT_GATHERED for r in failed})
    for r, row in zip(quoted, slots.numpy()):
        out[r] = bytes(row).rstrip(b"\0").decode("utf-8", "replace")
    return out
