"""Running megatron-core's model, DDP and distributed optimizer on a machine without CUDA.

megatron-core 0.16.1 builds a ``GPTModel`` on CPU (``use_cpu_initialization=True``), but its
``DistributedDataParallel``, ``DistributedOptimizer`` and tensor-parallel RNG tracker call CUDA
unconditionally (``torch.cuda.current_device()``, ``device="cuda"`` factories, parameter type
names ``torch.cuda.FloatTensor``, CUDA RNG states). :func:`enable` patches exactly those calls for
the whole process so that tasd's Megatron example, demo, tests and CPU benchmarks train a real
megatron-core model with its distributed optimizer on gloo.

It is process-wide and cannot be undone: call it once, at the start of a process that will never
use a GPU, before building the model. It refuses to run where CUDA is available (there, use
megatron-core as it is). Not used by tasd's library code.
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
