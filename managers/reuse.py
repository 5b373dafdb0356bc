"""Keeping the last loaded checkpoint for a repeat load of the same checkpoint.

Megatron-LM loads a local checkpoint twice per resume (``_load_base_checkpoint`` with
``rank0=True`` for the common part and the arguments, then again for everything), calling
``find_latest()`` and ``load()`` each time. Without help the second load reads every part again
and, for a rank that lost its part, moves it from a peer again. :class:`LoadedCopy` keeps what a
load returned so that the next load of the same checkpoint reads no file and moves nothing.

What is kept: a deep copy of the hollow state dict as decoded (before its tensors went in) and
references to the loaded tensors, with a fingerprint of each (dtype, shape and the xxh3-64 of its
bytes, taken when the load returned). No tensor bytes are copied to keep them.

What a repeat load returns: a fresh state dict built from the kept hollow copy, equal to what the
first load returned, and independent of it: a tensor that nothing but the cache references any
more (the usual case: Megatron-LM drops the first result after reading its common part) is handed
over as it is; one that the first result still references is cloned. A kept tensor that no longer
matches its fingerprint (the caller changed it in place, resized it or moved it) makes the repeat
load read the checkpoint again instead.
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import Any

import torch
import xxhash

from tasd import device
from tasd.state_dict import TensorAwareStateDict

logger = logging.getLogger(__name__)

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: without it, tensors are cloned


def _byte_view(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1)
    if not flat.numel():
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def fingerprint(t: torch.Tensor) -> tuple | None:
    """(dtype, shape, xxh3-64 of the bytes) of a contiguous CPU tensor; None for anything else
    (which is never reused). Local; hashing releases the GIL."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous() or t.is_sparse:
        return None
    try:
        digest = xxhash.xxh3_64_intdigest(_byte_view(t))
    except (RuntimeError, TypeError, ValueError):  # a dtype without a byte view
        return None
    return t.dtype, tuple(t.shape), digest


def _counts(tensors: list, i: int) -> tuple:
    """References to ``tensors[i]``, to its base (a large loaded tensor is a view of its mapping)
    and to its storage, as seen from here."""
    t = tensors[i]
    base = t._base
    storage = t.untyped_storage()
    return (sys.getrefcount(t), None if base is None else sys.getrefcount(base), _use_count(storage._cdata),
            sys.getrefcount(storage))


_alone: dict[bool, tuple] = {}  # the same figures for loaded tensors nothing else references, by "is a view"


def _alone_counts(is_view: bool) -> tuple:
    if is_view not in _alone:
        nbytes = (device._POPULATE_MIN_BYTES if is_view else 16)
        probe = [device.host_tensor((nbytes // 4,), torch.float32)]
        if (probe[0]._base is not None) != is_view:  # allocation kinds changed: never hand over
            _alone[is_view] = ()
        else:
            _alone[is_view] = _counts(probe, 0)
    return _alone[is_view]


def _held_only_here(tensors: list, i: int) -> bool:
    """Whether nothing but ``tensors`` references ``tensors[i]``, its base, its storage or a view
    of it (so handing it over cannot alias anything the caller holds). False when unsure."""
    if _use_count is None:
        return False
    try:
        return _counts(tensors, i) == _alone_counts(tensors[i]._base is not None)
    except Exception:  # private API changed: clone instead
        return False


class LoadedCopy:
    """A load's result kept for the next load of the same checkpoint (see the module docstring).

    ``key``: (iteration, save id) of the checkpoint; ``ckpt_id``: what the load returned with it;
    ``hollow``: the hollow state dict as decoded; ``tensors``: the loaded tensors in placeholder
    order. Fingerprints are taken here, so build it before handing the result to the caller. Not
    thread-safe; local (nothing here is collective).
    """

    def __init__(self, key: tuple[int, str], ckpt_id: tuple, hollow: TensorAwareStateDict, tensors: list[torch.Tensor]):
        self.key = key
        self.ckpt_id = ckpt_id
        self._hollow: TensorAwareStateDict | None = hollow
        self._tensors: list[torch.Tensor] = list(tensors)
        self._prints = [fingerprint(t) for t in self._tensors]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this copy keeps alive."""
        return sum(t.nbytes for t in self._tensors)

    def intact(self) -> bool:
        """Whether every kept tensor still matches its fingerprint (reads every byte once)."""
        if self._hollow is None:
            return False
        return all(p is not None and fingerprint(t) == p for t, p in zip(self._tensors, self._prints))

    def take(self) -> TensorAwareStateDict:
        """The state dict again, independent of every earlier result: the kept hollow copy with the
        tensors inserted, each handed over when nothing else references it, else cloned. Empties
        this copy (a later take raises ValueError). Call :meth:`intact` first."""
        if self._hollow is None:
            raise ValueError("this loaded copy was already taken")
        sd, self._hollow = self._hollow, None
        tensors, self._tensors = self._tensors, []
        out, cloned = [], 0
        for i in range(len(tensors)):
            if _held_only_here(tensors, i):
                out.append(tensors[i])
            else:
                out.append(tensors[i].clone())
                cloned += 1
            tensors[i] = None  # type: ignore[call-overload]  # the next check must not count this list
        sd.insert_tensors(out)
        logger.debug("reused the last load: %d tensor(s) handed over, %d cloned", len(out) - cloned, cloned)
        return sd


def hollow_copy(hollow: Any) -> Any:
    """A deep copy of a decoded hollow state dict, taken before its tensors are inserted."""
    return copy.deepcopy(hollow)
