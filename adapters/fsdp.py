"""FSDP2 training scripts on tasd local checkpoints: one object and three calls.

:class:`FSDPCheckpointer` saves and restores a model sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``; FSDP1 given a ``device_mesh`` too), its optimizer, and
whatever else a resume needs (LR scheduler, data loader position, RNG state: the *extra state*)
as tasd local checkpoints: every rank keeps its own shards on node-local storage, optionally
replicated on peers, saved asynchronously while training goes on::

    from tasd.adapters.fsdp import FSDPCheckpointer
    from tasd.managers import ReplicationConfig

    ckpt = FSDPCheckpointer(model, optimizer, "/local/ckpt", replication=ReplicationConfig(), session_id="job42")
    start = ckpt.load(extra_state={"scheduler": scheduler})    # 1. the newest checkpoint, or -1
    for step in range(start + 1, steps + 1):
        ckpt.finalize()                                         # 2. once per step: publishes finished saves
        train_step(model, optimizer, step)
        scheduler.step()
        if step % save_every == 0:
            ckpt.save(step, extra_state={"scheduler": scheduler})   # 3. returns once the tensors are staged
    ckpt.close()                                                # or: with FSDPCheckpointer(...) as ckpt:

**What is saved.** ``get_state_dict(model, optimizer, options=...)``
(``torch.distributed.checkpoint.state_dict``, sharded: DTensor values) wrapped as
``FSDPTensorAwareStateDict({"model": msd, "optim": osd, "extra": extra})``
(:mod:`tasd.fsdp`): each rank's local shards, with the DTensors' placements, global shapes and
mesh recorded as plain data. ``extra`` is the ``extra_state`` given to :meth:`~FSDPCheckpointer.save`
with every *stateful* top-level value (an object with ``state_dict()`` and ``load_state_dict()``:
an LR scheduler, a ``StatefulDataLoader``, your own) replaced by its ``state_dict()``; everything
else must be data that tasd saves (dicts, lists, tuples, numbers, strings, tensors: see tasd's
README; other classes need ``tasd.add_safe_globals``).

**What a load restores.** The model's parameters in place (the parameter objects stay: references
to them stay valid), the optimizer's state through ``set_state_dict`` (the optimizer object stays),
each stateful object of the ``extra_state`` dict given to :meth:`~FSDPCheckpointer.load`
(``obj.load_state_dict(saved[key])``: the objects stay the same, a scheduler keeps driving the
same optimizer), and :attr:`~FSDPCheckpointer.extra_state`: the saved extra state as plain data
(stateful objects as their state dicts), for values the script restores itself.

**Same world, same mesh.** Local checkpoints are per rank and are not resharded: a checkpoint is
restored onto the same world size and device mesh shape. :meth:`~FSDPCheckpointer.load` refuses
anything else on every rank: :class:`WorldSizeMismatchError` when this session's checkpoints were
saved with another world size and none with this one (the manager alone would skip them and
start from scratch), and
:class:`tasd.fsdp.MeshMismatchError` when the mesh differs (names, shape, a rank's coordinate).
Both are CheckpointingExceptions naming both sides; the other ranks raise a
CheckpointingException naming the failed ranks and quoting them.

Every method is collective unless its docstring says otherwise: all ranks call it together, in
the same order, from the training thread; a failure on one rank raises on every rank (the failing
rank its own error, the others a CheckpointingException naming it), and a dead peer makes the
others fail after one collective timeout instead of hanging (see tasd's README, "Contracts").
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from tasd.fsdp import FSDPTensorAwareStateDict, MeshMismatchError
from tasd.managers import collectives
from tasd.managers.agreement import agree_or_raise
from tasd.managers.async_ckpt import AsyncCallsQueue, AsyncRequest
from tasd.managers.config import ReplicationConfig
from tasd.managers.errors import CheckpointingException
from tasd.managers.local_manager import LocalCheckpointManager
from tasd.managers.partio import read_header
from tasd.managers.partnames import parse_part_name
from tasd.managers.replication import ReplicationStrategy
from tasd.managers.save_job import SaveStats

__all__ = ["FSDPCheckpointer", "WorldSizeMismatchError", "MeshMismatchError", "model_mesh", "is_stateful"]

logger = logging.getLogger(__name__)

#: The top-level keys of what :class:`FSDPCheckpointer` saves.
KEYS = ("model", "optim", "extra")


class WorldSizeMismatchError(CheckpointingException):
    """:meth:`FSDPCheckpointer.load` found no checkpoint for this world size, but this rank's
    directory holds checkpoints of the same session saved with another world size. Local
    checkpoints are per rank and cannot be resharded; the message names the directory, both world
    sizes, the iterations, and how to start afresh instead."""


def is_stateful(obj: Any) -> bool:
    """Whether ``obj`` has callable ``state_dict`` and ``load_state_dict`` (LR schedulers, optimizers,
    ``StatefulDataLoader``, torch.distributed.checkpoint's ``Stateful``). Local."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _distinct(meshes: list[DeviceMesh]) -> list[DeviceMesh]:
    out: list[DeviceMesh] = []
    for m in meshes:
        if not any(m is o or m == o for o in out):
            out.append(m)
    return out


def model_mesh(model: torch.nn.Module) -> DeviceMesh | None:
    """The device mesh ``model``'s parameters are sharded on: the mesh of its DTensor parameters
    (FSDP2) when they share one; when they live on several slices of one mesh, that (root) mesh;
    without DTensor parameters, the mesh an FSDP1 module was given (``device_mesh=``, kept as its
    ``_device_mesh``); else None. ValueError when they live on meshes of different roots (pass
    ``mesh=`` to FSDPCheckpointer). Local."""
    meshes = _distinct([p.device_mesh for p in model.parameters() if isinstance(p, DTensor)])
    if not meshes:  # FSDP1: flat parameters; the state dict's DTensors live on the mesh it was given
        meshes = _distinct([m._device_mesh for m in model.modules()
                            if isinstance(getattr(m, "_device_mesh", None), DeviceMesh)])
    if len(meshes) <= 1:
        return meshes[0] if meshes else None
    roots = []
    for mesh in meshes:
        get_root = getattr(mesh, "_get_root_mesh", None)
        root = get_root() if get_root is not None else None
        roots.append(root if isinstance(root, DeviceMesh) else mesh)
    roots = _distinct(roots)
    if len(roots) > 1:
        raise ValueError(f"the model's parameters live on {len(roots)} unrelated device meshes "
                         f"({[tuple(m.shape) for m in roots]}): pass mesh= (the mesh they are all sliced from)")
    return roots[0]


def _check_options(options: Any) -> StateDictOptions:
    if options is None:
        return StateDictOptions()
    if not isinstance(options, StateDictOptions):
        raise TypeError(f"state_dict_options must be a StateDictOptions or None, got {type(options).__name__}")
    if options.full_state_dict or options.broadcast_from_rank0:
        raise ValueError("state_dict_options: local checkpoints keep each rank's own shards; full_state_dict and "
                         "broadcast_from_rank0 must be False")
    return options


def _strategy(replication: Any) -> ReplicationStrategy | None:
    if replication is None or isinstance(replication, ReplicationStrategy):
        return replication
    if isinstance(replication, ReplicationConfig):
        return replication.build(lazy=True)
    raise TypeError(f"replication must be a ReplicationConfig, a ReplicationStrategy or None, "
                    f"got {type(replication).__name__}")


class FSDPCheckpointer:
    """Local checkpoints of an FSDP model, its optimizer and extra state (see the module docstring).

    Arguments (the same on every rank):

    - ``model``: the sharded model (``fully_shard`` applied); ``optimizer``: its optimizer, or None
      to save the model only.
    - ``root_dir``: node-local directory; this rank's parts go to ``root_dir/session_id/<rank>``
      (:attr:`manager`'s ``local_ckpt_dir``).
    - ``replication``: a :class:`~tasd.managers.ReplicationConfig` (or a replication strategy) to
      also store every rank's part on peers, so that a lost node loses nothing; None: none.
    - ``async_save``: True (default): :meth:`save` returns once the tensors are staged in host
      memory; the write (and replication) runs in the background on this object's own
      :class:`~tasd.managers.async_ckpt.AsyncCallsQueue`, and :meth:`finalize` publishes it.
      False: :meth:`save` returns once the checkpoint is published.
    - ``session_id``: a directory name; a resume loads only checkpoints of its session. With the
      default ``""`` only checkpoints of the same job are loaded (``TASD_JOB_ID``, else
      ``TORCHELASTIC_RUN_ID``, else ``SLURM_JOB_ID``): pass one to resume across jobs.
    - ``mesh``: the device mesh the model is sharded on; default :func:`model_mesh` of ``model``.
    - ``persistent_worker``: async saves on one long-lived worker process (default) or on a process
      forked per save.
    - ``state_dict_options``: a ``StateDictOptions`` for ``get_state_dict``/``set_state_dict``
      (sharded: ``full_state_dict`` and ``broadcast_from_rank0`` are refused, ValueError).
    - ``manager_options``: passed to :class:`~tasd.managers.LocalCheckpointManager`
      (``max_saves_in_flight``, ``direct_io``, ``job_id``, ...).

    Construction is local (no collective; groups are made at the first save or load) and, with a
    persistent worker, starts that worker in the background; it raises TypeError/ValueError for
    bad arguments (a replication that does not fit the world size included). Every rank
    constructs one, with the same arguments, before its first collective call.

    Attributes: :attr:`manager` (the LocalCheckpointManager; ``manager.last_save`` has the
    figures of the newest published save), :attr:`mesh`, :attr:`extra_state` and
    :attr:`loaded_iteration` (set by :meth:`load`), :attr:`last_published` (newest iteration this
    object published, -1 before).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 root_dir: str | os.PathLike, replication: ReplicationConfig | ReplicationStrategy | None = None,
                 async_save: bool = True, session_id: str = "", *, mesh: DeviceMesh | None = None,
                 persistent_worker: bool = True, state_dict_options: StateDictOptions | None = None,
                 **manager_options: Any):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if type(async_save) is not bool or type(persistent_worker) is not bool:
            raise TypeError("async_save and persistent_worker must be True or False")
        if mesh is not None and not isinstance(mesh, DeviceMesh):
            raise TypeError(f"mesh must be a DeviceMesh or None, got {type(mesh).__name__}")
        self.model, self.optimizer = model, optimizer
        self.options = _check_options(state_dict_options)
        self.mesh: DeviceMesh | None = mesh if mesh is not None else model_mesh(model)
        self.manager = LocalCheckpointManager(root_dir, session_id, _strategy(replication), **manager_options)
        self.async_save = async_save
        self.queue: AsyncCallsQueue | None = AsyncCallsQueue(persistent=persistent_worker) if async_save else None
        if self.queue is not None and persistent_worker:
            # Start the worker now (an empty call; scheduling is local), so that it has started by the
            # first save instead of delaying it; the next finalize (or the first save's publication, or
            # close) retires the call on every rank.
            self.queue.schedule_async_request(AsyncRequest(None, (), []))
        #: The extra state of the last :meth:`load` (plain data; stateful objects as their state
        #: dicts); None before a load, or when it found nothing to load.
        self.extra_state: Any = None
        #: The iteration the last :meth:`load` restored, -1 when none.
        self.loaded_iteration = -1
        #: The newest iteration this object published, -1 before the first.
        self.last_published = -1
        self._published: list[SaveStats] = []  # published since the last finalize()
        self._closed = False

    # -- helpers ---------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this FSDPCheckpointer is closed")

    @staticmethod
    def _agree(error: BaseException | None, iteration: int, what: str) -> None:
        """Raise on every rank when any rank failed (collective, tasd's own groups)."""
        agree_or_raise(error, iteration, what, collectives.agreement_group())

    def _state(self) -> tuple[Any, Any]:
        if self.optimizer is None:
            return get_model_state_dict(self.model, options=self.options), None
        return get_state_dict(self.model, self.optimizer, options=self.options)

    def _on_published(self, iteration: int) -> None:  # runs on the training thread when a save is published
        self.last_published = max(self.last_published, iteration)
        stats = self.manager.last_save  # set by the publication that just ran
        self._published.append(stats if stats.iteration == iteration else SaveStats(iteration=iteration))
        logger.info("rank %d: published the checkpoint of iteration %d", self.manager.rank, iteration)

    # -- the three calls ---------------------------------------------------------------------------
    def save(self, iteration: int, extra_state: Any = None) -> None:
        """Save model, optimizer and ``extra_state`` as checkpoint ``iteration`` (an int >= 0,
        larger than every iteration saved before by this object, the same on every rank).
        Collective.

        ``extra_state``: None or data tasd saves; a dict's values with ``state_dict()`` and
        ``load_state_dict()`` are saved as their ``state_dict()`` (see the module docstring).
        A point-in-time snapshot: the state is staged into host memory before save returns;
        training may change it at once. With ``async_save`` (default) save returns then, and the
        write (and exchange with peers) runs in the background until a later :meth:`finalize`
        (or the next save, load or close) publishes it; a new save while the previous one is
        unpublished first waits for and publishes that one. Otherwise save returns once the
        checkpoint is published. Raises on every rank when any rank fails (ValueError for an
        iteration that is not an int >= 0; CheckpointingException for one not larger than the last,
        for ranks passing different iterations, or for a failed save, this one or the previous one
        it publishes first; TypeError for state tasd cannot save or load back, or a stateful
        object given as ``extra_state`` itself instead of in a dict; a failing ``state_dict()``
        call's TypeError/ValueError as it is, anything else as a CheckpointingException quoting
        it); the last published checkpoint stays loadable. ValueError once closed (local).
        """
        self._check_open()
        error: BaseException | None = None
        sd = None
        try:
            if type(iteration) is not int or iteration < 0:
                raise ValueError(f"iteration must be an int >= 0, got {iteration!r}")
            if extra_state is not None and not isinstance(extra_state, dict) and is_stateful(extra_state):
                raise TypeError("extra_state must be plain data or a dict; put a stateful object in a dict, "
                                "e.g. {'scheduler': scheduler}")
            extra = ({k: (v.state_dict() if is_stateful(v) else v) for k, v in extra_state.items()}
                     if isinstance(extra_state, dict) else extra_state)
            msd, osd = self._state()
            sd = FSDPTensorAwareStateDict({"model": msd, "optim": osd, "extra": extra})
        except Exception as e:
            error = e
        agreed_it = iteration if type(iteration) is int and iteration >= 0 else -1
        self._agree(error, agreed_it, f"save of iteration {iteration}")
        if self.queue is None:
            self.manager.save(sd, iteration)
            self._on_published(iteration)
            return
        request = self.manager.save(sd, iteration, is_async=True)
        request.add_finalize_fn(functools.partial(self._on_published, iteration))
        self.queue.schedule_async_request(request)
        logger.debug("rank %d: iteration %d staged; writing in the background", self.manager.rank, iteration)

    def finalize(self, blocking: bool = False) -> list[SaveStats]:
        """Publish the async saves that finished on every rank (``blocking``: wait for all of them,
        each at most the job's collective timeout); call it once per training step. Returns the
        figures (:class:`~tasd.managers.save_job.SaveStats`: ``iteration``, ``stall_s``,
        ``total_s``, bytes, ...) of the saves published since the previous finalize call, oldest
        first, also those a save, load or synchronous save published meanwhile. Collective
        whenever saves are pending (the same on every rank); raises CheckpointingException on
        every rank when a save failed on any (its files are removed; the previous checkpoint stays
        loadable). Without async saves nothing is pending. ValueError once closed (local)."""
        self._check_open()
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        published, self._published = self._published, []
        return published

    def load(self, extra_state: dict | None = None) -> int:
        """Restore the newest checkpoint every rank can load (a rank whose node lost its disk gets
        its part from a peer holding a replica) into the model, the optimizer and the stateful
        values of ``extra_state``; return its iteration, or -1 when there is none (nothing is
        changed then). Collective; publishes pending async saves first.

        In place: parameters are copied into the model's own (sharded) parameters and the
        optimizer's state loaded with ``set_state_dict``; for each value of ``extra_state`` (a
        dict, e.g. ``{"scheduler": scheduler, "data": loader}``) that has ``load_state_dict``,
        ``value.load_state_dict(saved_extra[key])``. :attr:`extra_state` then holds the whole
        saved extra state (plain data) and :attr:`loaded_iteration` the iteration.

        Raises on every rank when any rank fails: :class:`WorldSizeMismatchError` when the only
        checkpoints of this session were saved with another world size;
        :class:`~tasd.fsdp.MeshMismatchError` when the checkpoint's device mesh differs from
        :attr:`mesh`; CheckpointingException when the checkpoint was not saved by an
        FSDPCheckpointer, lacks a key of ``extra_state``, or the manager's load fails (see
        LocalCheckpointManager.load: e.g. NoReplicasAvailableError); a failure of
        ``set_state_dict`` or of a ``load_state_dict`` (a model of another structure, say: a
        TypeError/ValueError as it is, anything else as a CheckpointingException quoting it),
        after which model and optimizer may be partly restored: do not train on. TypeError when
        ``extra_state`` is not a dict. ValueError once closed (local)."""
        self._check_open()
        error: BaseException | None = None
        if extra_state is not None and not isinstance(extra_state, dict):
            error = TypeError(f"extra_state must be a dict of stateful objects or None, "
                              f"got {type(extra_state).__name__}")
        self._agree(error, 0, "load")
        latest = self.manager.find_latest()
        if latest < 0:
            try:
                self._refuse_other_world_size()
            except Exception as e:
                error = e
            self._agree(error, 0, "load")
            logger.info("rank %d: no checkpoint to resume from in %s", self.manager.rank, self.manager.local_ckpt_dir)
            self.extra_state, self.loaded_iteration = None, -1
            return -1
        sd, (iteration, _, _) = self.manager.load()
        what = f"load of iteration {iteration}"
        state = None
        try:
            state = self._unwrap(sd, iteration)
            missing = [k for k, v in (extra_state or {}).items() if is_stateful(v)
                       and not (isinstance(state["extra"], dict) and k in state["extra"])]
            if missing:
                raise CheckpointingException(f"rank {self.manager.rank}: the checkpoint of iteration {iteration} "
                                             f"has no extra state {missing} to restore (it saved extra state "
                                             f"{self._describe_keys(state['extra'])})")
        except Exception as e:
            error = e
        self._agree(error, iteration, what)
        try:
            if self.optimizer is None:
                set_model_state_dict(self.model, state["model"], options=self.options)
            else:
                set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optim"], options=self.options)
            for key, obj in (extra_state or {}).items():
                if is_stateful(obj):
                    obj.load_state_dict(state["extra"][key])
        except Exception as e:
            error = e
        self._agree(error, iteration, what)
        self.extra_state, self.loaded_iteration = state["extra"], iteration
        logger.info("rank %d: restored the checkpoint of iteration %d", self.manager.rank, iteration)
        return iteration

    @staticmethod
    def _describe_keys(extra: Any) -> str:
        return str(sorted(map(str, extra))) if isinstance(extra, dict) else f"of type {type(extra).__name__}"

    def _unwrap(self, sd: Any, iteration: int) -> dict:
        """The loaded state (DTensors on :attr:`mesh`); local, raises MeshMismatchError or
        CheckpointingException."""
        if not isinstance(sd, FSDPTensorAwareStateDict):
            raise CheckpointingException(f"rank {self.manager.rank}: the checkpoint of iteration {iteration} holds a "
                                         f"{type(sd).__name__}, not an FSDPTensorAwareStateDict saved by "
                                         "FSDPCheckpointer")
        if self.mesh is not None:
            sd.attach_mesh(self.mesh)
        elif sd.needs_mesh:
            raise CheckpointingException(f"rank {self.manager.rank}: the checkpoint of iteration {iteration} holds "
                                         "DTensors but the model has no DTensor parameters: shard it (fully_shard) "
                                         "before loading, or pass mesh=")
        state = sd.state_dict
        if not isinstance(state, dict) or tuple(state) != KEYS:
            raise CheckpointingException(f"rank {self.manager.rank}: the checkpoint of iteration {iteration} was not "
                                         f"saved by FSDPCheckpointer (top-level keys "
                                         f"{self._describe_keys(state)}, expected {list(KEYS)})")
        if (state["optim"] is None) != (self.optimizer is None):
            has = "an" if self.optimizer is not None else "no"
            raise CheckpointingException(f"rank {self.manager.rank}: the checkpoint of iteration {iteration} was saved "
                                         f"{'without' if state['optim'] is None else 'with'} optimizer state, this "
                                         f"FSDPCheckpointer has {has} optimizer")
        return state

    def _refuse_other_world_size(self) -> None:
        """Raise WorldSizeMismatchError when this rank's directory holds published parts of this
        session (and job, with the default session) saved with another world size. Local: reads
        part headers only."""
        manager = self.manager
        directory = manager.local_ckpt_dir
        if not directory.is_dir():
            return
        found: dict[int, set[int]] = {}
        for entry in os.scandir(directory):
            name = parse_part_name(entry.name)
            if name is None or not name.published or not entry.is_file(follow_symlinks=False):
                continue
            try:
                meta = read_header(Path(entry.path)).meta
            except (CheckpointingException, OSError) as e:
                logger.debug("rank %d: %s skipped: %s", manager.rank, entry.path, e)
                continue
            if meta.session_id != manager.session_id or (manager.session_id == "" and meta.job_id != manager.job_id):
                continue
            if meta.world_size != manager.world_size:
                found.setdefault(meta.world_size, set()).add(meta.iteration)
        if found:
            saved = "; ".join(f"world size {w}: iteration(s) {sorted(its)}" for w, its in sorted(found.items()))
            raise WorldSizeMismatchError(
                f"rank {manager.rank}: {directory} holds checkpoints of session {manager.session_id!r} saved with "
                f"another world size ({saved}); this job has world size {manager.world_size}. Local checkpoints "
                "are per rank and are not resharded: restore with the world size and device mesh they were saved "
                "with, or start afresh with another session_id (or remove the directory)")

    # -- shutdown --------------------------------------------------------------------------------
    def close(self, abort: bool = False) -> None:
        """Publish the pending async saves (waiting for them), stop the async worker and wait for
        the removal of superseded checkpoints. Collective (raises on every rank like
        :meth:`finalize`; the worker is stopped either way). ``abort=True``: local, nothing is
        published: pending saves are dropped (their workers killed, their files removed; the last
        published checkpoint stays), e.g. on the way out of a failed step. A second close does
        nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.queue is not None:
                self.queue.close(abort=abort)
        finally:
            if not abort:
                self.manager.wait_for_cleanup()

    def __enter__(self) -> "FSDPCheckpointer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """``close()``, or ``close(abort=True)`` (local) when leaving with an exception: a rank
        leaving with an exception must not wait in a collective for ranks that may not come."""
        self.close(abort=exc_type is not None)

    def __repr__(self) -> str:
        return (f"FSDPCheckpointer({self.manager.local_ckpt_dir}, session {self.manager.session_id!r}, "
                f"{'async' if self.async_save else 'sync'}, last published {self.last_published})")
