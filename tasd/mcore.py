"""MCoreTensorAwareStateDict: megatron-core sharded state dicts as a TensorAwareStateDict.

A drop-in for megatron-core's class of the same name as Megatron-LM's local checkpointing calls it::

    tasd_sd, cache = MCoreTensorAwareStateDict.from_state_dict(
        sharded_state_dict, algo="fully_parallel", parallelization_group=dp_group, cached_metadata=cache)
    manager.save(tasd_sd, iteration, is_async=...)
    ...
    loaded, ckpt_id = manager.load()
    state_dict = loaded.to_state_dict(sharded_state_dict, algo="fully_parallel", parallelization_group=dp_group)

``from_state_dict`` splits the sharded state dict as megatron-core's own does (factories applied,
LocalNonpersistentObjects dropped, ShardedTensors and ShardedObjects apart from the *common*
part) without changing the caller's dict. With ``algo="atomic"`` every rank keeps all its shards;
with ``"fully_parallel"`` each shard replicated across the parallelization group (the same key,
global offset and flattened range on several ranks: DP replicas) is kept by exactly one of its
ranks (:mod:`tasd.mcore_parallel`), so a DP group writes each replicated byte about once.
``to_state_dict`` fills the given sharded state dict's structure with the loaded data (fetching
the shards this rank did not keep from the ranks that did, fully parallel) and returns a regular
state dict, as megatron-core's own does.

The hollow object is plain data: shard records ``(key, global_offset, flattened range or None,
global_shape)``, ShardedObject records ``(key, global_offset, global_shape, data)``, the common
part, and :class:`~tasd.state_dict.TensorPlaceholder` where tensors were (ShardedTensor data
first, in the sharded state dict's order, then tensors inside ShardedObjects, then in the common
part). No megatron-core object is pickled; the megatron-core enums that Megatron's ``args``
(a ``argparse.Namespace`` in the common part) holds are allowed by value
(:func:`tasd.serialization.add_safe_enums`): ``ModelType``, ``AttnBackend``, ``CudaGraphScope``.

Needs megatron-core (the ``megatron`` extra).
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Iterable, Iterator

import torch

try:
    from megatron.core.dist_checkpointing.dict_utils import (dict_list_map_inplace, dict_list_map_outplace, merge,
                                                             nested_values)
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess, save_preprocess
    from megatron.core.dist_checkpointing.utils import extract_sharded_base
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend, CudaGraphScope
except ImportError as _e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("tasd.mcore needs megatron-core: install tasd with the `megatron` extra "
                      "(pip install 'tasd-checkpoint[megatron]')") from _e

from tasd import mcore_parallel
from tasd.basic import BasicTensorAwareStateDict
from tasd.managers.errors import CheckpointingException
from tasd.mcore_parallel import FullyParallelMetadata, ShardId, ShardMismatchError, current_rank, describe
from tasd.serialization import add_safe_enums, register_library_class
from tasd.staging import HostBufferPool
from tasd.state_dict import TensorAwareStateDict

__all__ = ["MCoreTensorAwareStateDict", "FullyParallelMetadata", "ShardMismatchError", "ALGOS"]

logger = logging.getLogger(__name__)

ALGOS = ("fully_parallel", "atomic")
#: Version of the hollow format (``__getstate__``).
HOLLOW_VERSION = 1

# Megatron-LM's args carry these enums (TransformerConfig fields, the model type, the exit signal).
add_safe_enums([ModelType, AttnBackend, CudaGraphScope, signal.Signals])


def _check_algo(algo: Any) -> None:
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}: MCoreTensorAwareStateDict supports {' and '.join(map(repr, ALGOS))}")


def shard_id(sh: ShardedTensor) -> ShardId:
    """megatron-core's identity of a tensor shard: (key, global_offset, (start, stop) or None)."""
    fr = sh.flattened_range
    return (sh.key, tuple(int(o) for o in sh.global_offset), None if fr is None else (int(fr.start), int(fr.stop)))


def object_id(sh: ShardedObject) -> tuple:
    """megatron-core's identity of a ShardedObject: (key, global_offset, global_shape)."""
    return (sh.key, tuple(int(o) for o in sh.global_offset), tuple(int(s) for s in sh.global_shape))


