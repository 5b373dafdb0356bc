"""Which checkpoint a restart loads, and who sends each lost part, with a fixed number of
fixed-size collectives whatever the world size W.

Every rank holds parts of some saves (a save is ``(iteration, save id)``; a part is one owner
rank's state of one save), some verified (read whole or written by this process), some not (only
their header checked). The protocol, in rounds (every rank runs the same rounds, since each
decision depends only on reduced values):

1. **candidate**: the newest save any rank holds below the previous candidate: one MAX all_reduce
   of the iteration, one of the save id among the holders of that iteration (one int64 each);
2. **census**: one BOR all_reduce of two W-bit bitmaps (``ceil(W / 64)`` int64 words each) and a
   flag word: owners whose part of the candidate some rank holds, owners that hold their own
   part, and whether any rank holds a part saved with other replication settings. The candidate is
   chosen when the first bitmap is full; otherwise the first incomplete candidate is reported as
   unrecoverable (its missing owners) and the next round looks below it. A rank holds parts of a
   few saves at most (older ones are removed after each save), so rounds are few.
3. **holders**: for the owners that lack their own part (known to every rank from the census),
   one MIN all_reduce of one int64 per such owner naming its sender: holders of a verified copy
   first, then the holder nearest after the owner in rank order (ring and clique placements then
   spread the senders over distinct ranks).

Bytes per rank: 16 + W/4 + 8 per lost owner; Python work per rank: one pass over the census
bitmaps with numpy, and its own parts. Collectives go through a ``reduce(values, op)`` function
(``op`` in "max", "min", "bor"; ``values`` a 1-D int64 tensor, returned reduced over every rank),
so that :mod:`tasd.bench.scale` can run the same code against a simulated world of a million ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from tasd.managers.collectives import bitmap_ranks, rank_bitmap
from tasd.managers.exchange import Transfer

#: ``reduce(values, op)``: ``values`` (1-D int64) reduced over every rank with ``op``.
Reduce = Callable[[torch.Tensor, str], torch.Tensor]
SaveKey = tuple  # (iteration, save id as an int < 2**62)

NONE = -1
_NO_HOLDER = 2**63 - 1
_UNVERIFIED = 1 << 40  # added to a holder's MIN key: verified copies win
_FLAG_MISMATCH = 1  # bit of the census's flag word


@dataclass
class Holding:
    """What this rank holds of one save: owner -> verified, and the replication settings the
    parts record."""

    owners: dict[int, bool]
    replication: dict | None


@dataclass
class Chosen:
    """The outcome: the newest loadable save (``iteration`` -1 when none), the owners that lack
    their own part of it and the transfers that bring them one, the newest newer save that cannot
    be loaded (iteration and the owners nobody holds), and whether some rank holds a part of the
    chosen save recorded with other replication settings than its own (``mismatch``)."""

    iteration: int = NONE
    save_id: int = NONE
    needs: list[int] = field(default_factory=list)
    plan: list[Transfer] = field(default_factory=list)
    unrecoverable: tuple[int, list[int]] | None = None
    mismatch: bool = False
    replication: dict | None = field(default=None, compare=False)  # as this rank's parts record them (None: holds none)


def _below(holdings: Mapping[SaveKey, Holding], bound: SaveKey | None) -> list[SaveKey]:
    return [k for k in holdings if bound is None or k < bound]


def choose(holdings: Mapping[SaveKey, Holding], rank: int, world: int, replication: dict | None,
           reduce: Reduce, max_rounds: int = 64) -> Chosen:
    """Run the protocol (collective through ``reduce``: every rank calls it with its own
    ``holdings``, damaged parts already left out). ``replication``: this rank's settings, compared
    with what its parts of the chosen save record. Returns the same decision on every rank."""
    bound: SaveKey | None = None
    unrecoverable = None
    for _ in range(max_rounds):
        keys = _below(holdings, bound)
        it = int(reduce(torch.tensor([max((k[0] for k in keys), default=NONE)], dtype=torch.int64), "max")[0])
        if it == NONE:
            return Chosen(unrecoverable=unrecoverable)
        sid = int(reduce(torch.tensor([max((k[1] for k in keys if k[0] == it), default=NONE)],
                                      dtype=torch.int64), "max")[0])
        key = (it, sid)
        mine = holdings.get(key)
        held = rank_bitmap(mine.owners if mine is not None else [], world)
        own = rank_bitmap([rank] if mine is not None and rank in mine.owners else [], world)
        flag = _FLAG_MISMATCH if mine is not None and mine.replication != replication else 0
        census = reduce(torch.cat([held, own, torch.tensor([flag], dtype=torch.int64)]), "bor")
        words = held.numel()
        missing = bitmap_ranks(census[:words], world, present=False)
        if missing:
            if unrecoverable is None:
                unrecoverable = (it, missing)
            bound = key
            continue
        needs = bitmap_ranks(census[words:2 * words], world, present=False)
        plan = _holders(mine, rank, world, needs, reduce)
        return Chosen(it, sid, needs, plan, unrecoverable, bool(int(census[-1]) & _FLAG_MISMATCH),
                      None if mine is None else mine.replication)
    raise RuntimeError(f"find_latest: no decision after {max_rounds} rounds (more saves held than rounds allowed)")


def _holders(mine: Holding | None, rank: int, world: int, needs: list[int], reduce: Reduce) -> list[Transfer]:
    """Round 3: one MIN all_reduce naming a sender for each owner in ``needs``."""
    if not needs:
        return []
    keys = torch.full((len(needs),), _NO_HOLDER, dtype=torch.int64)
    if mine is not None:
        for i, owner in enumerate(needs):
            verified = mine.owners.get(owner)
            if verified is not None and owner != rank:
                keys[i] = (0 if verified else _UNVERIFIED) + (rank - owner) % world
    keys = reduce(keys, "min")
    plan = []
    for owner, k in zip(needs, keys.tolist()):
        if k != _NO_HOLDER:  # cannot happen: the census found a holder for every owner
            plan.append(Transfer(owner, (owner + k % _UNVERIFIED) % world, owner))
    return plan
