"""The scale simulation (tasd.bench.scale): its world model gives the reductions real ranks would
(checked against threads reducing real contributions), and at 16k ranks find_latest and recovery
planning stay within the issue's budget."""

from __future__ import annotations

import pytest

from tasd.bench.scale import Case, ModelWorld, simulate
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
