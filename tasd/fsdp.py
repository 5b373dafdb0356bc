"""FSDPTensorAwareStateDict: FSDP state dicts (DTensors) as a TensorAwareStateDict.

Wraps what ``torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer)`` returns for
FSDP2 (``torch.distributed.fsdp.fully_shard``) or FSDP1 given a device mesh: nested dicts, lists and
tuples whose leaves are DTensors (parameters, optimizer moments), plain tensors (the optimizer's
``step``) and other objects. The caller usually wraps the pair as ``{"model": msd, "optim": osd}``::

    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from tasd.fsdp import FSDPTensorAwareStateDict

    msd, osd = get_state_dict(model, optim)
    manager.save(FSDPTensorAwareStateDict({"model": msd, "optim": osd}), iteration)
    ...
    # after a restart, in a fresh process whose model is sharded on `mesh` again
    if manager.find_latest() >= 0:
        sd, ckpt_id = manager.load()
        sd.attach_mesh(mesh)                      # the live mesh: a checkpoint cannot carry one
        set_state_dict(model, optim, model_state_dict=sd.state_dict["model"],
                       optim_state_dict=sd.state_dict["optim"])

**What is saved.** :meth:`~FSDPTensorAwareStateDict.pop_tensors` pops each DTensor's *local
shard* (a plain tensor: staging and the part format take it as it is) and the plain tensors. The
hollow object keeps, as plain data: a :class:`DTensorPlaceholder` where each DTensor was (its local
shard's index, dtype, shape and device like a :class:`~tasd.state_dict.TensorPlaceholder`, plus its
placements as plain tuples -- ``("shard", dim)``, ``("strided_shard", dim, split_factor)``,
``("replicate",)``, ``("partial", reduce_op)`` --, global shape and global stride, and the index of
its mesh record), a ``TensorPlaceholder`` where each plain tensor was, and one *mesh record* per
distinct device mesh: ``{"device_type", "dim_names", "shape", "coordinate", "world_size"}`` (this
rank's coordinate in the mesh and the world size when it was saved). No DeviceMesh, placement or
process group object is pickled: a pickled DeviceMesh names process groups of the process that
made it and cannot be rebuilt in another one.

**The live mesh.** DTensors are re-created with ``DTensor.from_local(shard, mesh, placements,
shape=global_shape, stride=global_stride, run_check=False)`` on a *live* mesh, which is:

- in the process that popped the tensors, the mesh each DTensor was on (remembered, not pickled);
- otherwise the mesh given to :meth:`~FSDPTensorAwareStateDict.attach_mesh`, which checks it
  against the mesh records at once: same dimension names and shape, same world size, and this rank
  at the same coordinate (a record naming a subset of the live mesh's dimensions, e.g. a DTensor
  saved on ``mesh["shard"]`` of a 2-D mesh, is matched against that sub-mesh). Anything else raises
  :class:`MeshMismatchError` naming the key, the rank and both meshes: local checkpoints are per
  rank, so restore onto the same mesh shape and world size.

Inserting tensors never needs the mesh (a manager's ``load`` inserts the tensors it read before
the caller can pass one, and a failure there would mark the file damaged): the local shards are
kept, and the DTensors are built when ``state_dict`` (or ``values()``) is first read. Reading them
with no live mesh known raises ValueError naming the key and the rank, saying to call
``attach_mesh``. So a fresh process calls ``attach_mesh`` after ``load`` (or, with a hollow object
it holds, before or after ``insert_tensors``).

Plain tensors, tied tensors (one tensor under several keys, one DTensor object under several keys:
popped once, put back as one object at every key), containers, pickling of hollow objects only,
staging (:meth:`~FSDPTensorAwareStateDict.copy_tensors_to_cpu`) and the TypeError naming the key for
content that cannot be staged follow :class:`~tasd.basic.BasicTensorAwareStateDict`. Legacy FSDP1
``ShardedTensor`` values are refused with a TypeError saying how to get DTensors instead.

Uneven shards (a dimension not divisible by the mesh size: ranks hold local shards of different
sizes, possibly empty) round-trip exactly, since the global shape and stride are recorded.
Nothing in this module is collective (``from_local`` with ``run_check=False`` communicates nothing).
"""

