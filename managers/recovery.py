"""Which checkpoint a restart loads and where lost parts come from: pure planning, no I/O, no
collectives. The managers gather what every rank holds (:class:`Advertised`), and every rank runs
the same functions on the same input, so every rank reaches the same decision.

A checkpoint is one save: the parts of one ``(iteration, save_id)``. It is loadable when every
owner rank's part of that save is held by at least one rank; parts of different saves of the same
iteration (two runs that both saved it) never combine. A part is held *verified* (its checksums
were checked by this process, or it wrote it) or *unverified* (its header checked, its data not
yet: a replica, or an older part of the rank's own). A load reads a part only where it needs it,
and reading verifies it; a part found damaged then is *excluded* and the plan is made again without
it (another holder, or an older save).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from tasd.managers.exchange import Transfer, plan_retrieval

SaveKey = tuple  # (iteration, save_id)


@dataclass
class Advertised:
    """What one rank holds of one save: owner ranks of its verified and of its unverified parts,
    and the replication settings recorded in them."""

    owners: list[int]
    replication: dict | None
    unverified: list[int] = field(default_factory=list)


def encode_adverts(parts: dict[SaveKey, Advertised]) -> list[list[Any]]:
    """``parts`` as JSON-able rows ``[iteration, save_id, verified owners, unverified owners,
    replication]``."""
    return [[it, sid, a.owners, a.unverified, a.replication] for (it, sid), a in sorted(parts.items())]


#: A part known to be damaged: (iteration, save_id, holder rank, owner rank).
BadPart = tuple


@dataclass
class Latest:
    """The newest loadable checkpoint (``iteration`` -1 when there is none): ``holders[owner]`` are
    the ranks holding that owner's part of it; ``unrecoverable`` is the newest newer save that
    cannot be loaded, as (iteration, owners whose part nobody holds), or None."""

    iteration: int = -1
    save_id: str | None = None
    replication: dict | None = None
    holders: dict[int, list[int]] = field(default_factory=dict)
    unrecoverable: tuple[int, list[int]] | None = None
    verified: dict[int, set[int]] = field(default_factory=dict)  # owner -> ranks holding it verified


def choose_latest(adverts_by_rank: Iterable[list[list[Any]]], world_size: int,
                  excluded: Iterable[BadPart] = ()) -> Latest:
    """The newest complete save from every rank's rows (:func:`encode_adverts`, in rank order),
    leaving out the ``excluded`` parts. Ties between complete saves of one iteration go to the
    larger save id (the same on every rank)."""
    bad = {(int(it), str(sid), int(h), int(o)) for it, sid, h, o in excluded}
    holders: dict[SaveKey, dict[int, list[int]]] = {}
    verified: dict[SaveKey, dict[int, set[int]]] = {}
    settings: dict[SaveKey, Any] = {}
    for rank, rows in enumerate(adverts_by_rank):
        for it, sid, owners, unverified, repl in rows:
            key = (int(it), str(sid))
            for owner, checked in [(o, True) for o in owners] + [(o, False) for o in unverified]:
                if (key[0], key[1], rank, int(owner)) in bad:
                    continue
                holders.setdefault(key, {}).setdefault(int(owner), []).append(rank)
                if checked:
                    verified.setdefault(key, {}).setdefault(int(owner), set()).add(rank)
            settings.setdefault(key, repl)
    everyone = set(range(world_size))
    complete = [key for key, by_owner in holders.items() if set(by_owner) >= everyone]
    best = max(complete, default=None)
    latest = (Latest() if best is None else
              Latest(best[0], best[1], settings[best], holders[best], verified=verified.get(best, {})))
    newer = [key for key in holders if key[0] > latest.iteration]
    if newer:
        worst = max(newer, key=lambda k: (k[0], len(holders[k]), k[1]))
        latest.unrecoverable = (worst[0], sorted(everyone - set(holders[worst])))
    return latest


def plan_recovery(latest: Latest, world_size: int) -> tuple[set[int], list[Transfer]]:
    """(ranks that lack their own part of ``latest``, who sends which part to whom: holders of a
    verified copy first)."""
    needs = {r: [r] for r in range(world_size) if r not in latest.holders.get(r, ())}
    return set(needs), plan_retrieval(needs, latest.holders, latest.verified)
