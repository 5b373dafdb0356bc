"""Replication placement (clique, ring), NVRx group parsing, ReplicationConfig, and the exchange
groups among peers on real ranks."""

from __future__ import annotations

import datetime
import pickle

import pydantic
import pytest
import torch
import torch.distributed as dist

from tasd.managers import CheckpointingException, collectives
from tasd.managers.config import ReplicationConfig, ReplicationMismatchError
from tasd.managers.replication import (CliqueReplicationStrategy, LazyCliqueReplicationStrategy,
                                       LazyRingReplicationStrategy, NoReplicasAvailableError,
                                       ReplicationStrategy, RingReplicationStrategy,
                                       parse_group_sequence)

# -- parse_group_sequence ---------------------------------------------------------------------

@pytest.mark.parametrize("jump,factor,world,expected", [
    (1, 2, 4, [[0, 1], [2, 3]]),
    (2, 2, 4, [[0, 2], [1, 3]]),
    (1, 3, 6, [[0, 1, 2], [3, 4, 5]]),
    (2, 2, 8, [[0, 2], [1, 3], [4, 6], [5, 7]]),
    (2, 3, 6, [[0, 2, 4], [1, 3, 5]]),
    (4, 2, 8, [[0, 4], [1, 5], [2, 6], [3, 7]]),
    (1, 1, 3, [[0], [1], [2]]),
    (1, 4, 4, [[0, 1, 2, 3]]),
])
def test_parse_group_sequence(jump, factor, world, expected):
    assert parse_group_sequence(jump, factor, world) == expected
    assert parse_group_sequence(replication_jump=jump, replication_factor=factor,
                                world_size=world) == expected


@pytest.mark.parametrize("jump,factor,world,words", [
    (2, 2, 6, ["(6)", "2 x 2 = 4"]),
    (1, 2, 3, ["(3)", "1 x 2 = 2"]),
    (0, 2, 4, ["replication_jump", "0"]),
    (1, 0, 4, ["replication_factor", "0"]),
    (1, 2, 0, ["world size", "0"]),
    (True, 2, 4, ["replication_jump", "bool"]),
    (1, 2.0, 4, ["replication_factor", "float"]),
    (1, "2", 4, ["replication_factor", "str"]),
])
def test_parse_group_sequence_errors(jump, factor, world, words):
    with pytest.raises(ValueError) as info:
        parse_group_sequence(jump, factor, world)
    for w in words:
        assert w in str(info.value)


# -- placement --------------------------------------------------------------------------------

CLIQUE_CASES = [(2, 1, 2), (4, 1, 2), (4, 2, 2), (6, 1, 3), (8, 2, 2), (12, 2, 3), (8, 4, 2), (5, 1, 1)]
RING_CASES = [(2, 1, 2), (3, 1, 2), (4, 1, 3), (5, 2, 3), (6, 2, 3), (8, 3, 4), (7, 1, 7), (4, 5, 2),
              (3, 1, 1)]


def check_placement(strategy: ReplicationStrategy, world: int) -> None:
    factor = strategy.replication_factor
    strategy.check_world_size(world)
    holders = {o: strategy.holders(o, world) for o in range(world)}
    for owner, hs in holders.items():
        assert len(hs) == factor - 1 and len(set(hs)) == factor - 1
        assert owner not in hs and all(0 <= h < world for h in hs)
        assert strategy.holders(owner, world) == hs  # deterministic
    for rank in range(world):
        held = strategy.held_owners(rank, world)
        assert held == sorted(o for o, hs in holders.items() if rank in hs)
        assert len(held) == factor - 1 and rank not in held


@pytest.mark.parametrize("world,jump,factor", CLIQUE_CASES)
@pytest.mark.parametrize("cls", [CliqueReplicationStrategy, LazyCliqueReplicationStrategy])
def test_clique_placement(cls, world, jump, factor):
    s = cls.from_replication_params(jump, factor)
    check_placement(s, world)
    for group in parse_group_sequence(jump, factor, world):
        for owner in group:
            assert s.holders(owner, world) == [r for r in group if r != owner]


