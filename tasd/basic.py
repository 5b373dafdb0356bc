"""BasicTensorAwareStateDict: nested dicts, lists and tuples with tensor leaves."""

from __future__ import annotations

import operator
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


def _same_view_key(t: torch.Tensor) -> tuple:
    """What makes two tensor objects with the same data pointer the same tensor for a checkpoint
    (tied weights)."""
    return (tuple(t.shape), t.stride(), t.dtype, t.device, type(t), t.requires_grad)


class TensorIndex:
    """Numbers the distinct tensors met by a walk (a backend's ``pop_tensors``): tensors that are
    the same view of the same memory (tied weights: one storage, offset, shape, strides, dtype,
    device, tensor type and requires_grad) get one index. ``tensors`` and ``devices`` (device
    names) are in index order; ``known_devices`` (the devices of the tensors last inserted, by
    index) are reused instead of the tensors' own. Tensors without elements are never tied (empty
    storages may share a null pointer). Not thread-safe; one per walk."""

    def __init__(self, known_devices: list[str] | None = None):
        self.tensors: list[torch.Tensor] = []
        self.devices: list[str] = []
        self._known = known_devices
        self._at_ptr: dict[int, list[int]] = {}  # data pointer -> indices of the tensors starting there
        self._names: dict[torch.device, str] = {}

    def index(self, t: torch.Tensor) -> int:
        """The index of ``t`` (a new one unless a tensor tied to it was indexed)."""
        i = None
        if t.numel():
            same = self._at_ptr.setdefault(t.data_ptr(), [])
            if same:
                key = _same_view_key(t)
                i = next((j for j in same if _same_view_key(self.tensors[j]) == key), None)
            if i is None:
                same.append(len(self.tensors))
        if i is None:
            i = len(self.tensors)
            self.tensors.append(t)
            if self._known is not None and i < len(self._known):
                dev = self._known[i]
            else:
                d = t.device
                dev = self._names.get(d) or self._names.setdefault(d, str(d))
            self.devices.append(dev)
        return i


@register_library_class
class BasicTensorAwareStateDict(TensorAwareStateDict):
    """Wraps a nested dict/list/tuple state dict (``.state_dict``) whose tensors live on CPU or CUDA.

    Popping and inserting rebuild the containers, so the structure the caller passed in is never
    mutated. Non-tensor leaves may be anything picklable; a tensor hidden inside another object,
    or a tensor that is not plain (a subclass such as DTensor: use tasd.fsdp for those), raises
    TypeError naming its key path. A tensor tied under several keys is popped, staged and saved
    once, and comes back as one tensor object at all of its keys (as with ``torch.save``).
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
        # Between pop_tensors and insert_tensors: (the structure before the pop, the tensors
        # popped, their devices), to put the same tensors back without a walk.
        self._popped: tuple[Any, list[torch.Tensor], list[str]] | None = None

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
        """Remove the tensors and return each once, in walk order; the object becomes hollow.

        Until :meth:`insert_tensors`, the object keeps the structure it had (and so the tensors),
        so that putting the same tensor objects back (as a save does after staging them) costs no
        walk.

        Tensors that are the same view of the same memory (tied weights: one storage, offset,
        shape, strides, dtype, device, tensor type and requires_grad under several keys, as
        ``model.state_dict()`` returns them) are one tensor: every placeholder of it carries its
        index, and
        :meth:`insert_tensors` puts one tensor object back at all its keys. Raises TypeError naming
        the key path for a tensor that cannot be staged (a tensor subclass such as DTensor, a sparse,
        quantized or meta tensor) or one hidden inside another object.
        """
        if self._hollow:
            raise ValueError("state dict is already hollow (pop_tensors called twice?)")
        index = TensorIndex(self._devices)

        def take(path, t: torch.Tensor) -> TensorPlaceholder:
            reason = check_stageable(t)
            if reason:
                raise TypeError(f"state dict entry {format_path(path)!r} {reason}")
            i = index.index(t)
            return TensorPlaceholder(i, t.dtype, t.shape, index.devices[i])

        before = self.state_dict
        self.state_dict = map_tensors(before, take)
        tensors = index.tensors
        self._popped = (before, list(tensors), index.devices)
        self._hollow = True
        return tensors

    @property
    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor leaf in walk order (a tied tensor once per key). ValueError when hollow."""
        if self._hollow:
            raise ValueError("state dict is hollow: it holds no tensors")
        found: list[torch.Tensor] = []
        map_leaves(self.state_dict, lambda x: isinstance(x, torch.Tensor),
                   lambda _, t: found.append(t))
        return iter(found)

    def insert_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Put back one tensor per distinct placeholder index (as :meth:`pop_tensors` returned
        them): the same tensor object goes to every key whose placeholder carries its index. The
        very tensor objects the last pop_tensors returned restore the structure as it was before
        that pop, without a walk (each key's own tensor object again). ValueError when the number
        of tensors or a dtype or shape does not match."""
        if not self._hollow:
            raise ValueError("state dict is not hollow: nothing to insert into")
        tensors = list(tensors)
        popped, self._popped = self._popped, None
        if popped is not None and len(tensors) == len(popped[1]) and all(map(operator.is_, tensors, popped[1])):
            # The very tensors just popped: the structure they were popped from is the result.
            self.state_dict, self._devices, self._hollow = popped[0], popped[2], False
            return
        devices: dict[int, str] = {}

        def put(path, ph: TensorPlaceholder) -> torch.Tensor:
            if ph.index >= len(tensors):
                raise ValueError(f"got {len(tensors)} tensors, state dict entry {format_path(path)!r} "
                                 f"needs index {ph.index}")
            t = tensors[ph.index]
            if t.dtype != ph.dtype or tuple(t.shape) != ph.shape:
                raise ValueError(f"tensor for state dict entry {format_path(path)!r} has {t.dtype} "
                                 f"{tuple(t.shape)}, expected {ph.dtype} {ph.shape}")
            devices.setdefault(ph.index, ph.device)
            return t

        new = map_leaves(self.state_dict, _is_placeholder, put)
        if len(devices) != len(tensors):  # every index is < len(tensors): equal counts cover them all
            raise ValueError(f"got {len(tensors)} tensors for {len(devices)} distinct placeholders")
        self.state_dict = new
        self._devices = [devices[i] for i in range(len(tensors))]
        self._hollow = False

    def init_tensors(self) -> None:
        placeholders: dict[int, TensorPlaceholder] = {}
        map_leaves(self.state_dict, _is_placeholder, lambda _, ph: placeholders.setdefault(ph.index, ph))
        self.insert_tensors(torch.empty(placeholders[i].shape, dtype=placeholders[i].dtype)
                            for i in sorted(placeholders))

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
