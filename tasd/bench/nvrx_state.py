"""NVRx's BasicTensorAwareStateDict for host tensors (part of the shim in :mod:`tasd.bench.nvrx_shim`).

Imports nvidia-resiliency-ext: import this module only where :func:`nvrx_shim.nvrx_version` is not
None. The class lives at module level because NVRx pickles hollow state dicts between ranks and
into its files.
"""

from __future__ import annotations

import warnings

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch.cuda warns about NVRx's pynvml dependency
    from nvidia_resiliency_ext.checkpointing.local.basic_state_dict import BasicTensorAwareStateDict


class CPUStateDict(BasicTensorAwareStateDict):
    """NVRx's BasicTensorAwareStateDict over a flat dict of tensors on any device: no ``is_cuda``
    assertion, and ``restore_tensor_device`` moves tensors back to the device each came from.

    NVRx replaces the tensors of the dict it wraps by placeholders during a replicated save, so
    this wraps a shallow copy of ``state_dict`` and the caller's dict stays as it was.
    """

    def __init__(self, state_dict: dict):
        self.state_dict = dict(state_dict)
        self._is_hollow = False
        self._devices = {k: str(v.device) for k, v in self.state_dict.items() if isinstance(v, torch.Tensor)}

    def restore_tensor_device(self, non_blocking: bool = True) -> None:
        for k, v in self.state_dict.items():
            if isinstance(v, torch.Tensor) and str(v.device) != self._devices.get(k, str(v.device)):
                self.state_dict[k] = v.to(self._devices[k], non_blocking=non_blocking)