@pytest.mark.parametrize("world,jump,factor", RING_CASES)
@pytest.mark.parametrize("cls", [RingReplicationStrategy, LazyRingReplicationStrategy])
def test_ring_placement(cls, world, jump, factor):
    s = cls.from_replication_params(replication_jump=jump, replication_factor=factor)
    check_placement(s, world)
    for rank in range(world):
        assert s.holders(rank, world) == [(rank + k * jump) % world for k in range(1, factor)]
        assert s.held_owners(rank, world) == sorted((rank - k * jump) % world for k in range(1, factor))


def test_factor_one_means_no_replicas():
    for s in (CliqueReplicationStrategy(1, 1), RingReplicationStrategy(3, 1)):
        assert s.holders(0, 4) == [] and s.held_owners(3, 4) == []


def test_ring_fits_where_clique_cannot():
    for world, jump, factor in [(3, 1, 2), (5, 2, 3)]:
        check_placement(RingReplicationStrategy(jump, factor), world)
        with pytest.raises(ValueError):
            CliqueReplicationStrategy(jump, factor).check_world_size(world)
    assert RingReplicationStrategy(2, 3).holders(4, 5) == [1, 3]


def test_invalid_world_sizes_name_the_numbers():
    with pytest.raises(ValueError) as info:
        RingReplicationStrategy(2, 3).check_world_size(4)
    msg = str(info.value)
    assert "ring" in msg and "world size 4" in msg and "replication_jump 2" in msg
    assert "replication_factor 3" in msg and "gcd(4, 2) = 2" in msg
    with pytest.raises(ValueError, match="ring"):
        RingReplicationStrategy(2, 3).holders(0, 4)
    with pytest.raises(ValueError) as info:
        CliqueReplicationStrategy(2, 2).check_world_size(6)
    assert str(info.value) == ("clique replication needs the world size (6) to be divisible by "
                               "replication_jump x replication_factor (2 x 2 = 4)")
    with pytest.raises(ValueError, match="divisible"):
        LazyCliqueReplicationStrategy(2, 2).held_owners(0, 6)


def test_bad_parameters_and_ranks():
    for cls in (CliqueReplicationStrategy, RingReplicationStrategy, LazyRingReplicationStrategy):
        for jump, factor in [(0, 2), (1, 0), (True, 2), (1, 2.5), ("1", 2)]:
            with pytest.raises(ValueError):
                cls(jump, factor)
    s = RingReplicationStrategy()
    for bad in (-1, 4, True, 1.0):
        with pytest.raises(ValueError, match="owner"):
            s.holders(bad, 4)
        with pytest.raises(ValueError, match="rank"):
            s.held_owners(bad, 4)
    with pytest.raises(TypeError):
        ReplicationStrategy(1, 2)  # abstract


def test_settings_equality_repr_pickle():
    ring, clique = RingReplicationStrategy(1, 2), CliqueReplicationStrategy(2, 3)
    assert ring.settings == {"strategy": "ring", "replication_jump": 1, "replication_factor": 2}
    assert clique.settings == {"strategy": "clique", "replication_jump": 2, "replication_factor": 3}
    assert ring == LazyRingReplicationStrategy(1, 2) and ring != RingReplicationStrategy(1, 3)
    assert ring != CliqueReplicationStrategy(1, 2) and ring != "ring"
    assert len({ring, LazyRingReplicationStrategy(1, 2), clique}) == 2
    assert repr(clique) == "CliqueReplicationStrategy(replication_jump=2, replication_factor=3)"
    assert ring.exchange_groups == {} and ring._groups is None  # no torch.distributed here
    for s in (ring, clique, LazyCliqueReplicationStrategy(1, 2)):
        copy = pickle.loads(pickle.dumps(s))
        assert copy == s and type(copy) is type(s) and copy._groups is None


def test_no_replicas_error():
    e = NoReplicasAvailableError(20, [3, 1])
    assert isinstance(e, CheckpointingException)
    assert e.iteration == 20 and e.owners == [1, 3]
    assert "iteration 20" in str(e) and "1, 3" in str(e)
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.iteration, e2.owners, str(e2)) == (20, [1, 3], str(e))


