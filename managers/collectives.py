"""Small collectives the managers use to agree: a fixed number of operations whatever the number
of files or tensors, all data exchanged as plain bytes (never pickles from peers).

Every reducing function here is collective over ``group`` (an :func:`agreement_group`: all its
ranks must call it in the same order; None: a world of one, as without torch.distributed). A dead
peer makes the underlying collective fail after the group's timeout; that error propagates as it
comes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tasd.managers.subgroups import GroupTree, Subgroup, backend_timeout, group_tree


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_size(group: Any = None) -> tuple[int, int]:
    """(global rank, size of ``group``: a torch process group, an :func:`agreement_group` or
    None for the world), (0, 1) without torch.distributed."""
    if not is_distributed():
        return 0, 1
    if isinstance(group, (GroupTree, Subgroup)):
        return group.rank, group.size
    return dist.get_rank(), dist.get_world_size(group)


def group_timeout(group: Any = None) -> Any:
    """The timeout (a timedelta) ``group``'s collectives were created with (a torch process group,
    an :func:`agreement_group`, or None for the world), or None when it cannot be read."""
    if not is_distributed():
        return None
    if isinstance(group, (GroupTree, Subgroup)):
        return group.timeout
    return backend_timeout(group if group is not None else dist.group.WORLD)


#: Longest error text a rank contributes to :func:`gather_failures` (characters).
MAX_FAILURE_TEXT = 2000


def agreement_group(group: Any = None) -> GroupTree | None:
    """The groups every agreement of tasd runs on, for the members of ``group`` (a torch process
    group; None: the world): a :class:`~tasd.managers.subgroups.GroupTree` of tasd's own gloo
    groups of at most ``subgroups.TREE_FANOUT`` ranks, so that tasd never issues work on the
    training's communicators (NCCL or gloo), never waits for the GPU, a failure or timeout of its
    traffic cannot leave the training's groups unusable, and no rank connects to more than a few
    dozen peers or pays a ring of W hops. None without torch.distributed (a world of one).

    Built on the first call for ``group``'s members and cached for the life of the process; that
    first call is collective over them and must be made on the training thread at a point they
    all reach together (tasd makes it inside its collective calls: save, find_latest, load, a
    queue's finalize). Its groups inherit the job's collective timeout. Later calls are local.
    """
    if not is_distributed():
        return None
    if group is None or group is dist.group.WORLD:
        ranks: Any = range(dist.get_world_size())
    else:
        ranks = sorted(dist.get_process_group_ranks(group))
    return group_tree(ranks)


def all_reduce(values: torch.Tensor, op: str, group: GroupTree | None = None) -> torch.Tensor:
    """``values`` (a 1-D integer tensor) reduced element-wise over ``group`` (from
    :func:`agreement_group`; None: a world of one) with ``op`` ("max", "min" or "bor": bitwise
    or); returned as a new CPU tensor."""
    t = values.to("cpu", copy=True)
    if group is not None:
        group.all_reduce(t, op)
    return t


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


def gather_failures(error: BaseException | None, group: GroupTree | None = None) -> Failures:
    """Agree on whether any rank of ``group`` (from :func:`agreement_group`) failed: one all_reduce
    when none did; when some did, which ones (a bitmap over the group's members, one BOR
    all_reduce) and the messages of the lowest MAX_FAILURE_REPORTS of them (each cut to
    MAX_FAILURE_TEXT bytes of UTF-8, one MAX all_reduce of as many slots), so that the cost does
    not grow with the number of failed ranks or the length of their messages. Every rank gets the
    same answer, keyed by global rank."""
    if all_reduce_max([1 if error is not None else 0], group)[0] == 0:
        return Failures()
    members = group.ranks if group is not None else (0,)
    me, n = (group.index if group is not None else 0), len(members)
    failed = bitmap_ranks(all_reduce(rank_bitmap([me] if error is not None else [], n), "bor", group), n)
    quoted = failed[:MAX_FAILURE_REPORTS]
    slots = torch.zeros((len(quoted), MAX_FAILURE_TEXT), dtype=torch.uint8)
    if me in quoted:
        text = f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:MAX_FAILURE_TEXT]
        slots[quoted.index(me), :len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    slots = all_reduce(slots.view(-1), "max", group).view(len(quoted), MAX_FAILURE_TEXT)
    out = Failures({members[p]: NOT_GATHERED for p in failed})
    for p, row in zip(quoted, slots.numpy()):
        out[members[p]] = bytes(row).rstrip(b"\0").decode("utf-8", "replace")
    return out
