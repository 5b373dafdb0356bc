"""nvidia-resiliency-ext (NVRx) as a peer in ``tasd bench``, with the small shim it needs on CPU.

NVRx is optional: :func:`nvrx_version` says whether it is importable (never installed by tasd; the
benchmark rows say "not installed" without it). NVRx 0.4.x local checkpointing assumes CUDA, so
:func:`apply` (called inside benchmark rank processes only, before the first NVRx call; idempotent)
changes exactly this, and nothing else:

1. where CUDA is absent, ``torch.cuda.synchronize()`` is a no-op and ``torch.cuda.current_device()``
   is ``"cpu"`` *as NVRx's own modules see them* (their module-level ``torch`` name is replaced
   by a proxy; torch itself and every other module are untouched);
2. ``GroupWrapper.isend_state_dict`` / ``irecv_state_dict`` send and receive host tensors over
   gloo (NVRx moves each tensor to CUDA first, which a CPU machine lacks and gloo cannot send);
   the protocol is NVRx's: one pickled hollow state dict, then one ``send`` per tensor;
3. :class:`tasd.bench.nvrx_state.CPUStateDict`: NVRx's BasicTensorAwareStateDict without its
   ``is_cuda`` assertion, whose ``restore_tensor_device`` puts tensors back where they came from;
4. two messages NVRx repeats on every call (a UserWarning about deprecated torch internals from
   its copy of old torch helpers, and the fork-per-save caller's deprecation notice) are silenced.

NVRx's save, replication (one broadcast per tensor per peer), find_latest, load (``torch.load``
with ``weights_only=False``), async queue and cleanup run as shipped. Its persistent async queue
cannot take a local-checkpoint request with replication (the request holds a process group, which
does not pickle), so the benchmarks give NVRx's manager its fork-per-save queue
(``persistent=False``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import types
import warnings
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DISTRIBUTION = "nvidia-resiliency-ext"
_PKG = "nvidia_resiliency_ext.checkpointing"
#: NVRx modules whose ``torch.cuda`` calls the shim redirects on machines without CUDA.
_CUDA_MODULES = (f"{_PKG}.local.ckpt_managers.base_manager", f"{_PKG}.async_ckpt.core",
                 f"{_PKG}.async_ckpt.torch_ckpt", f"{_PKG}.local.replication.group_utils")
SHIM_NOTE = ("NVRx runs with tasd.bench.nvrx_shim: torch.cuda.synchronize/current_device as NVRx sees "
             "them are no-ops/'cpu' without CUDA, its per-tensor send/recv go over gloo from host memory, "
             "and its BasicTensorAwareStateDict accepts CPU tensors; everything else is NVRx as shipped")


def nvrx_version() -> str | None:
    """The installed NVRx version when its local-checkpointing modules import, else None. Local."""
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.cuda warns about NVRx's pynvml dependency
            importlib.import_module(f"{_PKG}.local.ckpt_managers.local_manager")
    except Exception as e:  # a broken install is reported as absent, with the reason logged
        logger.warning("%s %s is installed but does not import: %s", DISTRIBUTION, version, e)
        return None
    return version


class _CudaProxy(types.SimpleNamespace):
    """``torch.cuda`` for NVRx's modules on a machine without CUDA."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def current_device() -> str:
        return "cpu"


class _TorchProxy(types.SimpleNamespace):
    """``torch`` for NVRx's modules: everything is torch's except ``cuda``."""

    cuda = _CudaProxy()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _isend_state_dict(self: Any, state_dict: Any, dst: int) -> dict[str, float]:
    """NVRx's GroupWrapper.isend_state_dict, sending each tensor from host memory."""
    tensor_data = state_dict.pop_tensors()
    log_data = {"data_sent": sum(t.nbytes for t in tensor_data)}
    self.send_object(state_dict, dst)
    for t in tensor_data:
        dist.send(t.cpu() if t.is_cuda else t, dst, group=self.group)
    state_dict.insert_tensors(tensor_data)
    return log_data


def _irecv_state_dict(self: Any, src: int) -> tuple[Any, dict[str, float]]:
    """NVRx's GroupWrapper.irecv_state_dict, receiving each tensor into host memory."""
    hollow = self.recv_object(src)
    hollow.init_tensors()
    for t in hollow.tensors:
        if t.is_cuda:
            host = torch.empty_like(t, device="cpu")
            dist.recv(host, src, group=self.group)
            t.copy_(host)
        else:
            dist.recv(t, src, group=self.group)
    return hollow, {"data_recv": sum(t.nbytes for t in hollow.tensors)}


_applied = False


def apply() -> None:
    """Install the shim described in the module docstring (idempotent). Local; raises
    ModuleNotFoundError when NVRx is not installed."""
    global _applied
    if _applied:
        return
    # NVRx's copy of old torch helpers warns on every object send about deprecated torch internals,
    # and its async queue logs a deprecation notice on every save with the fork-per-save caller.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"nvidia_resiliency_ext\.")
    logging.getLogger(f"{_PKG}.async_ckpt.core").addFilter(
        lambda record: "TemporalAsyncCaller will be deprecated" not in record.getMessage())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modules = [importlib.import_module(m) for m in _CUDA_MODULES]
    if not torch.cuda.is_available():
        for module in modules:
            module.torch = _TorchProxy()
    group_utils = importlib.import_module(f"{_PKG}.local.replication.group_utils")
    group_utils.GroupWrapper.isend_state_dict = _isend_state_dict
    group_utils.GroupWrapper.irecv_state_dict = _irecv_state_dict
    _applied = True
