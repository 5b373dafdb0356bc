"""The fixed-size find_latest protocol (tasd.managers.recovery), every rank a thread of this process
reducing through a barrier: the decisions, and that every rank reaches the same one."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tasd.managers.recovery import Holding, choose
from tasd.managers.exchange import Transfer

OPS = {"max": lambda a: a.max(0), "min": lambda a: a.min(0), "bor": lambda a: np.bitwise_or.reduce(a, 0)}


class ThreadWorld:
    """``world`` ranks as threads; ``reduce`` is a real reduction over what every rank passed."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world
        self.calls: list[list[tuple[str, int]]] = [[] for _ in range(world)]

    def reducer(self, rank: int):
        def reduce(values: torch.Tensor, op: str) -> torch.Tensor:
            self.calls[rank].append((op, values.numel()))
            self.slots[rank] = values.numpy().copy()
            self.barrier.wait()
            out = torch.from_numpy(OPS[op](np.stack(self.slots)))
            self.barrier.wait()
            return out
        return reduce

    def run(self, holdings_of, replication=None):
        out = [None] * self.world
        errors = []

        def main(rank):
            try:
                out[rank] = choose(holdings_of(rank), rank, self.world, replication, self.reducer(rank))
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert all(o == out[0] for o in out), "every rank reaches the same decision"
        return out[0]


def ring(world, factor, saves, lost=(), verified=True, settings=None):
    """Holdings of a ring placement: rank r holds its own part and those of r-1 .. r-F+1, of every
    save in ``saves``; ``lost`` ranks hold nothing."""
    def of(rank):
        if rank in lost:
            return {}
        owners = {(rank - k) % world: (verified or k == 0) for k in range(factor)}
        return {key: Holding(dict(owners), settings) for key in saves}
    return of


def test_the_newest_complete_save_is_chosen_and_nothing_moves_when_nobody_lost_a_part():
    chosen = ThreadWorld(8).run(ring(8, 2, [(3, 7), (5, 9)]))
    assert (chosen.iteration, chosen.save_id) == (5, 9)
    assert chosen.needs == [] and chosen.plan == [] and chosen.unrecoverable is None and not chosen.mismatch


def test_lost_ranks_get_their_part_from_the_nearest_holder_after_them():
    chosen = ThreadWorld(8).run(ring(8, 3, [(5, 9)], lost={2, 5}))
    assert chosen.iteration == 5 and chosen.needs == [2, 5]
    assert chosen.plan == [Transfer(2, 3, 2), Transfer(5, 6, 5)]


def test_verified_copies_are_preferred_over_nearer_unverified_ones():
    def holdings(rank):
        h = ring(6, 3, [(5, 9)], lost={0}, verified=False)(rank)
        if rank == 2:
            h[(5, 9)].owners[0] = True  # rank 2 read rank 0's replica whole
        return h
    chosen = ThreadWorld(6).run(holdings)
    assert chosen.plan == [Transfer(0, 2, 0)], "rank 1 is nearer, but only rank 2's copy is verified"


def test_an_incomplete_newer_save_is_reported_and_an_older_complete_one_chosen():
    def holdings(rank):  # save (6, 1) was written by ranks 0-3 only: owners 4-7 have it nowhere
        h = ring(8, 1, [(5, 9)])(rank)
        if rank < 4:
            h[(6, 1)] = Holding({rank: True}, None)
        return h
    chosen = ThreadWorld(8).run(holdings)
    assert (chosen.iteration, chosen.save_id) == (5, 9)
    assert chosen.unrecoverable == (6, [4, 5, 6, 7])


def test_two_saves_of_one_iteration_never_combine_and_the_larger_complete_save_id_wins():
    def holdings(rank):  # run A saved (5, 3) on every rank; run B saved (5, 8) on even ranks only
        h = ring(4, 1, [(5, 3)])(rank)
        if rank % 2 == 0:
            h[(5, 8)] = Holding({rank: True}, None)
        return h
    chosen = ThreadWorld(4).run(holdings)
    assert (chosen.iteration, chosen.save_id) == (5, 3) and chosen.unrecoverable == (5, [1, 3])


def test_no_checkpoint_anywhere():
    chosen = ThreadWorld(4).run(lambda rank: {})
    assert chosen.iteration == -1 and chosen.plan == [] and chosen.unrecoverable is None


def test_other_replication_settings_are_flagged_on_every_rank():
    chosen = ThreadWorld(4).run(ring(4, 2, [(5, 9)], lost={1}, settings={"factor": 2}), replication={"factor": 3})
    assert chosen.mismatch and chosen.iteration == 5


@pytest.mark.parametrize("world", [3, 64, 130])
def test_collectives_are_a_fixed_number_of_fixed_size_ones(world):
    tw = ThreadWorld(world)
    tw.run(ring(world, 2, [(4, 1), (5, 2)], lost={1}))
    words = (world + 63) // 64
    assert tw.calls[0] == [("max", 1), ("max", 1), ("bor", 2 * words + 1), ("min", 1)]
    assert all(calls == tw.calls[0] for calls in tw.calls)
