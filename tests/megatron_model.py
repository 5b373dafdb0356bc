"""A small megatron-core GPTModel with DDP and the distributed optimizer, on CPU (for tests)."""

from __future__ import annotations

import torch

SEQ, VOCAB = 16, 128


def build(tp: int, seed: int = 1):
    """(model, ddp, optimizer) on this rank, after initializing megatron-core's parallel state with
    tensor-parallel size ``tp`` (data-parallel over the rest of the world). Collective."""
    from tasd.adapters import megatron_cpu
    megatron_cpu.enable()
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                            pipeline_dtype=torch.float32, params_dtype=torch.float32)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [ddp])
    return model, ddp, opt


def train_step(ddp, opt, step: int) -> float:
    """One step on a batch that depends only on ``step`` (the same on every rank); the loss."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    position = torch.arange(SEQ).expand(2, SEQ)
    mask = torch.ones(2, 1, SEQ, SEQ, dtype=torch.bool).tril().logical_not()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = ddp(tokens, position, mask, labels=tokens).mean()
    loss.backward()
    ddp.finish_grad_sync()
    opt.step()
    return float(loss)


#: What megatron-LM 0.16.1 passes to sharded_state_dict for a distributed optimizer saved locally.
SHARDED_METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                    "chained_optim_avoid_prefix": True}


def sharded_state_dict(model, opt) -> dict:
    """Model and optimizer sharded state dict as Megatron-LM's checkpointing builds it."""
    ssd = {"model": model.sharded_state_dict(metadata=SHARDED_METADATA)}
    ssd["optimizer"] = opt.sharded_state_dict(ssd["model"], metadata=SHARDED_METADATA)
    return ssd
