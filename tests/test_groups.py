"""tasd's own groups: subgroups created by their members only, and the tree every agreement runs on."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tasd.launch import RankFailure, run_ranks
from tasd.managers import collectives, subgroups
from tasd.managers.errors import PeerUnreachableError


def tree_reduces(rank, world, fanout):
    subgroups.TREE_FANOUT = fanout
    tree = collectives.agreement_group()
    values = torch.tensor([rank * 10 + 1, -rank, 1 << rank], dtype=torch.int64)
    got = (collectives.all_reduce(values, "max", tree).tolist(), collectives.all_reduce(values, "min", tree).tolist(),
           collectives.all_reduce(values, "bor", tree).tolist())
    return got, tree.levels, sorted(g.size for g in tree._groups if g is not None)


@pytest.mark.parametrize("world,fanout,levels", [(4, 2, 2), (3, 2, 2), (4, 3, 2), (4, 64, 1)])
def test_a_tree_of_small_groups_reduces_over_every_rank(ranks, world, fanout, levels):
    out = ranks(tree_reduces, world, fanout)
    for got, lv, sizes in out:
        assert got[0] == [(world - 1) * 10 + 1, 0, 1 << (world - 1)]
        assert got[1] == [1, -(world - 1), 1]
        assert got[2][2] == (1 << world) - 1
        assert lv == levels
        assert all(s <= fanout for s in sizes)
    assert max(len(sizes) for _, _, sizes in out) == levels  # rank 0 is in one group per level
    if fanout < world:
        assert all(max(sizes, default=0) < world for _, _, sizes in out), "no group spans the world"


def overlapping_groups(rank, world):
    # Each rank asks for its groups in a different order, and ranks are in different numbers of
    # groups: creation must not depend on either (torch's hashed names count a process's groups).
    specs = [("pair", sorted({rank, (rank + 1) % world})), ("pair", sorted({rank, (rank - 1) % world}))]
    if rank % 2 == 0:
        specs.append(("evens", list(range(0, world, 2))))
    if rank % 2:
        specs.reverse()
    made = subgroups.subgroups(specs)
    out = {}
    for (purpose, ranks_), g in zip(specs, made):
        assert g.ranks == tuple(ranks_) and g.purpose == purpose
    for other in ((rank - 1) % world, (rank + 1) % world):  # lower pair first on both ends
        g = subgroups.subgroups([("pair", sorted({rank, other}))])[0]
        out[other] = g
    ordered = sorted(out.items(), key=lambda kv: tuple(sorted({rank, kv[0]})))
    sums = {}
    for other, g in ordered:
        t = torch.tensor([rank + 1])
        g.all_reduce(t, "sum")
        sums[other] = int(t)
    again = subgroups.subgroups(specs)
    return sums, all(a is b for a, b in zip(made, again))


def test_overlapping_subgroups_are_made_by_their_members_in_any_order(ranks):
    for rank, (sums, cached) in enumerate(ranks(overlapping_groups, 4)):
        assert sums == {(rank - 1) % 4: rank + 1 + (rank - 1) % 4 + 1, (rank + 1) % 4: rank + 1 + (rank + 1) % 4 + 1}
        assert cached, "a group is created once per process"


def failures_on_a_tree(rank, world):
    subgroups.TREE_FANOUT = 2
    error = RuntimeError(f"rank {rank} broke") if rank in (1, 2) else None
    failures = collectives.gather_failures(error, collectives.agreement_group())
    return dict(failures)


def test_failure_reports_travel_the_tree(ranks):
    for out in ranks(failures_on_a_tree, 4):
        assert out == {1: "RuntimeError: rank 1 broke", 2: "RuntimeError: rank 2 broke"}


def queue_on_a_subgroup(rank, world):
    from tasd.managers.async_ckpt import AsyncCallsQueue, AsyncRequest
    subgroups.TREE_FANOUT = 2
    odd = dist.new_group([1, 3])
    even = dist.new_group([0, 2])
    mine = odd if rank % 2 else even
    q = AsyncCallsQueue(persistent=False, group=mine)
    q.schedule_async_request(AsyncRequest(time.sleep, (0.01 * rank,), []))
    done = q.maybe_finalize_async_calls(blocking=True)
    q.close()
    return done, collectives.agreement_group(mine).ranks


def test_a_queue_over_a_subgroup_agrees_among_its_members(ranks):
    out = ranks(queue_on_a_subgroup, 4)
    assert [o[0] for o in out] == [[0]] * 4
    assert [o[1] for o in out] == [(0, 2), (1, 3), (0, 2), (1, 3)]


def dead_leaf(rank, world):
    subgroups.TREE_FANOUT = 2
    tree = collectives.agreement_group()
    collectives.all_reduce(torch.zeros(1, dtype=torch.int64), "max", tree)
    if rank == 3:
        os._exit(0)
    from tasd.managers.agreement import agree
    start = time.monotonic()
    try:
        agree(None, 1, "test agreement", tree)
    except PeerUnreachableError as e:
        return "unreachable", time.monotonic() - start, str(e)
    return "agreed", time.monotonic() - start, ""


def dead_leaf_reported(rank, world, out_dir):
    try:
        result = dead_leaf(rank, world)
    except SystemExit:
        raise
    with open(os.path.join(out_dir, f"r{rank}"), "w") as f:
        f.write(f"{result[0]} {result[1]:.1f} {result[2][:200]}")
    return result


def test_every_living_rank_reports_a_dead_one_within_the_timeout(tmp_path):
    with pytest.raises(RankFailure):
        run_ranks(dead_leaf_reported, 4, str(tmp_path), collective_timeout_s=5, timeout_s=60)
    for r in range(3):
        kind, seconds, text = (tmp_path / f"r{r}").read_text().split(" ", 2)
        assert kind == "unreachable", text
        assert float(seconds) < 5 * 2 + 3, "bounded by the timeout, not by the number of levels times it"
        assert "test agreement" in text and f"rank {r}" in text


def not_a_member(rank, world):
    with pytest.raises(ValueError, match="must be one of distinct ascending ranks"):
        subgroups.subgroups([("x", [r for r in range(world) if r != rank])])
    with pytest.raises(ValueError, match="fanout must be >= 2"):
        subgroups.GroupTree(range(world), 1)
    return True


def test_misuse_is_refused_locally(ranks):
    assert ranks(not_a_member, 2) == [True, True]
