"""The scale simulation (tasd.bench.scale): its world model gives the reductions real ranks would
(checked against threads reducing real contributions), and at 16k ranks find_latest and recovery
planning stay within the issue's budget."""

from __future__ import annotations

import pytest

from tasd.bench.scale import REQUESTS_PER_MEMBERSHIP, Case, ModelWorld, group_cost, simulate, tree_levels
from tasd.managers import subgroups
from tasd.managers.recovery import choose
from tests.test_recovery_plan import ThreadWorld


@pytest.mark.parametrize("case, loadable", [
    (Case(64, factor=2, jump=8, strategy="ring", lost_fraction=0.25), True),
    (Case(64, factor=2, jump=8, strategy="clique", lost_fraction=0.25), True),
    (Case(96, factor=3, jump=1, strategy="ring", lost_fraction=0.25), False),  # copies on the same node
    (Case(48, factor=3, jump=2, strategy="clique", lost_fraction=0.0), True)])
def test_the_model_reduces_as_real_ranks_do(case, loadable):
    model = ModelWorld(case)
    real = ThreadWorld(case.world).run(model.holdings)
    for rank in (0, case.world - 1):
        assert choose(model.holdings(rank), rank, case.world, None, ModelWorld(case).reduce) == real
    if loadable:
        assert real.iteration == 100 and len(real.plan) == (~model.alive).sum()
    else:
        assert real.iteration == -1 and real.unrecoverable[0] == 100


def test_planning_at_16k_ranks_is_cheap_and_its_payload_small():
    result = simulate(Case(16_384, factor=2, jump=8, strategy="ring", lost_fraction=0.01), repeats=2)
    assert result.iteration == 100 and result.lost_ranks == 160 and result.plan_len == 160
    assert [op for op, _ in result.calls] == ["max", "max", "bor", "min"]
    assert result.bytes_per_rank <= 16 + 16_384 // 4 + 8 + 8 * 160
    assert result.holder_s < 0.1 and result.lost_s < 0.1, "Python time per rank"


def test_the_scale_scenario_reports_each_world_with_its_payload_and_model(tmp_path):
    from tasd.bench.harness import Context
    from tasd.bench.scenarios import ScaleConfig, scale
    res = scale(ScaleConfig(worlds=(4_096, 100_000), repeats=1, legacy_up_to=4_096), Context(tmp_path, False, False))
    assert [(f.params["world"], f.method) for f in res.figures] == [
        (4_096, "plan_holder"), (4_096, "plan_lost"), (4_096, "json_gather"), (100_000, "plan_holder"),
        (100_000, "plan_lost")]
    assert res.x == "world" and all(f.times_s and f.times_s[0] > 0 for f in res.figures)
    assert "4,096 ranks, 40 lost: 4 all_reduces carrying" in res.notes[0] and "gloo tree" in res.notes[0]
    assert "target at 100,000 ranks: payload 33.0 KB <= 64 KB per rank: met" in res.notes[-1]
    assert "one agreement (a save step, or the async queue's poll" in res.notes[1]
    assert "ms on tasd's tree of 4 levels of <= 8-rank gloo groups" in res.notes[1]
    assert any(n.startswith("target at 100,000 ranks: one agreement") and n.endswith("< 50 ms: met")
               for n in res.notes)


@pytest.mark.parametrize("world,fanout", [(2, 2), (7, 2), (64, 8), (100, 8), (513, 8), (1000, 64)])
def test_the_group_model_counts_the_groups_the_tree_and_strategies_make(world, fanout):
    shapes = [subgroups.tree_blocks(p, world, fanout) for p in range(world)]
    assert tree_levels(world, fanout) == max(shapes[0][0], 1)
    tree = sum(1 for _, mine in shapes for _, members in mine if len(members) > 1)
    most = max(len(mine) for _, mine in shapes)
    widest = max((len(members) for _, mine in shapes for _, members in mine), default=1)
    assert widest <= fanout
    for strategy, exchange in (("ring", 2 * world), ("clique", world)):  # factor 2: pairs / cliques of 2
        cost = group_cost(world, strategy, 2, fanout)
        assert cost.store_requests == (tree + exchange) * REQUESTS_PER_MEMBERSHIP
        assert cost.groups_per_rank == most + (2 if strategy == "ring" else 1)
    if world >= 64:
        assert cost.connections_per_rank < world // 2 and cost.world_connections_per_rank == world - 1
