"""tasd's own gloo groups among a few ranks, created by their members only.

Every collective tasd makes runs on groups of at most a few dozen ranks (a tree of agreement
groups, replication peers), never on a world-size group: a gloo group connects each member to
every other one when it is created, so a world group costs each rank W connections (100,000 at
100k ranks) and every all_reduce on it W ring hops.

Why not ``dist.new_group``: without ``use_local_synchronization`` every rank of the world must call
it for every group (O(W) calls per rank to create W/F groups); with it, torch names the group from
its ranks *and the number of groups the calling process has created so far*, so members that
created different numbers of groups before (a tree leader and a leaf, say) compute different names
and wait for each other forever. A :class:`Subgroup` is a ``ProcessGroupGloo`` built directly on a
prefix of the job's store, under a name made of its purpose and its ranks, the same on every
member whatever else it created. Its operations are addressed by global rank.

Creating groups (:func:`subgroups`) is collective over the members of each group only, and each
creation blocks until all its members arrive; a rank creates all the groups it needs at once,
concurrently (each on a client of the job's store of its own), so that no order between
overlapping groups can deadlock and the cost is one connection round, not a chain through the
world. Groups are cached for the life of the default
process group. Nothing here touches CUDA.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_OPS = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "bor": dist.ReduceOp.BOR, "sum": dist.ReduceOp.SUM}
#: Bound on waiting for a group's members to arrive when the job's timeout cannot be read.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class Subgroup:
    """A gloo group of tasd's own over ``ranks`` (global ranks, ascending), seen from one member.
    Build with :func:`subgroups`. Operations take and address global ranks, run on CPU tensors,
    and fail (RuntimeError from gloo) when a member dies or does not take part within
    ``timeout``. Not thread-safe for concurrent collectives: one user thread per group at a time
    (point-to-point operations with distinct tags may overlap)."""

    def __init__(self, purpose: str, ranks: Sequence[int], timeout: datetime.timedelta):
        self.purpose = purpose
        self.ranks = tuple(ranks)
        self.rank = dist.get_rank()
        self.index = self.ranks.index(self.rank)
        self.timeout = timeout
        self.name = name(purpose, self.ranks)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._threads = 1
        options._devices = [dist.ProcessGroupGloo.create_default_device()]
        # A store client of its own: a client blocks while it waits for a key, so groups created
        # concurrently on one client would wait for each other's keys.
        store = dist.PrefixStore(f"{self.name}/", dist.distributed_c10d._get_default_store().clone())
        self.pg = dist.ProcessGroupGloo(store, self.index, len(self.ranks), options)

    def __repr__(self) -> str:
        shown = list(self.ranks[:8]) + (["..."] if len(self.ranks) > 8 else [])
        return f"Subgroup({self.purpose!r}, ranks={shown}, size={len(self.ranks)})"

    @property
    def size(self) -> int:
        return len(self.ranks)

    def all_reduce(self, t: torch.Tensor, op: str) -> None:
        """Reduce ``t`` (a CPU tensor) in place over the group with ``op`` (max, min, bor, sum)."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = _OPS[op]
        opts.timeout = self.timeout
        self.pg.allreduce([t], opts).wait()

    def broadcast(self, t: torch.Tensor, root: int) -> None:
        """Overwrite ``t`` on every member with global rank ``root``'s ``t``."""
        opts = dist.BroadcastOptions()
        opts.rootRank = self.ranks.index(root)
        opts.rootTensor = 0
        opts.timeout = self.timeout
        self.pg.broadcast([t], opts).wait()

    def send(self, t: torch.Tensor, dst: int, tag: int) -> Any:
        """Post a send of ``t`` (contiguous, CPU) to global rank ``dst``; returns the work."""
        return self.pg.send([t], self.ranks.index(dst), tag)

    def recv(self, t: torch.Tensor, src: int, tag: int) -> Any:
        """Post a receive into ``t`` from global rank ``src``; returns the work."""
        return self.pg.recv([t], self.ranks.index(src), tag)


def name(purpose: str, ranks: Sequence[int]) -> str:
    """The store prefix of the group ``purpose`` over ``ranks``: the same on every member."""
    digest = hashlib.sha1(",".join(map(str, ranks)).encode(), usedforsecurity=False).hexdigest()[:20]
    return f"tasd/{purpose}/{len(ranks)}/{digest}"


_cache: dict[tuple[str, tuple[int, ...]], Subgroup] = {}
_trees: dict[tuple[Sequence[int], int], "GroupTree"] = {}
_cache_owner: list[Any] = [None]  # the default process group the cache belongs to


def _same_world() -> None:
    """Forget cached groups and trees of an earlier world (destroy_process_group, then init)."""
    owner = dist.distributed_c10d._get_default_group()
    if _cache_owner[0] is not owner:
        _cache.clear()
        _trees.clear()
        _cache_owner[0] = owner


def backend_timeout(pg: Any) -> datetime.timedelta | None:
    """The timeout torch process group ``pg``'s CPU backend was created with, or None when it
    cannot be read (private API, or a group without a CPU backend: NCCL only)."""
    try:
        return pg._get_backend(torch.device("cpu")).options._timeout
    except Exception:
        return None


def job_timeout() -> datetime.timedelta:
    """The default process group's collective timeout (new groups inherit it), or
    :data:`DEFAULT_TIMEOUT` when it cannot be read."""
    timeout = backend_timeout(dist.distributed_c10d._get_default_group())
    if timeout is None:
        try:
            return dist.distributed_c10d._get_pg_default_timeout()  # type: ignore[attr-defined]
        except Exception:
            return DEFAULT_TIMEOUT
    return timeout


