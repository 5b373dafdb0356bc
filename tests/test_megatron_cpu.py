"""megatron-core's GPTModel, DDP and distributed optimizer train on CPU/gloo with tasd's CPU patch."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")


def train(rank, world, tp):
    import warnings
    warnings.filterwarnings("ignore")
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from tasd.adapters.megatron_cpu import build_gpt as build, sharded_state_dict, train_step
    model, ddp, opt = build(tp)
    losses = [train_step(ddp, opt, s) for s in range(3)]
    kinds = sorted({type(v).__name__ for v in nested_values(sharded_state_dict(model, opt))})
    return losses, kinds


@pytest.mark.parametrize("tp", [1, 2])
def test_a_gpt_model_with_the_distributed_optimizer_trains_on_cpu(ranks, tp):
    out = ranks(train, 2, tp)
    (l0, kinds), (l1, _) = out
    assert l0 == l1, "every rank sees the same loss (data- or tensor-parallel)"
    assert l0[-1] < l0[0], "the optimizer steps"
    assert {"ShardedTensor", "ShardedObject", "LocalNonpersistentObject"} <= set(kinds)


def refuses_with_cuda(rank, world):
    import torch
    from tasd.adapters import megatron_cpu
    torch.cuda.is_available = lambda: True
    with pytest.raises(RuntimeError, match="for machines without CUDA"):
        megatron_cpu.enable()
    return True


def test_the_patch_refuses_a_machine_with_cuda(ranks):
    assert ranks(refuses_with_cuda, 1) == [True]
