"""BasicTensorAwareStateDict: nested dicts, lists and tuples with tensor leaves."""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Iterator

import torch

from tasd import device
from tasd.serialization import register_library_class
from tasd.staging import HostBufferPool, Staged, check_stageable, stage
from tasd.state_dict import TensorAwareStateDict, TensorPlaceholder
from tasd.tree import format_path, map_leaves, map_tensors


def _is_placeholder(obj: Any) -> bool:
    return isinstance(obj, TensorPlaceholder)


@register_library_class
class BasicTensorAwareStateDict(TensorAwareStateDict):
    """Wraps a nested dict/list/tuple state dict (``.state_dict``) whose tensors live on CPU or CUDA.

    Popping and inserting rebuild the containers, so the structure the caller passed in is never
    mutated. Non-tensor leaves may be anything picklable; a tensor hidden inside another object
    raises TypeError naming its key path.
    """

    def __init__(self, state_dict: Any, pool: HostBufferPool | None = None):
        if not isinstance(state_dict, (dict, list, tuple)):
            raise TypeError(f"state_dict must be a dict, list or tuple, got {type(state_dict).__name__}")
        self.state_dict = state_dict
        self._hollow = False
        self._devices: list[str] | None = None  # devices the tensors came from, when staged or loaded
        self._pool = pool
        self._staged: Staged | None = None
        self._release: weakref.finalize | None = None

    # -- pickling: only hollow objects, without runtime state ---------------------------------
    def __getstate__(self) -> dict:
        if not self._hollow:
            raise TypeError("only a hollow BasicTensorAwareStateDict can be pickled; call pop_tensors() first")
        return {"state_dict": self.state_dict}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["state_dict"])  # type: ignore[misc]
        self._hollow = True

    # -- the contract --------------------------------------------------------------------------
    @property
    def is_hollow(self) -> bool:
        return self._hollow

    def pop_tensors(self) -> list[torch.Tensor]:
        if self._hollow:
            raise ValueError("state dict is already hollow (pop_tensors called twice?)")
        tensors: list[torch.Tensor] = []
        devices = self._devices

        def take(path, t: torch.Tensor) -> TensorPlaceholder:
            reason = check_stageable(t)
            if reason:
                raise TypeError(f"state dict entry {format_path(path)!r}: {reason}")
            i = len(tensors)
            tensors.append(t)
            dev = devices[i] if devices is not None and i < len(devices) else str(t.device)
            return TensorPlaceholder(i, t.dtype, tuple(t.shape), dev)

        self.state_dict = map_tensors(self.state_dict, take)
        self._hollow = True
        return tensors

    @property
    def tensors(self) -> Iterator[torch.Tensor]:
        if self._hollow:
            raise ValueError("state dict is hollow: it holds no tensors")
        found: list[torch.Tensor] = []
        map_leaves(self.state_dict, lambda x: isinstance(x, torch.Tensor),
                   lambda _, t: found.append(t))
        return iter(found)

    def insert_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        if not self._hollow:
            raise ValueError("state dict is not hollow: nothing to insert into")
        tensors = list(tensors)
        seen: list[TensorPlaceholder] = []

        def put(path, ph: TensorPlaceholder) -> torch.Tensor:
            if ph.index >= len(tensors):
                raise ValueError(f"got {len(tensors)} tensors, state dict entry {format_path(path)!r} needs index {ph.index}")
            t = tensors[ph.index]
            if t.dtype != ph.dtype or tuple(t.shape) != ph.shape:
                raise ValueError(f"tensor for state dict entry {format_path(path)!r} has {t.dtype} "
                                 f"{tuple(t.shape)}, expected {ph.dtype} {ph.shape}")
            seen.append(ph)
            return t

        new = map_leaves(self.state_dict, _is_placeholder, put)
        if len(seen) != len(tensors):
            raise ValueError(f"got {len(tensors)} tensors for {len(seen)} placeholders")
        self.state_dict = new
        self._devices = [ph.device for ph in seen]
        self._hollow = False

    def init_tensors(self) -> None:
        placeholders: list[TensorPlaceholder] = []
        map_leaves(self.state_dict, _is_placeholder, lambda _, ph: placeholders.append(ph))
        self.insert_tensors(torch.empty(ph.shape, dtype=ph.dtype) for ph in placeholders)

    def copy_tensors_to_cpu(self, non_blocking: bool = False) -> None:
        tensors = self.pop_tensors()
        try:
            staged = stage(tensors, self._pool, non_blocking=non_blocking)
        finally:
            # Restore the originals whether or not staging worked; replaced below on success.
            self.insert_tensors(tensors)
        self.pop_tensors()
        self.insert_tensors([lay.standalone(staged.buffer) for lay in staged.layouts])
        self._devices = staged.devices
        if self._release is not None:
            self._release()  # the previous copies are replaced: their buffer goes back
        self._staged = staged
        self._release = weakref.finalize(self, staged.release)

    def restore_tensor_device(self, non_blocking: bool = True) -> None:
        if self._hollow:
            raise ValueError("state dict is hollow: no tensors to move")
        devices = self._devices
        if devices is None:
            return
        moved = [device.restore_device(t, d, non_blocking) for t, d in zip(self.pop_tensors(), devices)]
        self.insert_tensors(moved)
        self._devices = devices

    def values(self) -> Iterator[Any]:
        sd = self.state_dict
        return iter(sd.values() if isinstance(sd, dict) else sd)