# -- ReplicationConfig ------------------------------------------------------------------------

def test_config_defaults_and_build():
    c = ReplicationConfig()
    assert (c.strategy, c.replication_jump, c.replication_factor) == ("ring", 1, 2)
    assert c.describe() == "ring, factor 2, jump 1"
    assert type(c.build()) is LazyRingReplicationStrategy
    assert type(c.build(lazy=False)) is RingReplicationStrategy
    cc = ReplicationConfig(strategy="clique", replication_jump=2, replication_factor=3)
    assert type(cc.build()) is LazyCliqueReplicationStrategy
    assert type(cc.build(lazy=False)) is CliqueReplicationStrategy
    assert cc.describe() == "clique, factor 3, jump 2"
    for cfg in (c, cc):
        for lazy in (True, False):
            s = cfg.build(lazy=lazy)
            assert s.settings == cfg.settings
            assert ReplicationConfig.from_strategy(s) == cfg
    with pytest.raises(pydantic.ValidationError):
        c.replication_factor = 3  # frozen
    with pytest.raises(TypeError):
        ReplicationConfig.from_strategy("ring")


@pytest.mark.parametrize("kwargs,field", [
    ({"replication_factor": 0}, "replication_factor"),
    ({"replication_jump": 0}, "replication_jump"),
    ({"strategy": "star"}, "strategy"),
    ({"replication_factor": True}, "replication_factor"),
    ({"replication_jump": "2"}, "replication_jump"),
    ({"replication_factor": 2.0}, "replication_factor"),
    ({"factor": 2}, "factor"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(pydantic.ValidationError) as info:
        ReplicationConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


def test_config_check_world_size():
    ReplicationConfig(strategy="ring", replication_factor=2).check_world_size(3)
    with pytest.raises(ValueError, match=r"\(3\)"):
        ReplicationConfig(strategy="clique", replication_factor=2).check_world_size(3)
    with pytest.raises(ValueError, match="world size 4"):
        ReplicationConfig(replication_jump=2, replication_factor=3).check_world_size(4)


def test_mismatch_error_message():
    saved = ReplicationConfig(strategy="clique").settings
    current = RingReplicationStrategy(1, 2).settings
    e = ReplicationMismatchError(20, saved, current)
    assert isinstance(e, CheckpointingException)
    assert str(e) == ("checkpoint iteration 20 was saved with clique, factor 2, jump 1 but this "
                      "manager uses ring, factor 2, jump 1")
    assert (e.iteration, e.saved, e.current) == (20, saved, current)
    assert "no replication" in str(ReplicationMismatchError(5, None, current))
    assert "no replication" in str(ReplicationMismatchError(5, saved, None))
    assert str(pickle.loads(pickle.dumps(e))) == str(e)


# -- the exchange groups on real ranks ----------------------------------------------------------

def group_sums(strategy, rank):
    """{group ranks: sum of (rank + 1) over the group, by an all_reduce on it} for each distinct
    group of ``strategy``'s exchange groups (in ascending order of their ranks: the same order on
    every member, so that overlapping groups cannot wait for each other)."""
    groups = {g.ranks: g for g in strategy.exchange_groups.values()}
    sums = {}
    for ranks in sorted(groups):
        t = torch.tensor([rank + 1])
        groups[ranks].all_reduce(t, "sum")
        sums[ranks] = int(t)
    return sums


def use_groups(rank, world):
    import threading
    eager = RingReplicationStrategy(1, 2)  # collective: each rank and its peers construct it together
    making = [t.name for t in threading.enumerate() if t.name == "tasd-exchange-groups"]
    assert eager._groups is not None or making, "an eager strategy starts making its groups at construction"
    lazy = LazyCliqueReplicationStrategy(1, world)
    assert lazy._groups is None  # nothing created until first use
    out = []
    for s in (eager, lazy):
        groups = s.exchange_groups
        assert groups is s.exchange_groups  # created once
        assert sorted(groups) == s.peers(rank, world)
        for peer, g in groups.items():
            assert rank in g.ranks and peer in g.ranks
            # inherits the job's timeout (the ranks fixture's 20 s), not a 30-minute default
            assert g.timeout == collectives.group_timeout() == datetime.timedelta(seconds=20)
        out.append(group_sums(s, rank))
    t = torch.tensor([1])
    dist.all_reduce(t)  # the default group still works alongside
    copy = pickle.loads(pickle.dumps(eager))
    assert copy._groups is None and copy.exchange_groups == eager.exchange_groups, "a copy gets the cached groups"
    return out, int(t), lazy.holders(rank, world), eager.held_owners(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_strategy_groups_on_ranks(ranks, world):
    results = ranks(use_groups, world)
    for rank, ((ring, clique), total, holders, held) in enumerate(results):
        peers = sorted({(rank + 1) % world, (rank - 1) % world})
        assert ring == {tuple(sorted((rank, p))): rank + p + 2 for p in peers}, "one 2-rank group per ring pair"
        assert clique == {tuple(range(world)): world * (world + 1) // 2}, "one group over the clique"
        assert total == world
        assert holders == [r for r in range(world) if r != rank]
        assert held == [(rank - 1) % world]


def clique_groups(rank, world, jump):
    s = CliqueReplicationStrategy(jump, 2)
    return {peer: (g.purpose, g.ranks) for peer, g in s.exchange_groups.items()}, group_sums(s, rank)


@pytest.mark.parametrize("jump", [1, 2])
def test_a_clique_of_two_on_four_ranks_makes_only_its_own_two_rank_group(ranks, jump):
    for rank, (groups, sums) in enumerate(ranks(clique_groups, 4, jump)):
        mate = rank ^ 1 if jump == 1 else rank ^ 2
        pair = tuple(sorted((rank, mate)))
        assert groups == {mate: ("clique-exchange", pair)}, "one group, of the clique's 2 ranks, none over the world"
        assert sums == {pair: sum(pair) + 2}


def ring_groups(rank, world):
    s = LazyRingReplicationStrategy(1, 3)
    groups = s.exchange_groups  # lazy: made here, by every rank and its peers together
    return {peer: (g.purpose, g.ranks) for peer, g in groups.items()}, group_sums(s, rank)


def test_ring_of_three_on_four_ranks_makes_a_group_per_peer_pair(ranks):
    for rank, (groups, sums) in enumerate(ranks(ring_groups, 4)):
        peers = sorted({(rank + k) % 4 for k in (-2, -1, 1, 2)})  # holders r+1, r+2; owners r-1, r-2
        assert groups == {p: ("ring-exchange", tuple(sorted((rank, p)))) for p in peers}
        assert len(peers) == 3 and all(len(r) == 2 for r in sums)
        assert sums == {tuple(sorted((rank, p))): rank + p + 2 for p in peers}


def test_strategy_lookups_do_not_walk_the_world():
    # A world of 16 billion ranks: building its groups would not finish; a lookup is O(F).
    world = 8 * 2 * 10**9
    clique, ring = CliqueReplicationStrategy(8, 2), RingReplicationStrategy(8, 3)
    assert clique.holders(5, world) == [13] and clique.held_owners(13, world) == [5]
    assert clique.group_of(world - 1, world) == [world - 9, world - 1]
    assert ring.holders(world - 1, world) == [7, 15] and ring.held_owners(3, world) == [world - 13, world - 5]
    for rank in (0, 5, 13, 16, 31):
        assert clique.group_of(rank, 32) == next(g for g in clique.groups(32) if rank in g)
    # the exchange groups a rank would make: O(F) to compute, a few ranks each
    assert clique.exchange_specs(13, world) == {5: ("clique-exchange", (5, 13))}
    assert ring.peers(3, world) == [11, 19, world - 13, world - 5]
    assert ring.exchange_specs(3, world) == {p: ("ring-exchange", tuple(sorted((3, p)))) for p in ring.peers(3, world)}