def data_shape(sh: ShardedTensor) -> tuple[int, ...]:
    """The shape of a ShardedTensor's data: 1-D over its flattened range, else its local shape."""
    fr = sh.flattened_range
    return (fr.stop - fr.start,) if fr is not None else tuple(sh.local_shape)


def _split(sharded_state_dict: dict, rank: int) -> tuple[dict, list[ShardedTensor], list[ShardedObject]]:
    """(common part, ShardedTensors, ShardedObjects) of a sharded state dict, as megatron-core's
    save_preprocess splits it, leaving the caller's dict as it was. Raises ValueError naming the
    key for data that does not match its ShardedTensor, CheckpointingException for two different
    shards with one identity, TypeError for sharded types it cannot save."""
    if not isinstance(sharded_state_dict, dict):
        raise TypeError(f"from_state_dict takes a sharded state dict (a dict), got {type(sharded_state_dict).__name__}")
    copy = dict_list_map_outplace(lambda x: x, sharded_state_dict)  # apply_factories works in place
    sharded, common = save_preprocess(copy, validate_access_integrity=False)
    if isinstance(common.get("content_metadata"), dict):  # Megatron puts its DP group there: not data
        common["content_metadata"] = {k: v for k, v in common["content_metadata"].items() if k != "dp_cp_group"}
    tensors: dict[ShardId, ShardedTensor] = {}
    objects: dict[tuple, ShardedObject] = {}
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor):
            data = sh.data
            if not isinstance(data, torch.Tensor) or data.dtype != sh.dtype or tuple(data.shape) != data_shape(sh):
                got = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
                raise ValueError(f"ShardedTensor {describe(shard_id(sh))} on rank {rank} holds {got}, its metadata "
                                 f"says {sh.dtype} {data_shape(sh)}")
            seen, table, sid = tensors, "ShardedTensors", shard_id(sh)
        elif isinstance(sh, ShardedObject):
            seen, table, sid = objects, "ShardedObjects", object_id(sh)
        else:
            raise TypeError(f"sharded state dict entry {sh.key!r} is a {type(sh).__name__}: MCoreTensorAwareStateDict "
                            f"saves ShardedTensor, ShardedObject, ShardedTensorFactory and LocalNonpersistentObject")
        if sid in seen and seen[sid].data is not sh.data:
            raise CheckpointingException(f"two different {table} on rank {rank} have the identity {sid!r}")
        seen.setdefault(sid, sh)
    return common, list(tensors.values()), list(objects.values())