def subgroups(specs: Iterable[tuple[str, Sequence[int]]], timeout: datetime.timedelta | None = None) -> list[Subgroup]:
    """The groups ``(purpose, ranks)`` this rank is a member of, created where not cached yet.

    Collective over the members of each group: every member asks for the group (with the same
    purpose and ranks) at about the same time; a group is created once per process. Groups to
    create are created concurrently, each waiting up to ``timeout`` (default: the job's
    collective timeout) for its members. Raises ValueError when this rank is not in ``ranks`` or
    the ranks are not distinct and ascending, and RuntimeError (from gloo) when a member does not
    arrive in time.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tasd subgroups need torch.distributed to be initialized")
    _same_world()
    rank = dist.get_rank()
    keys = []
    for purpose, ranks in specs:
        ranks = tuple(int(r) for r in ranks)
        if rank not in ranks or list(ranks) != sorted(set(ranks)):
            raise ValueError(f"subgroup {purpose!r}: rank {rank} must be one of distinct ascending ranks, got "
                             f"{list(ranks[:16])}")
        keys.append((purpose, ranks))
    missing = list(dict.fromkeys(k for k in keys if k not in _cache))
    if missing:
        timeout = timeout or job_timeout()
        if len(missing) == 1:
            made = [Subgroup(*missing[0], timeout)]
        else:
            with ThreadPoolExecutor(len(missing), thread_name_prefix="tasd-subgroup") as pool:
                made = list(pool.map(lambda k: Subgroup(*k, timeout), missing))
        for k, g in zip(missing, made):
            _cache[k] = g
        logger.debug("rank %d created %d tasd group(s): %s", rank, len(made), made)
    return [_cache[k] for k in keys]


#: Largest agreement group. A gloo all_reduce walks a ring of its members (2(f-1) hops) and a tree
#: of them takes ceil(log_f W) levels up and one fewer down: f=8 costs ~120 hops at 100k ranks (f=64:
#: ~500), level 0 is typically one node, and creating groups costs the store ~8 gets per rank.
TREE_FANOUT = 8


def tree_blocks(position: int, n: int, fanout: int) -> tuple[int, list[tuple[int, tuple[int, ...]]]]:
    """The shape of a :class:`GroupTree` over ``n`` ranks, pure: (number of levels, and for the
    member at ``position`` each level it is in with that level's group as member positions,
    lowest level first). Level l holds the positions divisible by ``fanout**l``, cut into
    consecutive blocks of ``fanout``."""
    levels = 0
    while fanout ** levels < n:
        levels += 1
    mine = []
    for level in range(levels):
        step = fanout ** level
        if position % step:
            break
        start = position - position % (step * fanout)
        mine.append((level, tuple(range(start, min(start + step * fanout, n), step))))
    return levels, mine


class GroupTree:
    """Reductions over ``ranks`` (global ranks, ascending) through levels of groups of at most
    ``fanout`` members, for agreements at any world size: level 0 cuts the ranks (by position)
    into blocks of ``fanout``; level l joins the first member of each level-(l-1) block, ``fanout``
    at a time, up to one top group. An all_reduce reduces up the levels and broadcasts the result
    down: at most ``2 * levels - 1`` operations on groups of <= ``fanout`` ranks, and each rank
    is a member of one group per level it reaches (most ranks: one).

    Building it creates this rank's groups (:func:`subgroups`): collective over ``ranks`` (every
    member builds the same tree). Use it from one thread at a time (tasd: the training thread).
    An operation fails (RuntimeError from gloo) when a member dies or does not take part within
    the timeout; the tree is then unusable (as any gloo group after a timeout).
    """

    def __init__(self, ranks: Sequence[int], fanout: int | None = None):
        self.ranks = ranks if isinstance(ranks, range) else tuple(ranks)  # the world: a range, O(1)
        self.fanout = fanout = TREE_FANOUT if fanout is None else int(fanout)
        if fanout < 2:
            raise ValueError(f"GroupTree fanout must be >= 2, got {fanout}")
        self.rank = dist.get_rank()
        self.index = p = self.ranks.index(self.rank)
        self.levels, self._mine = tree_blocks(p, len(self.ranks), fanout)
        specs = [(f"agree{fanout}/L{level}", [self.ranks[q] for q in members])
                 for level, members in self._mine if len(members) > 1]
        made = iter(subgroups(specs)) if specs else iter(())
        self._groups = [next(made) if len(m) > 1 else None for _, m in self._mine]
        self.timeout = self._groups[0].timeout if self._groups and self._groups[0] is not None else job_timeout()

    def __repr__(self) -> str:
        return f"GroupTree(size={len(self.ranks)}, fanout={self.fanout}, levels={self.levels})"

    @property
    def size(self) -> int:
        return len(self.ranks)

    def all_reduce(self, t: torch.Tensor, op: str) -> None:
        """Reduce ``t`` (a CPU tensor) in place over every member with ``op`` (max, min, bor, sum).
        Collective over the tree's ranks."""
        for g in self._groups:  # up: each level this rank reaches
            if g is not None:
                g.all_reduce(t, op)
        top = len(self._mine) - 1  # the highest level this rank is in
        for i in range(min(top, self.levels - 2), -1, -1):  # down: from the block's first member
            g = self._groups[i]
            if g is not None:
                g.broadcast(t, self.ranks[self._mine[i][1][0]])



def group_tree(ranks: Sequence[int], fanout: int | None = None) -> GroupTree:
    """The cached :class:`GroupTree` over ``ranks`` (built on first use: collective over them)."""
    fanout = TREE_FANOUT if fanout is None else fanout
    key = (ranks if isinstance(ranks, range) else tuple(ranks), fanout)
    _same_world()
    tree = _trees.get(key)
    if tree is None:
        tree = _trees[key] = GroupTree(ranks, fanout)
    return tree
