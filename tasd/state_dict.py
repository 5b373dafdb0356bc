"""The TensorAwareStateDict contract shared by every backend (Basic, MCore, FSDP)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Iterator

import torch

from tasd.serialization import register_library_class


@register_library_class
class TensorPlaceholder:
    """Stands where a tensor was popped: its index in ``pop_tensors()`` order and its layout.

    ``device`` is the device the tensor came from (used by ``restore_tensor_device``).
    """

    __slots__ = ("index", "dtype", "shape", "device")

    def __init__(self, index: int, dtype: torch.dtype, shape: tuple[int, ...], device: str = "cpu"):
        self.index, self.dtype, self.shape, self.device = index, dtype, tuple(shape), device

    def __reduce__(self):
        return (TensorPlaceholder, (self.index, self.dtype, self.shape, self.device))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorPlaceholder) and self.__reduce__() == other.__reduce__()

    def __hash__(self) -> int:
        return hash(self.__reduce__()[1])

    def __repr__(self) -> str:
        return f"TensorPlaceholder({self.index}, {self.dtype}, {self.shape}, {self.device!r})"


class TensorAwareStateDict(ABC):
    """A state dict that can give up its tensors and take them back.

    Popping leaves a *hollow* object: small, picklable, holding only metadata
    (:class:`TensorPlaceholder` where tensors were). Invariant:
    ``sd.insert_tensors(sd.pop_tensors())`` leaves ``sd`` equal to before. None of the methods is
    collective. Misuse (popping a hollow object, inserting into a full one, tensors that do not
    match the placeholders) raises ValueError; unstageable content raises TypeError naming the key.
    """

    @abstractmethod
    def pop_tensors(self) -> list[torch.Tensor]:
        """Remove and return all tensors in walk order; the object becomes hollow. A tensor found
        under several keys (tied weights: the same view of the same storage) is returned once."""

    @property
    @abstractmethod
    def tensors(self) -> Iterator[torch.Tensor]:
        """The tensors in walk order (ValueError when hollow)."""

    @property
    @abstractmethod
    def is_hollow(self) -> bool:
        """True after pop_tensors and before insert_tensors/init_tensors."""

    @abstractmethod
    def insert_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Put back tensors matching the placeholders (dtype and shape) in walk order; a tensor
        popped once for several keys is put back, as one object, at all of them."""

    @abstractmethod
    def init_tensors(self) -> None:
        """Fill a hollow object with uninitialized CPU tensors matching its placeholders."""

    @abstractmethod
    def copy_tensors_to_cpu(self, non_blocking: bool = False) -> None:
        """Replace every tensor by a host copy in a reusable (pinned with CUDA) staging buffer.

        CPU tensors are copied too (a point-in-time snapshot). The copies stay valid while this
        object holds them; the buffer returns to its pool when the object is collected or the
        next copy_tensors_to_cpu replaces them. With ``non_blocking`` call
        :func:`tasd.device.synchronize_stream` before reading them.
        """

    @abstractmethod
    def restore_tensor_device(self, non_blocking: bool = True) -> None:
        """Move tensors back to the devices they were staged or saved from."""

    @abstractmethod
    def values(self) -> Iterator[Any]:
        """The top-level values of the wrapped state dict."""
