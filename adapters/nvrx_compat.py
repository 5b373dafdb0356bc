"""NVIDIA nvidia-resiliency-ext (NVRx) import paths served by tasd, for code written against NVRx
(Megatron-LM's) on a machine without NVRx.

:func:`install` registers these modules in ``sys.modules`` (module: names it provides):

- ``nvidia_resiliency_ext``, ``nvidia_resiliency_ext.checkpointing``,
  ``nvidia_resiliency_ext.checkpointing.local``, ``...local.ckpt_managers``,
  ``...local.replication``, ``nvidia_resiliency_ext.checkpointing.async_ckpt``: packages only
  (no ``__version__``, see below);
- ``nvidia_resiliency_ext.checkpointing.local.base_state_dict``: ``TensorAwareStateDict`` (a
  subclass of tasd's ABC with NVRx's default ``values()``: megatron-core's
  ``MCoreTensorAwareStateDict``, imported afterwards, subclasses it, so tasd's managers take it;
  every tasd state dict counts as an instance of it);
- ``...local.basic_state_dict``: ``BasicTensorAwareStateDict`` (tasd's);
- ``...local.ckpt_managers.base_manager``: ``BaseCheckpointManager``, ``CheckpointingException``;
- ``...local.ckpt_managers.local_manager``: ``LocalCheckpointManager``
  (:class:`tasd.adapters.megatron.MegatronLocalCheckpointManager`: its async requests run on
  megatron-core's AsyncCallsQueue, where Megatron-LM schedules them, and on tasd's);
- ``...local.replication.strategies``: ``ReplicationStrategy``, ``CliqueReplicationStrategy``,
  ``LazyCliqueReplicationStrategy`` (tasd's, same placement; constructed with
  ``from_replication_params(jump, factor)`` or ``(jump, factor)``: NVRx's constructor taking a
  ``GroupWrapper`` has no equivalent, tasd's strategies make their own groups);
- ``...local.replication.group_utils``: ``GroupWrapper`` (:class:`GroupWrapper`),
  ``parse_group_sequence`` (tasd's: lists where NVRx gives tuples);
- ``nvidia_resiliency_ext.checkpointing.async_ckpt.core``: ``AsyncCallsQueue``, ``AsyncRequest``
  (tasd's).

That is everything Megatron-LM core_v0.16.1 imports from NVRx for local checkpoints
(``training.py``, ``arguments.py``, and megatron-core's ``tensor_aware_state_dict``). Nothing else
is provided: importing any other NVRx module raises ModuleNotFoundError. In particular no
``__version__`` is claimed and NVRx's global-checkpoint async writer
(``async_ckpt.filesystem_async``, ``state_dict_saver``, ``cached_metadata_filesystem_reader``) is
absent: newer Megatron-LM (0.17 and later) asserts NVRx >= 0.6.0 and imports those symbols to
decide whether to use NVRx's async writer; with these modules its probe finds them missing and it
falls back to megatron-core's writer, instead of meeting a version that promises them.

With ``route_mcore=True``, ``megatron.core.dist_checkpointing.tensor_aware_state_dict.
MCoreTensorAwareStateDict`` (which Megatron-LM's ``save_checkpoint`` imports at each save) is
replaced by tasd's device-agnostic ``tasd.mcore.MCoreTensorAwareStateDict``, whose
'fully_parallel' algorithm also runs without CUDA.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types
from typing import Any, Iterable, TypeVar

import torch
import torch.distributed as dist

import tasd
from tasd.managers.replication import parse_group_sequence

logger = logging.getLogger(__name__)

ROOT = "nvidia_resiliency_ext"
_LOCAL = f"{ROOT}.checkpointing.local"

#: The modules :func:`install` registers and the names each provides (empty: a package only).
COVERED: dict[str, tuple[str, ...]] = {
    ROOT: (),
    f"{ROOT}.checkpointing": (),
    _LOCAL: (),
    f"{_LOCAL}.base_state_dict": ("TensorAwareStateDict",),
    f"{_LOCAL}.basic_state_dict": ("BasicTensorAwareStateDict",),
    f"{_LOCAL}.ckpt_managers": (),
    f"{_LOCAL}.ckpt_managers.base_manager": ("BaseCheckpointManager", "CheckpointingException"),
    f"{_LOCAL}.ckpt_managers.local_manager": ("LocalCheckpointManager",),
    f"{_LOCAL}.replication": (),
    f"{_LOCAL}.replication.strategies": ("ReplicationStrategy", "CliqueReplicationStrategy",
                                          "LazyCliqueReplicationStrategy"),
    f"{_LOCAL}.replication.group_utils": ("GroupWrapper", "parse_group_sequence"),
    f"{ROOT}.checkpointing.async_ckpt": (),
    f"{ROOT}.checkpointing.async_ckpt.core": ("AsyncCallsQueue", "AsyncRequest"),
}

_MARK = "__tasd_compat__"  # set on every module install() registers
_MCORE_TASD = "megatron.core.dist_checkpointing.tensor_aware_state_dict"

T = TypeVar("T")


class TensorAwareStateDict(tasd.TensorAwareStateDict):
    """NVRx's ``TensorAwareStateDict`` base as tasd serves it: tasd's ABC with NVRx's default
    ``values()`` (the instance's attribute values), so that megatron-core's
    ``MCoreTensorAwareStateDict``, which implements every other member, can be instantiated.
    ``isinstance(x, TensorAwareStateDict)`` holds for every tasd state dict."""

    def values(self) -> Any:
        """The values of the instance's attributes (NVRx's default)."""
        return vars(self).values()

    @classmethod
    def __subclasshook__(cls, candidate: type) -> Any:
        if cls is TensorAwareStateDict and issubclass(candidate, tasd.TensorAwareStateDict):
            return True
        return NotImplemented


class GroupWrapper:
    """NVRx's ``GroupWrapper``: a torch process group (None: the world) with rank conversions and
    two object/tensor collectives on it.

    NVRx's replication code passes it around; Megatron-LM core_v0.16.1 imports it and never uses
    it. This class keeps NVRx's group-level members (``wrap``, ``from_list_of_groups``, ``group``,
    ``backend``, ``ranks``, ``world_size``, ``get_group_rank``/``my_group_rank``,
    ``get_global_rank``/``my_global_rank``, ``all_gather_object``, ``broadcast``) with NVRx's
    meaning. It leaves out NVRx's replica-exchange internals (``isend_state_dict``,
    ``irecv_state_dict``, ``all_gather_batch``, ``execute_plan``), its device selection and its
    XLA gloo twin group: tasd's strategies move parts on their own gloo groups and take no
    GroupWrapper. Collectives run on ``group`` as given (for NCCL, tensors must be on the current
    CUDA device)."""

    def __init__(self, group: Any = None):
        self._group = group

    @staticmethod
    def wrap(group: Any) -> "GroupWrapper":
        """``group`` itself when it is a GroupWrapper, else a GroupWrapper around it."""
        return group if isinstance(group, GroupWrapper) else GroupWrapper(group)

    @staticmethod
    def from_list_of_groups(list_of_groups: Iterable[Any]) -> "GroupWrapper":
        """The wrapper of the one group in ``list_of_groups`` that contains this rank. Raises
        ValueError when this rank is in none of them or in more than one."""
        me = dist.get_rank()
        mine = [g for g in list_of_groups if me in dist.get_process_group_ranks(g)]
        if len(mine) != 1:
            raise ValueError(f"rank {me} must be in exactly one of the groups, found it in {len(mine)}")
        return GroupWrapper(mine[0])

    @property
    def group(self) -> Any:
        """The wrapped process group (None: the world)."""
        return self._group

    @property
    def backend(self) -> str:
        """The group's backend name (e.g. "gloo", "nccl")."""
        return dist.get_backend(self._group)

    @property
    def ranks(self) -> Any:
        """Global ranks of the group's members, in group-rank order."""
        if self._group is None:
            return range(dist.get_world_size())
        return dist.get_process_group_ranks(self._group)

    @property
    def world_size(self) -> int:
        """Number of ranks in the group."""
        return dist.get_world_size(self._group)

    def get_group_rank(self, global_rank: int | None = None) -> int:
        """The group rank of ``global_rank`` (default: this process)."""
        if global_rank is None:
            return dist.get_rank(self._group)
        if self._group is None:
            return global_rank
        return dist.get_group_rank(self._group, global_rank)

    @property
    def my_group_rank(self) -> int:
        return self.get_group_rank(None)

    def get_global_rank(self, group_rank: int | None = None) -> int:
        """The global rank of ``group_rank`` (default: this process)."""
        if group_rank is None or self._group is None:
            return dist.get_rank() if group_rank is None else group_rank
        return dist.get_global_rank(self._group, group_rank)

    @property
    def my_global_rank(self) -> int:
        return self.get_global_rank(None)

    def all_gather_object(self, my_obj: T) -> list[T]:
        """Every member's ``my_obj``, in group-rank order (collective over the group)."""
        result: list[Any] = [None] * self.world_size
        dist.all_gather_object(result, my_obj, group=self._group)
        return result

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """Broadcast ``tensor`` in place from global rank ``src`` (collective over the group)."""
        dist.broadcast(tensor, src=src, group=self._group)

    def __repr__(self) -> str:
        return (f"<ProcessGroup of size {self.world_size}, rank: local={self.my_group_rank}, "
                f"global={self.my_global_rank}>")


