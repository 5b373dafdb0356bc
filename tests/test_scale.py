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