@register_library_class
class MCoreTensorAwareStateDict(TensorAwareStateDict):
    """A rank's part of a megatron-core sharded state dict, ready for tasd's checkpoint managers.

    Build with :meth:`from_state_dict`; turn a loaded one back into a regular state dict with
    :meth:`to_state_dict`. The tensors (ShardedTensor data kept on this rank, tensors inside
    ShardedObjects and the common part) are handled as by :class:`~tasd.basic.BasicTensorAwareStateDict`
    (staging into pooled host buffers, tied tensors once, devices restored with :mod:`tasd.device`).
    ``algo`` records how it was built. None of the methods but from_state_dict and to_state_dict
    is collective.
    """

    def __init__(self, common: dict, shards: list[tuple], shard_data: list[torch.Tensor], objects: list[tuple],
                 algo: str = "atomic", pool: HostBufferPool | None = None):
        _check_algo(algo)
        self.algo = algo
        self._content = BasicTensorAwareStateDict(
            {"shards": list(shards), "shard_data": list(shard_data), "objects": list(objects), "common": common}, pool)

    # -- building and restoring ------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, sharded_state_dict: dict, algo: str = "fully_parallel", parallelization_group: Any = None,
                        cached_metadata: FullyParallelMetadata | None = None
                        ) -> tuple["MCoreTensorAwareStateDict", FullyParallelMetadata | None]:
        """(this rank's part of ``sharded_state_dict``, cacheable metadata). The caller's dict is
        not changed; the part references its tensors (a manager's save snapshots them).

        ``algo="atomic"``: keeps every shard; not collective; metadata None.
        ``algo="fully_parallel"``: keeps only the shards this rank is chosen for among the ranks of
        ``parallelization_group`` (default: the world) that have them. Collective over that group
        (on tasd's own groups among its ranks) unless ``cached_metadata``, the metadata an earlier
        call returned for the same structure and group, says who keeps what (then no
        communication). Raises ValueError for an unknown algo (before any communication) and for
        ``cached_metadata`` that does not cover this state dict; ValueError/TypeError/
        CheckpointingException naming the key for a sharded state dict it cannot save, on every
        rank of the group when computing the distribution (one rank's failure fails them all).
        """
        _check_algo(algo)
        rank = current_rank()
        tree = None
        if algo == "fully_parallel" and cached_metadata is None:
            tree = mcore_parallel.group_of(parallelization_group)
            tree = tree if tree is not None and tree.size > 1 else None
        common, tensors, objects, infos, error = {}, [], [], None, None
        try:
            common, tensors, objects = _split(sharded_state_dict, rank)
            if tree is not None:
                infos = [(shard_id(sh), mcore_parallel.megatron_size(sh.local_shape, sh.dtype), _is_main(sh.replica_id),
                          str(sh.dtype), data_shape(sh)) for sh in tensors]
        except Exception as e:
            if tree is None:
                raise
            error = e  # reported with the gathered metadata: every rank raises
        metadata = None
        if algo == "fully_parallel":
            if cached_metadata is not None:
                metadata = _check_cached(cached_metadata, tensors, rank)
            elif tree is not None:
                metadata = mcore_parallel.distribute(None if error else infos, tree, error)
            if metadata is not None:
                tensors = [sh for sh in tensors if metadata.saver[shard_id(sh)] == rank]
        shards = [(*shard_id(sh), tuple(int(s) for s in sh.global_shape)) for sh in tensors]
        objs = [(*object_id(sh), sh.data) for sh in objects]
        logger.debug("rank %d keeps %d ShardedTensor(s) and %d ShardedObject(s) (%s)", rank, len(shards), len(objs),
                     algo)
        return cls(common, shards, [sh.data for sh in tensors], objs, algo), metadata

    def to_state_dict(self, sharded_state_dict: dict | None, algo: str = "atomic",
                      parallelization_group: Any = None) -> dict:
        """A regular state dict: the common part, the LocalNonpersistentObjects of
        ``sharded_state_dict`` unwrapped, and each of its ShardedTensors and ShardedObjects replaced
        by the loaded data (ShardedTensorFactories merged back), as megatron-core's own
        ``to_state_dict`` returns it. Tensors are this object's own (CPU after a load unless
        :meth:`restore_tensor_device` was called); shards fetched from peers are CPU tensors.

        Without a sharded state dict (None or empty) returns the common part only, without any
        communication (Megatron's first, common-only, load). ``algo="atomic"``: not collective;
        ``"fully_parallel"``: collective over ``parallelization_group`` (default: the world) on
        tasd's own groups, fetching the shards this rank did not keep from the ranks that did.
        Raises ValueError for an unknown algo (before any communication) or a hollow object, and
        :class:`ShardMismatchError` (a CheckpointingException) naming the key and rank when the
        checkpoint lacks a requested shard or object or holds it with another dtype or shape.
        Fully parallel, a failure on one rank raises on every rank of the group (the others a
        CheckpointingException naming it).
        """
        _check_algo(algo)
        hollow = ValueError("to_state_dict needs the tensors: this MCoreTensorAwareStateDict is hollow")
        if not sharded_state_dict:
            if self.is_hollow:
                raise hollow
            return dict_list_map_outplace(lambda x: x, self.common_state_dict)
        rank = current_rank()
        tree = mcore_parallel.group_of(parallelization_group) if algo == "fully_parallel" else None
        tree = tree if tree is not None and tree.size > 1 else None
        hint = (" (it was saved fully_parallel: load it with algo='fully_parallel' and the same parallelization group)"
                if self.algo == "fully_parallel" and tree is None else "")
        error, held, missing, request = None, {}, {}, None
        try:
            if self.is_hollow:
                raise hollow  # fully parallel: every rank of the group raises
            content = self._content.state_dict
            held = {tuple(r[:3]): t for r, t in zip(content["shards"], content["shard_data"])}
            request = _Request(sharded_state_dict, content, held, rank)
            missing = request.missing
            if missing and tree is None:
                raise ShardMismatchError(f"rank {rank}: the checkpoint lacks {len(missing)} requested shard(s): "
                                         + ", ".join(describe(s) for s in list(missing)[:mcore_parallel.SHOWN]) + hint)
        except Exception as e:
            if tree is None:
                raise
            error = e
        if tree is not None:
            held = {**held, **mcore_parallel.fetch(held, missing, tree, error, hint)}
        return request.fill(dict_list_map_outplace(lambda x: x, self.common_state_dict), held)

    # -- the TensorAwareStateDict contract -----------------------------------------------------------
    @property
    def state_dict(self) -> dict:
        """The content as plain data: ``{"shards": records, "shard_data": tensors, "objects":
        records with data, "common": dict}`` (placeholders instead of tensors when hollow)."""
        return self._content.state_dict

    @property
    def common_state_dict(self) -> dict:
        """The common (non-sharded) part, as megatron-core's class names it."""
        return self._content.state_dict["common"]

    @property
    def is_hollow(self) -> bool:
        """True after :meth:`pop_tensors` and before :meth:`insert_tensors` or :meth:`init_tensors`."""
        return self._content.is_hollow

    def pop_tensors(self) -> list[torch.Tensor]:
        """Remove and return the tensors, each once, in a deterministic order: the ShardedTensor
        data kept on this rank (in the sharded state dict's order), then tensors inside
        ShardedObjects, then those of the common part; leaves placeholders. Called by a manager's
        save and by :meth:`copy_tensors_to_cpu`; not collective. ValueError when already hollow,
        TypeError naming the key path for a tensor that cannot be staged (a tensor subclass, a
        tensor hidden inside another object)."""
        return self._content.pop_tensors()

    @property
    def tensors(self) -> Iterator[torch.Tensor]:
        """The tensors in :meth:`pop_tensors` order (a tied tensor once per place); not
        collective. ValueError when hollow."""
        return self._content.tensors

    def insert_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Put back tensors matching the placeholders, in :meth:`pop_tensors` order (a manager's
        load does this with the tensors it read; ``insert_tensors(pop_tensors())`` restores the
        object as it was). Not collective. ValueError when not hollow or when the count, a dtype or
        a shape does not match."""
        self._content.insert_tensors(tensors)

    def init_tensors(self) -> None:
        """Fill a hollow object with uninitialized CPU tensors matching its placeholders (for a
        caller that reads the data in itself). Not collective; ValueError when not hollow."""
        self._content.init_tensors()

    def copy_tensors_to_cpu(self, non_blocking: bool = False) -> None:
        """Replace every tensor by a host copy in a reusable (pinned with CUDA) staging buffer, a
        point-in-time snapshot; the devices they came from are remembered for
        :meth:`restore_tensor_device`. With ``non_blocking`` call
        :func:`tasd.device.synchronize_stream` before reading the copies. Not collective;
        ValueError when hollow, TypeError naming the key of a tensor that cannot be staged."""
        self._content.copy_tensors_to_cpu(non_blocking)

    def restore_tensor_device(self, non_blocking: bool = True) -> None:
        """Move the tensors back to the devices they were staged or saved from
        (:func:`tasd.device.restore_device`: CPU without CUDA, the current device when that index
        does not exist). Not collective; ValueError when hollow."""
        self._content.restore_tensor_device(non_blocking)

    def values(self) -> Iterator[Any]:
        """The top-level values of the common part, then the data of the ShardedTensors kept on
        this rank (placeholders when hollow), then the data of the ShardedObjects. Not collective."""
        content = self._content.state_dict
        yield from content["common"].values()
        yield from content["shard_data"]
        yield from (rec[3] for rec in content["objects"])

    # -- pickling: hollow only, plain data -----------------------------------------------------------
    def __getstate__(self) -> dict:
        if not self.is_hollow:
            raise TypeError("only a hollow MCoreTensorAwareStateDict can be pickled; call pop_tensors() first")
        return {"version": HOLLOW_VERSION, "algo": self.algo, "content": self._content.state_dict}

    def __setstate__(self, state: dict) -> None:
        """Rebuild a hollow object from :meth:`__getstate__`'s plain data (read from a file or a
        peer): its shape is checked, ValueError for anything else."""
        content = state.get("content") if isinstance(state, dict) else None
        if (not isinstance(state, dict) or state.get("version") != HOLLOW_VERSION or state.get("algo") not in ALGOS
                or not isinstance(content, dict) or set(content) != {"shards", "shard_data", "objects", "common"}
                or not all(isinstance(content[k], list) for k in ("shards", "shard_data", "objects"))
                or not isinstance(content["common"], dict) or len(content["shards"]) != len(content["shard_data"])
                or not all(_is_shard_record(r) for r in content["shards"])
                or not all(_is_object_record(r) for r in content["objects"])):
            raise ValueError("not the state of a hollow MCoreTensorAwareStateDict")
        self.algo = state["algo"]
        self._content = BasicTensorAwareStateDict.__new__(BasicTensorAwareStateDict)
        self._content.__setstate__({"state_dict": content})


def _is_shard_record(r: Any) -> bool:
    return (isinstance(r, tuple) and len(r) == 4 and isinstance(r[0], str) and isinstance(r[1], tuple)
            and (r[2] is None or (isinstance(r[2], tuple) and len(r[2]) == 2)) and isinstance(r[3], tuple))


def _is_object_record(r: Any) -> bool:
    return (isinstance(r, tuple) and len(r) == 4 and isinstance(r[0], str) and isinstance(r[1], tuple)
            and isinstance(r[2], tuple))


def _is_main(replica_id: Any) -> bool:
    return replica_id == 0 if isinstance(replica_id, int) else all(r == 0 for r in replica_id)


def _check_cached(cached: Any, tensors: list[ShardedTensor], rank: int) -> FullyParallelMetadata:
    """``cached`` if it says who keeps each of this rank's shards; ValueError naming a shard otherwise."""
    if not isinstance(cached, FullyParallelMetadata):
        raise ValueError(f"cached_metadata must be the metadata from_state_dict returned, got {type(cached).__name__}")
    if rank not in cached.group_ranks:
        raise ValueError(f"cached_metadata is for the group {list(cached.group_ranks)[:16]}, which lacks rank {rank}")
    for sh in tensors:
        if shard_id(sh) not in cached.saver:
            raise ValueError(f"cached_metadata does not cover ShardedTensor {describe(shard_id(sh))} on rank {rank}: "
                             f"the state dict's structure changed; pass cached_metadata=None")
    return cached