def _provided(name: str) -> dict[str, Any]:
    from tasd.adapters.megatron import MegatronLocalCheckpointManager
    from tasd.managers import BaseCheckpointManager, CheckpointingException
    from tasd.managers.async_ckpt import AsyncCallsQueue, AsyncRequest
    from tasd.managers.replication import (CliqueReplicationStrategy, LazyCliqueReplicationStrategy,
                                           ReplicationStrategy)

    values = {
        "TensorAwareStateDict": TensorAwareStateDict,
        "BasicTensorAwareStateDict": tasd.BasicTensorAwareStateDict,
        "BaseCheckpointManager": BaseCheckpointManager,
        "CheckpointingException": CheckpointingException,
        "LocalCheckpointManager": MegatronLocalCheckpointManager,
        "ReplicationStrategy": ReplicationStrategy,
        "CliqueReplicationStrategy": CliqueReplicationStrategy,
        "LazyCliqueReplicationStrategy": LazyCliqueReplicationStrategy,
        "GroupWrapper": GroupWrapper,
        "parse_group_sequence": parse_group_sequence,
        "AsyncCallsQueue": AsyncCallsQueue,
        "AsyncRequest": AsyncRequest,
    }
    return {n: values[n] for n in COVERED[name]}


def is_installed() -> bool:
    """Whether :func:`install` put its modules in place in this process."""
    return getattr(sys.modules.get(ROOT), _MARK, False)


