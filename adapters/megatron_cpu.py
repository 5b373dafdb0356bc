"""Running megatron-core's model, DDP and distributed optimizer on a machine without CUDA, and a
small GPT to run (tasd's Megatron demo, example, tests and CPU benchmarks).

megatron-core 0.16.1 builds a ``GPTModel`` on CPU (``use_cpu_initialization=True``), but its
``DistributedDataParallel``, ``DistributedOptimizer`` and tensor-parallel RNG tracker call CUDA
unconditionally (``torch.cuda.current_device()``, ``device="cuda"`` factories, parameter type
names ``torch.cuda.FloatTensor``, CUDA RNG states). :func:`enable` patches exactly those calls for
the whole process so that tasd's Megatron example, demo, tests and CPU benchmarks train a real
megatron-core model with its distributed optimizer on gloo.

It is process-wide and cannot be undone: call it once, at the start of a process that will never
use a GPU, before building the model. It refuses to run where CUDA is available (there, use
megatron-core as it is). Not used by tasd's library code.

:func:`build_gpt` builds a small ``GPTModel`` with megatron-core's DDP and distributed optimizer
after initializing its parallel state; :func:`train_step` trains it one step on a batch that
depends only on the step; :func:`sharded_state_dict` builds model and optimizer sharded state
dicts as Megatron-LM 0.16.1's checkpointing does for local checkpoints.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_enabled = False


class _CudaToCpu(TorchFunctionMode):
    """Turns ``device="cuda..."`` arguments of torch calls into ``"cpu"``."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        where = kwargs.get("device")
        if where is not None and "cuda" in str(where):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def enable() -> None:
    """Patch this process so that megatron-core's CUDA-only calls run on CPU (see the module
    docstring). Idempotent. Raises RuntimeError where CUDA is available. Local."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("tasd.adapters.megatron_cpu.enable() is for machines without CUDA; this one has it")
    import megatron.core.tensor_parallel.random as mrandom

    _CudaToCpu().__enter__()  # stays active for the life of the process
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    type_name = torch.Tensor.type

    def cuda_type_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # The distributed optimizer accepts parameters only by their CUDA type names.
        name = type_name(self, *args, **kwargs)
        return name if args or kwargs or ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_type_name  # type: ignore[assignment]
    # The tensor-parallel RNG tracker saves and restores CUDA generator states around dropout;
    # on CPU the forks share the CPU generator.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    _enabled = True
    logger.info("megatron-core's CUDA-only calls now run on CPU in this process")


#: Sequence length and vocabulary of :func:`build_gpt`'s model.
SEQ, VOCAB = 16, 128
#: What Megatron-LM 0.16.1 passes to sharded_state_dict for a distributed optimizer saved locally.
SHARDED_METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                    "chained_optim_avoid_prefix": True}


def build_gpt(tp: int = 1, seed: int = 1, num_layers: int = 2, hidden_size: int = 64, heads: int = 4) -> tuple:
    """(model, ddp, optimizer) on this rank: megatron-core's parallel state initialized with
    tensor-parallel size ``tp`` (data-parallel over the rest of the world), a ``GPTModel`` with the
    local layer spec, megatron-core's DDP and its distributed Adam. Calls :func:`enable` first.
    Collective over the world (torch.distributed must be initialized)."""
    enable()
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    cfg = TransformerConfig(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=heads,
                            use_cpu_initialization=True, pipeline_dtype=torch.float32, params_dtype=torch.float32)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [ddp])
    return model, ddp, opt


def train_step(ddp: Any, opt: Any, step: int) -> float:
    """One training step of :func:`build_gpt`'s model on a batch that depends only on ``step``
    (the same on every rank); returns the loss. Collective (gradient reduction)."""
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


def sharded_state_dict(model: Any, opt: Any) -> dict:
    """Model and optimizer sharded state dict as Megatron-LM 0.16.1 builds it for a local
    checkpoint (``{"model": ..., "optimizer": ...}``). Local (no collective)."""
    ssd = {"model": model.sharded_state_dict(metadata=SHARDED_METADATA)}
    ssd["optimizer"] = opt.sharded_state_dict(ssd["model"], metadata=SHARDED_METADATA)
    return ssd