class _Request:
    """What a sharded state dict asks ``to_state_dict`` for, matched against what this rank holds.

    ``missing``: shard id -> (dtype, data shape) of the requested shards this rank does not hold.
    Construction raises ShardMismatchError for a held shard with another dtype or shape, or a
    requested ShardedObject the checkpoint lacks."""

    def __init__(self, sharded_state_dict: dict, content: dict, held: dict[ShardId, torch.Tensor], rank: int):
        sharded, self.nonpersistent, self.factories = load_preprocess(sharded_state_dict)
        self.sharded, _ = extract_sharded_base(sharded)
        self.objects = {tuple(r[:3]): r[3] for r in content["objects"]}
        self.missing: dict[ShardId, tuple[torch.dtype, tuple]] = {}
        problems = []
        for sh in nested_values(self.sharded):
            if isinstance(sh, ShardedTensor):
                sid, want = shard_id(sh), data_shape(sh)
                t = held.get(sid)
                if t is None:
                    self.missing[sid] = (sh.dtype, want)
                elif t.dtype != sh.dtype or (not sh.allow_shape_mismatch and tuple(t.shape) != want):
                    problems.append(f"ShardedTensor {describe(sid)} is {t.dtype} {tuple(t.shape)} in the checkpoint, "
                                    f"the sharded state dict asks for {sh.dtype} {want}")
            elif isinstance(sh, ShardedObject):
                if object_id(sh) not in self.objects:
                    problems.append(f"ShardedObject {sh.key!r} (offset {tuple(sh.global_offset)}, shape "
                                    f"{tuple(sh.global_shape)}) is not in the checkpoint")
        if problems:
            raise ShardMismatchError(f"rank {rank}: the sharded state dict does not match the checkpoint: "
                                     + "; ".join(problems[:mcore_parallel.SHOWN])
                                     + (" ..." if len(problems) > mcore_parallel.SHOWN else ""))

    def fill(self, result: dict, tensors: dict[ShardId, torch.Tensor]) -> dict:
        """Merge the non-persistent objects and the loaded sharded part into ``result``."""
        merge(result, self.nonpersistent)

        def load(x: Any) -> Any:
            if isinstance(x, ShardedTensor):
                return tensors[shard_id(x)]
            if isinstance(x, ShardedObject):
                return self.objects[object_id(x)]
            return x

        dict_list_map_inplace(load, self.sharded)
        merge(result, apply_factory_merges(self.sharded, self.factories))
        return result