def real_nvrx_present() -> bool:
    """Whether an NVRx other than these compatibility modules is imported or importable."""
    module = sys.modules.get(ROOT)
    if module is not None:
        return not getattr(module, _MARK, False)
    try:
        return importlib.util.find_spec(ROOT) is not None
    except (ImportError, ValueError):
        return False


def _register() -> None:
    for name, names in COVERED.items():
        module = types.ModuleType(name, f"tasd's stand-in for NVRx's {name} (see tasd.adapters.nvrx_compat)")
        is_package = not names
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
        if is_package:
            module.__path__ = []  # a package without files: other submodules are not found
        module.__dict__.update(_provided(name))
        module.__all__ = list(names)
        setattr(module, _MARK, True)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def _route_mcore() -> None:
    try:
        from tasd.mcore import MCoreTensorAwareStateDict
    except ImportError as e:
        raise ImportError("install_nvrx_compat(route_mcore=True) needs tasd.mcore (megatron-core installed: "
                          f"pip install 'tasd-checkpoint[megatron]'): {e}") from e
    module = importlib.import_module(_MCORE_TASD)
    if module.MCoreTensorAwareStateDict is not MCoreTensorAwareStateDict:
        module.MCoreTensorAwareStateDict = MCoreTensorAwareStateDict
        logger.info("%s.MCoreTensorAwareStateDict now resolves to tasd.mcore.MCoreTensorAwareStateDict", _MCORE_TASD)


def install(route_mcore: bool = False) -> bool:
    """Register the modules listed in the module docstring in ``sys.modules``, unless NVRx itself
    is importable: then nothing is changed (not even with ``route_mcore``), a warning is logged
    and False is returned, so that the real NVRx is used. Returns True when the compatibility
    modules are in place (installed now or before).

    Idempotent: a second call changes nothing, except that ``route_mcore=True`` routes
    megatron-core's ``MCoreTensorAwareStateDict`` to tasd's when an earlier call did not (the
    routing is never undone). Call it before megatron-core's
    ``dist_checkpointing.tensor_aware_state_dict`` is imported: that module decides at import
    whether NVRx is present; imported earlier, its class has no TensorAwareStateDict base and
    refuses to save, so then this raises RuntimeError (unless ``route_mcore=True``, which
    replaces that class). Raises ImportError when ``route_mcore=True`` and ``tasd.mcore`` cannot
    be imported. Local to this process (not collective)."""
    if not is_installed():
        if real_nvrx_present():
            logger.warning("nvidia_resiliency_ext is installed: install_nvrx_compat() leaves it in place and "
                           "registers nothing")
            return False
        early = sys.modules.get(_MCORE_TASD)
        if early is not None and not getattr(early, "HAVE_NVRX", True) and not route_mcore:
            raise RuntimeError(
                f"{_MCORE_TASD} was imported before install_nvrx_compat(): its MCoreTensorAwareStateDict was built "
                "without a TensorAwareStateDict base and refuses to save; call install_nvrx_compat() before importing "
                "megatron-core's checkpointing, or pass route_mcore=True to use tasd.mcore's class instead")
        _register()
        logger.info("NVRx import paths now resolve to tasd: %s", ", ".join(COVERED))
    if route_mcore:
        _route_mcore()
    return True