from __future__ import annotations

import logging
import operator
import sys
import weakref
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from tasd import device
from tasd.basic import TensorIndex
from tasd.managers.errors import CheckpointingException
from tasd.serialization import register_library_class
from tasd.staging import HostBufferPool, Staged, check_stageable, stage
from tasd.state_dict import TensorAwareStateDict, TensorPlaceholder
from tasd.tree import KeyPath, format_path, map_leaves, map_tensors

__all__ = ["FSDPTensorAwareStateDict", "DTensorPlaceholder", "MeshMismatchError", "HOLLOW_VERSION"]

logger = logging.getLogger(__name__)

#: Version of the hollow format (``__getstate__``).
HOLLOW_VERSION = 1

_RESTORE_HINT = "local checkpoints are per rank: restore onto the same mesh shape and world size"
_MESH_KEYS = ("device_type", "dim_names", "shape", "coordinate", "world_size")


class MeshMismatchError(CheckpointingException, ValueError):
    """The live device mesh given to :meth:`FSDPTensorAwareStateDict.attach_mesh` does not match
    the mesh a DTensor was saved on (dimension names, shape, this rank's coordinate, or the world
    size). The message names the key, the rank and both meshes."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int | None:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else None


# -- placements as plain data ------------------------------------------------------------------

def _placement_record(p: Any) -> tuple | None:
    """A placement as a plain tuple, or None for a placement type this module does not save."""
    t = type(p)
    if t is Shard:
        return ("shard", int(p.dim))
    if t is _StridedShard:
        return ("strided_shard", int(p.dim), int(p.split_factor))
    if t is Replicate:
        return ("replicate",)
    if t is Partial:
        return ("partial", str(p.reduce_op))
    return None


def _is_placement_record(r: Any) -> bool:
    if type(r) is not tuple or not r:
        return False
    kind, args = r[0], r[1:]
    if kind == "shard":
        return len(args) == 1 and type(args[0]) is int
    if kind == "strided_shard":
        return len(args) == 2 and all(type(a) is int for a in args)
    if kind == "replicate":
        return not args
    if kind == "partial":
        return len(args) == 1 and type(args[0]) is str
    return False


def _placement(r: tuple) -> Any:
    kind = r[0]
    if kind == "shard":
        return Shard(r[1])
    if kind == "strided_shard":
        return _StridedShard(r[1], split_factor=r[2])
    if kind == "replicate":
        return Replicate()
    return Partial(r[1])


def _int_tuple(x: Any) -> bool:
    return type(x) is tuple and all(type(i) is int for i in x)


def _is_mesh_record(r: Any) -> bool:
    return (type(r) is dict and tuple(r) == _MESH_KEYS and type(r["device_type"]) is str
            and (r["dim_names"] is None or (type(r["dim_names"]) is tuple
                                            and all(type(n) is str for n in r["dim_names"])))
            and _int_tuple(r["shape"]) and (r["coordinate"] is None or _int_tuple(r["coordinate"]))
            and (r["world_size"] is None or type(r["world_size"]) is int))


def _mesh_record(mesh: DeviceMesh) -> dict:
    names = mesh.mesh_dim_names
    coordinate = mesh.get_coordinate()
    return {"device_type": str(mesh.device_type), "dim_names": None if names is None else tuple(names),
            "shape": tuple(int(s) for s in mesh.shape),
            "coordinate": None if coordinate is None else tuple(int(c) for c in coordinate),
            "world_size": _world_size()}


def _describe_mesh(names: Any, shape: Any, coordinate: Any, world: Any) -> str:
    what = f"a device mesh of shape {tuple(shape)}"
    what += f" with dimension names {tuple(names)}" if names else " without dimension names"
    what += f", this rank at coordinate {tuple(coordinate)}" if coordinate is not None else ", this rank not in it"
    if world is not None:
        what += f", in a world of {world} rank(s)"
    return what


# -- placeholders --------------------------------------------------------------------------------

@register_library_class
class DTensorPlaceholder(TensorPlaceholder):
    """Stands where a DTensor was popped. ``index``, ``dtype``, ``shape`` and ``device`` describe its
    local shard (as a :class:`~tasd.state_dict.TensorPlaceholder` does a plain tensor); ``mesh`` is
    the index of its mesh record in the state dict, ``placements`` its placements as plain tuples
    (see the module docstring), ``global_shape`` and ``global_stride`` the DTensor's own. Plain data
    only; the constructor checks the types (ValueError), since it also runs when a hollow state dict
    is decoded."""

    __slots__ = ("mesh", "placements", "global_shape", "global_stride")

    def __init__(self, index: int, dtype: torch.dtype, shape: tuple[int, ...], device: str, mesh: int,
                 placements: tuple, global_shape: tuple[int, ...], global_stride: tuple[int, ...]):
        super().__init__(index, dtype, shape, device)
        placements, global_shape, global_stride = tuple(placements), tuple(global_shape), tuple(global_stride)
        if (type(index) is not int or index < 0 or type(mesh) is not int or mesh < 0
                or not all(_is_placement_record(p) for p in placements)
                or not _int_tuple(global_shape) or not _int_tuple(global_stride)
                or len(global_shape) != len(global_stride)):
            raise ValueError("malformed DTensorPlaceholder")
        self.mesh, self.placements = mesh, placements
        self.global_shape, self.global_stride = global_shape, global_stride

    @classmethod
    def _unchecked(cls, index: int, dtype: torch.dtype, shape: torch.Size, device: str, mesh: int,
                   placements: tuple, global_shape: tuple[int, ...], global_stride: tuple[int, ...]
                   ) -> "DTensorPlaceholder":
        """The constructor without the checks, for values taken from a live DTensor (pop_tensors)."""
        ph = cls.__new__(cls)
        ph.index, ph.dtype, ph.shape, ph.device = index, dtype, tuple(shape), device
        ph.mesh, ph.placements, ph.global_shape, ph.global_stride = mesh, placements, global_shape, global_stride
        return ph

    def __reduce__(self):
        return (DTensorPlaceholder, (self.index, self.dtype, self.shape, self.device, self.mesh, self.placements,
                                     self.global_shape, self.global_stride))

    def spec(self) -> tuple:
        """What makes two placeholders of one local shard the same DTensor."""
        return (self.index, self.mesh, self.placements, self.global_shape, self.global_stride)

    def __repr__(self) -> str:
        return (f"DTensorPlaceholder({self.index}, {self.dtype}, local {self.shape}, {self.device!r}, "
                f"mesh {self.mesh}, {self.placements}, global {self.global_shape} stride {self.global_stride})")


def _is_placeholder(obj: Any) -> bool:
    return isinstance(obj, TensorPlaceholder)


def _is_tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor)


def _is_legacy_sharded_tensor(t: torch.Tensor) -> bool:
    # Exists only once the legacy module is imported: no import here.
    mod = sys.modules.get("torch.distributed._shard.sharded_tensor.api")
    return mod is not None and isinstance(t, getattr(mod, "ShardedTensorBase", ()))


def _legacy_message(path: KeyPath, rank: int) -> str:
    return (f"state dict entry {format_path(path)!r} on rank {rank} is a legacy ShardedTensor "
            "(torch.distributed._shard), which FSDPTensorAwareStateDict does not take: make the values DTensors -- "
            "use FSDP2 (torch.distributed.fsdp.fully_shard), or FSDP1 given a device mesh "
            "(FullyShardedDataParallel(..., device_mesh=mesh)) with StateDictType.SHARDED_STATE_DICT, and take the "
            "state dict with torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer)")


# -- the state dict ------------------------------------------------------------------------------

@register_library_class
class FSDPTensorAwareStateDict(TensorAwareStateDict):
    """Wraps an FSDP state dict (nested dict/list/tuple with DTensor, plain tensor and other leaves;
    see the module docstring) for tasd's checkpoint managers. ``.state_dict`` is the wrapped
    structure: the caller's own object, or when hollow the structure with placeholders, or after
    tensors were inserted (a load) the structure rebuilt with DTensors on the live mesh.

    Lifecycle: ``pop_tensors`` (the save's, with the caller's DTensors) leaves it hollow and
    remembers their meshes; putting the very tensors back restores the caller's structure without
    a walk. A hollow object pickles (plain data only) and, decoded in any process, takes tensors
    back with ``insert_tensors``; its DTensors need a live mesh (:meth:`attach_mesh`) when they are
    read. Popping and inserting never mutate the caller's containers. None of the methods is
    collective; all run on the calling thread.
    """

    def __init__(self, state_dict: Any, pool: HostBufferPool | None = None):
        if not isinstance(state_dict, (dict, list, tuple)):
            raise TypeError(f"state_dict must be a dict, list or tuple, got {type(state_dict).__name__}")
        # Exactly one source of truth while not hollow: _tree (DTensors) when set, else
        # _hollow_tree with _locals (local shards by placeholder index).
        self._tree: Any = state_dict
        self._hollow_tree: Any = None
        self._locals: list[torch.Tensor] | None = None
        self._hollow = False
        self._meshes: list[dict] | None = None  # mesh records (plain data), after a pop or a decode
        self._live: list[DeviceMesh | None] | None = None  # the live mesh of each record
        self._devices: list[str] | None = None  # devices the tensors came from, when staged, loaded or popped
        self._pool = pool
        self._staged: Staged | None = None
        self._release: weakref.finalize | None = None
        # Between pop_tensors and insert_tensors: (the DTensor structure popped from or None, the
        # tensors popped, their devices), to put the same tensors back without a walk.
        self._popped: tuple[Any, list[torch.Tensor], list[str] | None] | None = None

    # -- pickling: only hollow objects, plain data ---------------------------------------------
    def __getstate__(self) -> dict:
        if not self._hollow:
            raise TypeError("only a hollow FSDPTensorAwareStateDict can be pickled; call pop_tensors() first")
        return {"version": HOLLOW_VERSION, "state_dict": self._hollow_tree, "meshes": list(self._meshes or ())}

    def __setstate__(self, state: dict) -> None:
        """Rebuild a hollow object from :meth:`__getstate__`'s plain data (read from a file or a
        peer); its shape is checked, ValueError for anything else. No live mesh is known."""
        tree = state.get("state_dict") if isinstance(state, dict) else None
        if (not isinstance(state, dict) or state.get("version") != HOLLOW_VERSION
                or not isinstance(tree, (dict, list, tuple)) or set(state) != {"version", "state_dict", "meshes"}
                or not isinstance(state["meshes"], list) or not all(_is_mesh_record(r) for r in state["meshes"])):
            raise ValueError("not the state of a hollow FSDPTensorAwareStateDict")
        self.__init__(tree)  # type: ignore[misc]
        self._tree, self._hollow_tree, self._meshes, self._hollow = None, tree, list(state["meshes"]), True

    # -- the live mesh ---------------------------------------------------------------------------
    def attach_mesh(self, mesh: DeviceMesh) -> "FSDPTensorAwareStateDict":
        """Give the live device mesh that DTensors are re-created on; returns ``self``.

        Call it in a process that did not pop these tensors: after a manager's ``load`` (or with
        a decoded hollow object, before or after ``insert_tensors``), on every rank, with the mesh
        the model is sharded on now. Each saved mesh record is matched against ``mesh`` (or the
        sub-mesh of the dimensions it names) at once: dimension names, shape, world size and this
        rank's coordinate must be those of the save; :class:`MeshMismatchError` (a ValueError and
        a CheckpointingException) names the first key on that mesh, the rank and both meshes
        otherwise, and the object is left as it was. DTensors this object built before from its
        shards are built again on the new mesh when next read; the caller's own DTensors (never
        popped, or put back unchanged) keep theirs. TypeError when ``mesh`` is not a DeviceMesh.
        Not collective (slicing a named sub-mesh of ``mesh`` uses the groups it already has).
        """
        if not isinstance(mesh, DeviceMesh):
            raise TypeError(f"attach_mesh takes a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
        if self._meshes is not None:
            self._live = [self._resolve(i, rec, mesh) for i, rec in enumerate(self._meshes)]
            if self._tree is not None and self._locals is not None:  # built by us from the shards: rebuild
                self._tree = None
        logger.debug("rank %d: attached a device mesh of shape %s (%s) to %d mesh record(s)", _rank(),
                     tuple(mesh.shape), mesh.mesh_dim_names, len(self._meshes or ()))
        return self

    def _resolve(self, i: int, rec: dict, mesh: DeviceMesh) -> DeviceMesh:
        """The live mesh for mesh record ``i``: ``mesh`` or its sub-mesh of the record's dimension
        names; MeshMismatchError when it differs from the record."""
        names, live_names = rec["dim_names"], mesh.mesh_dim_names
        live_names = None if live_names is None else tuple(live_names)
        candidate: DeviceMesh | None = mesh
        if names and live_names and names != live_names and set(names) <= set(live_names) \
                and len(set(names)) == len(names):
            try:
                candidate = mesh[names if len(names) > 1 else names[0]]
            except Exception as e:  # noqa: BLE001 - reported as a mismatch below
                logger.debug("slicing the live mesh by %s failed: %s", names, e)
                candidate = None
        world = _world_size()
        problems = []
        if rec["world_size"] is not None and world is not None and rec["world_size"] != world:
            problems.append(f"the world size differs ({rec['world_size']} saved, {world} now)")
        if candidate is not None:
            c_names = candidate.mesh_dim_names
            c_names = None if c_names is None else tuple(c_names)
            c_shape = tuple(int(s) for s in candidate.shape)
            coordinate = candidate.get_coordinate()
            coordinate = None if coordinate is None else tuple(int(c) for c in coordinate)
            if c_shape != rec["shape"]:
                problems.append("the mesh shape differs")
            if names and c_names and names != c_names:
                problems.append("the dimension names differ")
            if not problems and coordinate != rec["coordinate"]:
                problems.append("this rank's coordinate in the mesh differs")
        else:
            c_names, c_shape, coordinate = live_names, tuple(int(s) for s in mesh.shape), mesh.get_coordinate()
            problems.append(f"the live mesh has no sub-mesh of the dimensions {names}")
        if problems:
            key = self._first_key_on_mesh(i)
            raise MeshMismatchError(
                f"rank {_rank()}: state dict entry {key!r} was saved on "
                f"{_describe_mesh(names, rec['shape'], rec['coordinate'], rec['world_size'])}; the live mesh is "
                f"{_describe_mesh(c_names, c_shape, coordinate, world)}: {' and '.join(problems)}; {_RESTORE_HINT}")
        return candidate  # type: ignore[return-value]

    def _first_key_on_mesh(self, i: int) -> str:
        found: list[str] = []

        def see(path: KeyPath, ph: TensorPlaceholder) -> TensorPlaceholder:
            if not found and isinstance(ph, DTensorPlaceholder) and ph.mesh == i:
                found.append(format_path(path))
            return ph

        if self._hollow_tree is not None:
            map_leaves(self._hollow_tree, _is_placeholder, see)
        return found[0] if found else f"<mesh record {i}>"

    @property
    def needs_mesh(self) -> bool:
        """True when this object holds DTensor shards but knows no live mesh to rebuild them on
        (reading ``state_dict`` would raise): call :meth:`attach_mesh`. Not collective."""
        if self._hollow or self._tree is not None or not self._meshes:
            return False
        return self._live is None or any(m is None for m in self._live)

    # -- the contract ----------------------------------------------------------------------------
    @property
    def state_dict(self) -> Any:
        """The wrapped structure. Hollow: with placeholders. Holding the caller's DTensors (or
        DTensors built before): that structure. Otherwise (tensors inserted: a load, a staging)
        the structure is built now with a DTensor on the live mesh where each DTensorPlaceholder
        was (``DTensor.from_local``, which puts a shard on its mesh's device type), and kept; one
        local shard under several keys with one spec becomes one DTensor object. Raises ValueError
        naming the key and the rank when a DTensor needs a mesh that is not known (call
        :meth:`attach_mesh`). Not collective."""
        if self._hollow:
            return self._hollow_tree
        if self._tree is None:
            self._tree = self._build()
        return self._tree

    def _build(self) -> Any:
        shards, live, rank = self._locals, self._live, _rank()
        assert shards is not None
        built: dict[tuple, DTensor] = {}

        def put(path: KeyPath, ph: TensorPlaceholder) -> torch.Tensor:
            t = shards[ph.index]
            if not isinstance(ph, DTensorPlaceholder):
                return t
            spec = ph.spec()
            hit = built.get(spec)
            if hit is None:
                mesh = live[ph.mesh] if live is not None and ph.mesh < len(live) else None
                if mesh is None:
                    raise ValueError(
                        f"state dict entry {format_path(path)!r} on rank {rank} is a DTensor and no live device mesh "
                        "is known: call attach_mesh(mesh) with the device mesh the model is sharded on (a state dict "
                        "loaded from a checkpoint carries no mesh: a DeviceMesh belongs to the process that made it)")
                with torch.no_grad():
                    hit = built[spec] = DTensor.from_local(
                        t, mesh, [_placement(r) for r in ph.placements], run_check=False,
                        shape=torch.Size(ph.global_shape), stride=ph.global_stride)
            return hit

        return map_leaves(self._hollow_tree, _is_placeholder, put)

    @property
    def is_hollow(self) -> bool:
        """True after :meth:`pop_tensors` and before :meth:`insert_tensors` or :meth:`init_tensors`."""
        return self._hollow

    def pop_tensors(self) -> list[torch.Tensor]:
        """Remove the tensors and return each once, in walk order: each DTensor's local shard
        (its ``_local_tensor``, a plain tensor) and each plain tensor; the object becomes hollow,
        with a :class:`DTensorPlaceholder` or a TensorPlaceholder where each was, and remembers the
        meshes of the DTensors (for :meth:`insert_tensors` in this process). Called by a manager's
        save and by :meth:`copy_tensors_to_cpu`; not collective.

        A shard or tensor under several keys (tied weights: the same view of the same memory, as
        Basic defines it) is returned once and its placeholders carry one index. When the object
        holds shards without their DTensors (after a load), they are returned without a walk.
        Until insert_tensors the object keeps what it held, so putting the same tensors back costs
        no walk. ValueError when already hollow; TypeError naming the key path and the rank for a
        legacy ShardedTensor (saying how to get DTensors), a tensor subclass other than DTensor, a
        DTensor whose shard cannot be staged or whose placement type is not Shard, _StridedShard,
        Replicate or Partial, a sparse, quantized or meta tensor, or a tensor hidden inside another
        object.
        """
        if self._hollow:
            raise ValueError("state dict is already hollow (pop_tensors called twice?)")
        if self._tree is None:  # shards held with their placeholders: nothing to walk
            tensors = self._locals
            assert tensors is not None
            self._popped = (None, tensors, self._devices)
            self._locals, self._hollow = None, True
            return list(tensors)
        rank = _rank()
        index = TensorIndex(self._devices)
        meshes: list[DeviceMesh] = []
        mesh_index: dict[int, int] = {}
        records: list[dict] = []
        placement_records: dict[tuple, tuple] = {}

        def take(path: KeyPath, t: torch.Tensor) -> TensorPlaceholder:
            if isinstance(t, DTensor):
                local = t._local_tensor
                reason = check_stageable(local)
                if reason:
                    raise TypeError(f"state dict entry {format_path(path)!r} on rank {rank} is a DTensor whose local "
                                    f"shard {reason}")
                placements = placement_records.get(t.placements)
                if placements is None:
                    placements = tuple(_placement_record(p) for p in t.placements)
                    bad = [p for p, r in zip(t.placements, placements) if r is None]
                    if bad:
                        raise TypeError(f"state dict entry {format_path(path)!r} on rank {rank} is a DTensor with "
                                        f"placement {bad[0]!r} ({type(bad[0]).__name__}): FSDPTensorAwareStateDict "
                                        "saves Shard, _StridedShard, Replicate and Partial placements")
                    placement_records[t.placements] = placements
                mesh = t.device_mesh
                j = mesh_index.get(id(mesh))
                if j is None:
                    j = mesh_index[id(mesh)] = len(meshes)
                    meshes.append(mesh)
                    records.append(_mesh_record(mesh))
                i = index.index(local)
                return DTensorPlaceholder._unchecked(i, local.dtype, local.shape, index.devices[i], j, placements,
                                                     tuple(t.shape), tuple(t.stride()))
            if _is_legacy_sharded_tensor(t):
                raise TypeError(_legacy_message(path, rank))
            reason = check_stageable(t)
            if reason:
                raise TypeError(f"state dict entry {format_path(path)!r} on rank {rank} {reason}")
            i = index.index(t)
            return TensorPlaceholder(i, t.dtype, t.shape, index.devices[i])

        before = self._tree
        hollow = map_tensors(before, take)
        self._hollow_tree, self._tree, self._locals = hollow, None, None
        self._meshes, self._live = records, meshes
        tensors = index.tensors
        self._popped = (before, list(tensors), index.devices)
        self._hollow = True
        logger.debug("rank %d: popped %d tensor(s), DTensor shards on %d mesh(es)", rank, len(tensors), len(meshes))
        return tensors

    @property
    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor leaf in walk order as it is stored: a DTensor as its local shard, a tied
        tensor once per key. Never builds DTensors (needs no mesh). ValueError when hollow. Not
        collective."""
        if self._hollow:
            raise ValueError("state dict is hollow: it holds no tensors")
        found: list[torch.Tensor] = []
        if self._tree is not None:
            map_leaves(self._tree, _is_tensor,
                       lambda _, t: found.append(t._local_tensor if isinstance(t, DTensor) else t))
        else:
            shards = self._locals
            assert shards is not None
            map_leaves(self._hollow_tree, _is_placeholder, lambda _, ph: found.append(shards[ph.index]))
        return iter(found)

    def insert_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Put back one plain tensor per distinct placeholder index, in :meth:`pop_tensors` order
        (a DTensor's entry takes its local shard). The very tensor objects the last pop_tensors
        returned restore what the object held before that pop (the caller's DTensors), without a
        walk. Other tensors are checked against the placeholders (dtype, local shape) and kept as
        shards; the DTensors are built from them when :attr:`state_dict` is read, on the live mesh
        (so a load needs no mesh: :meth:`attach_mesh` may come later). Called by a manager's load;
        not collective. ValueError naming the key when not hollow, when the number of tensors, a
        dtype or a shape does not match, or a placeholder names a mesh record that does not exist.
        """
        if not self._hollow:
            raise ValueError("state dict is not hollow: nothing to insert into")
        tensors = list(tensors)
        popped, self._popped = self._popped, None
        if popped is not None and len(tensors) == len(popped[1]) and all(map(operator.is_, tensors, popped[1])):
            tree, _, devices = popped
            if tree is not None:
                self._tree = tree
            else:
                self._locals = tensors
            self._devices, self._hollow = devices, False
            return
        devices: dict[int, str] = {}
        n_meshes = len(self._meshes or ())

        def check(path: KeyPath, ph: TensorPlaceholder) -> TensorPlaceholder:
            if ph.index >= len(tensors):
                raise ValueError(f"got {len(tensors)} tensors, state dict entry {format_path(path)!r} "
                                 f"needs index {ph.index}")
            t = tensors[ph.index]
            if not isinstance(t, torch.Tensor) or t.dtype != ph.dtype or tuple(t.shape) != ph.shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"tensor for state dict entry {format_path(path)!r} has {got}, expected "
                                 f"{ph.dtype} {ph.shape}")
            if isinstance(ph, DTensorPlaceholder) and ph.mesh >= n_meshes:
                raise ValueError(f"state dict entry {format_path(path)!r} names mesh record {ph.mesh}, "
                                 f"the state dict has {n_meshes}")
            devices.setdefault(ph.index, ph.device)
            return ph

        map_leaves(self._hollow_tree, _is_placeholder, check)
        if len(devices) != len(tensors):  # every index is < len(tensors): equal counts cover them all
            raise ValueError(f"got {len(tensors)} tensors for {len(devices)} distinct placeholders")
        self._locals, self._tree = tensors, None
        self._devices = [devices[i] for i in range(len(tensors))]
        self._hollow = False

    def init_tensors(self) -> None:
        """Fill a hollow object with uninitialized CPU tensors matching its placeholders (local
        shard shapes). Not collective; ValueError when not hollow."""
        if not self._hollow:
            raise ValueError("state dict is not hollow: nothing to initialize")
        placeholders: dict[int, TensorPlaceholder] = {}
        map_leaves(self._hollow_tree, _is_placeholder, lambda _, ph: placeholders.setdefault(ph.index, ph))
        self.insert_tensors(torch.empty(placeholders[i].shape, dtype=placeholders[i].dtype)
                            for i in sorted(placeholders))

    def copy_tensors_to_cpu(self, non_blocking: bool = False) -> None:
        """Replace every local shard and plain tensor by a host copy in a reusable (pinned with
        CUDA) staging buffer, a point-in-time snapshot; the devices they came from are remembered
        for :meth:`restore_tensor_device`. The object then holds shards: reading
        :attr:`state_dict` builds DTensors on the live mesh (moving shards to a CUDA mesh's device:
        call restore_tensor_device first to choose when). With ``non_blocking`` call
        :func:`tasd.device.synchronize_stream` before reading the copies. Not collective;
        ValueError when hollow, TypeError naming the key of a tensor that cannot be staged."""
        tensors = self.pop_tensors()
        try:
            staged = stage(tensors, self._pool, non_blocking=non_blocking)
        except BaseException:
            self.insert_tensors(tensors)
            raise
        self._popped = None
        self._locals = [lay.standalone(staged.buffer) for lay in staged.layouts]
        self._tree, self._hollow, self._devices = None, False, staged.devices
        if self._release is not None:
            self._release()  # the previous copies are replaced: their buffer goes back
        self._staged = staged
        self._release = weakref.finalize(self, staged.release)

    def restore_tensor_device(self, non_blocking: bool = True) -> None:
        """Move the shards and tensors back to the devices they were staged or saved from: a
        DTensor's shard to its live mesh's device type when the mesh is known, else (and for plain
        tensors) to the recorded device (:func:`tasd.device.restore_device`: CPU without CUDA, the
        current device when that index does not exist). Nothing to do for the caller's own
        tensors (never staged or loaded). Not collective; ValueError when hollow."""
        if self._hollow:
            raise ValueError("state dict is hollow: no tensors to move")
        devices = self._devices
        if devices is None:
            return
        tensors = self.pop_tensors()
        targets = list(devices)
        live = self._live
        if live is not None:
            def mesh_device(_: KeyPath, ph: TensorPlaceholder) -> TensorPlaceholder:
                if isinstance(ph, DTensorPlaceholder) and ph.mesh < len(live) and live[ph.mesh] is not None:
                    targets[ph.index] = str(live[ph.mesh].device_type)
                return ph

            map_leaves(self._hollow_tree, _is_placeholder, mesh_device)
        moved = [device.restore_device(t, d, non_blocking) for t, d in zip(tensors, targets)]
        self.insert_tensors(moved)
        self._devices = devices

    def values(self) -> Iterator[Any]:
        """The top-level values of :attr:`state_dict` (built on the live mesh as it says;
        ValueError when a DTensor needs a mesh that is not known). Not collective."""
        sd = self.state_dict
        return iter(sd.values() if isinstance(sd, dict) else sd)
