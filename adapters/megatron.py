"""Megatron-LM glue for tasd local checkpoints (``--non-persistent-ckpt-type local``).

Megatron-LM (core_v0.16.1) takes local checkpointing from NVIDIA nvidia-resiliency-ext (NVRx):
``training.py`` builds ``LocalCheckpointManager(args.non_persistent_local_ckpt_dir,
repl_strategy=CliqueReplicationStrategy.from_replication_params(jump, factor))`` into
``checkpointing_context['local_checkpoint_manager']``; ``save_checkpoint`` wraps the sharded state
dict with megatron-core's ``MCoreTensorAwareStateDict.from_state_dict`` and calls
``manager.save(..., is_async=args.async_save)``, scheduling the returned request on megatron-core's
own ``AsyncCallsQueue``; a resume calls ``find_latest()`` and ``load()`` twice (common part and
arguments first, then everything) and unwraps with ``to_state_dict``. This module gives the same
pieces on tasd:

- :func:`add_arguments` / :func:`validate_args`: Megatron-LM's own flags for local checkpoints
  (names, types, defaults and choices of core_v0.16.1, added only where a parser lacks them) and
  its rules for them, plus tasd's extras (``--replication-strategy``, ``--local-ckpt-session-id``).
  ``add_arguments`` returns the parser, so it serves as Megatron-LM's ``extra_args_provider``.
- :func:`build_checkpoint_manager`: the manager those flags describe (None unless
  ``--non-persistent-ckpt-type local``).
- :func:`save_local_checkpoint` / :func:`load_local_checkpoint`: Megatron-LM's save and load steps
  for a sharded state dict, on tasd's device-agnostic ``tasd.mcore.MCoreTensorAwareStateDict``.
- :class:`MegatronLocalCheckpointManager` and :func:`to_mcore_request`: asynchronous saves whose
  request runs on megatron-core's ``AsyncCallsQueue`` (forked or persistent worker) as well as on
  tasd's (see :data:`MegatronAsyncRequest` for what megatron-core's queue needs).
- :func:`install_nvrx_compat`: makes the NVRx import paths that Megatron-LM's code uses resolve to
  tasd when NVRx is not installed (details in :mod:`tasd.adapters.nvrx_compat`):
  ``nvidia_resiliency_ext.checkpointing.local.base_state_dict`` (TensorAwareStateDict),
  ``...local.basic_state_dict`` (BasicTensorAwareStateDict),
  ``...local.ckpt_managers.base_manager`` (BaseCheckpointManager, CheckpointingException),
  ``...local.ckpt_managers.local_manager`` (LocalCheckpointManager: MegatronLocalCheckpointManager),
  ``...local.replication.strategies`` (ReplicationStrategy, CliqueReplicationStrategy,
  LazyCliqueReplicationStrategy), ``...local.replication.group_utils`` (GroupWrapper,
  parse_group_sequence), ``nvidia_resiliency_ext.checkpointing.async_ckpt.core``
  (AsyncCallsQueue, AsyncRequest), and their parent packages; no ``__version__`` and nothing of
  NVRx's global async writer (Megatron-LM 0.17+ probes for it and asserts NVRx >= 0.6.0: it then
  finds it missing). With ``route_mcore=True`` megatron-core's ``MCoreTensorAwareStateDict``
  becomes tasd's (``tasd.mcore``), which Megatron-LM's saves need on tasd.

A second load of the same checkpoint (Megatron-LM's resume loads twice) reads no file and moves no
replica: :class:`MegatronLocalCheckpointManager` (what :func:`build_checkpoint_manager` and the NVRx
compatibility modules give) keeps the last load's result (``keep_loaded=True``, its default there;
see :mod:`tasd.managers.reuse`).

Importing this module imports neither megatron-core nor Megatron-LM; the functions that need
megatron-core (the ``megatron`` extra) import it when called.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

from tasd.managers import collectives
from tasd.managers.config import ReplicationConfig
from tasd.managers.local_manager import LocalCheckpointManager, check_session_id
from tasd.managers.replication import ReplicationStrategy
from tasd.managers.replication.groups import as_count

logger = logging.getLogger(__name__)

__all__ = ["MEGATRON_FLAGS", "TASD_FLAGS", "MegatronLocalCheckpointManager", "add_arguments", "validate_args",
           "build_checkpoint_manager", "replication_strategy", "save_local_checkpoint", "load_local_checkpoint",
           "to_mcore_request", "install_nvrx_compat"]

#: Megatron-LM core_v0.16.1's flags for non-persistent (local) checkpoints, as its
#: ``ArgumentGroupFactory`` derives them from ``training_config.CheckpointConfig``: flag ->
#: ``add_argument`` keywords (dest, type or store_true action, default, choices).
MEGATRON_FLAGS: dict[str, dict[str, Any]] = {
    "--non-persistent-save-interval": dict(
        dest="non_persistent_save_interval", type=int, default=None,
        help="Iterations between non-persistent (e.g. local) checkpoint saves."),
    "--non-persistent-ckpt-type": dict(
        dest="non_persistent_ckpt_type", type=str, default=None, choices=("global", "local", "in_memory"),
        help="Kind of non-persistent checkpoint: 'global' (a regular checkpoint, old ones removed) or 'local' "
             "(every rank saves its part on node-local storage). 'in_memory' is accepted by the parser but "
             "rejected by validation, as in Megatron-LM."),
    "--non-persistent-global-ckpt-dir": dict(
        dest="non_persistent_global_ckpt_dir", type=str, default=None,
        help="Directory of global non-persistent checkpoints."),
    "--non-persistent-local-ckpt-dir": dict(
        dest="non_persistent_local_ckpt_dir", type=str, default=None,
        help="Node-local directory (RAM disk or SSD) of local checkpoints."),
    "--non-persistent-local-ckpt-algo": dict(
        dest="non_persistent_local_ckpt_algo", type=str, default="fully_parallel",
        choices=("fully_parallel", "atomic"),
        help="How shards replicated across data-parallel ranks are saved: 'fully_parallel' (each saved once, "
             "spread over the ranks, exchanged on load) or 'atomic' (every rank saves all it holds)."),
    "--async-save": dict(
        dest="async_save", action="store_true", default=False,
        help="Save checkpoints asynchronously (the request runs on megatron-core's AsyncCallsQueue)."),
    "--use-persistent-ckpt-worker": dict(
        dest="use_persistent_ckpt_worker", action="store_true", default=False,
        help="Use one persistent background worker for async saves instead of a process forked per save."),
    "--ckpt-assume-constant-structure": dict(
        dest="ckpt_assume_constant_structure", action="store_true", default=False,
        help="Assume the checkpoint structure stays the same across saves (reuses the shard distribution)."),
    "--replication": dict(
        dest="replication", action="store_true", default=False,
        help="Replicate local checkpoints on peer ranks. Must be set on all ranks."),
    "--replication-jump": dict(
        dest="replication_jump", type=int, default=None,
        help="J, the spacing between ranks that hold replicas of each other's parts (e.g. ranks per node)."),
    "--replication-factor": dict(
        dest="replication_factor", type=int, default=2,
        help="Number of copies of each rank's part (its own included)."),
}

#: tasd's own flags (not Megatron-LM's): flag -> ``add_argument`` keywords.
TASD_FLAGS: dict[str, dict[str, Any]] = {
    "--replication-strategy": dict(
        dest="replication_strategy", type=str, default="clique", choices=("clique", "ring"),
        help="tasd: how replicas are placed with --replication: 'clique' (NVRx's groups: needs the world size "
             "divisible by jump x factor) or 'ring' (rank r stores r-J, ..., r-(F-1)J: any world size with "
             "W/gcd(W,J) >= F)."),
    "--local-ckpt-session-id": dict(
        dest="local_ckpt_session_id", type=str, default=None,
        help="tasd: session id of local checkpoints (a directory name). Unset: each job loads only its own "
             "checkpoints (job id from TASD_JOB_ID, TORCHELASTIC_RUN_ID or SLURM_JOB_ID); set it to resume across "
             "jobs."),
}

_CKPT_TYPES = ("global", "local", None)
_ALGOS = ("fully_parallel", "atomic")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add Megatron-LM's local-checkpoint flags (:data:`MEGATRON_FLAGS`) and tasd's
    (:data:`TASD_FLAGS`) to ``parser``, skipping every flag it already has (so it works on
    Megatron-LM's own parser, which has Megatron's). Returns ``parser``: usable as Megatron-LM's
    ``extra_args_provider``. Raises TypeError when ``parser`` is not an ArgumentParser."""
    if not isinstance(parser, argparse.ArgumentParser):
        raise TypeError(f"add_arguments takes an argparse.ArgumentParser, got {type(parser).__name__}")
    present = set(parser._option_string_actions)  # every option string the parser knows
    missing = [(flag, kw) for flag, kw in (*MEGATRON_FLAGS.items(), *TASD_FLAGS.items()) if flag not in present]
    if missing:
        group = parser.add_argument_group(title="local checkpointing (tasd)")
        for flag, kw in missing:
            group.add_argument(flag, **kw)
    logger.debug("add_arguments: added %s", [flag for flag, _ in missing])
    return parser


def _get(args: Any, name: str) -> Any:
    """``args.<name>``, or the flag's default when ``args`` lacks it (a parser built elsewhere)."""
    flag = "--" + name.replace("_", "-")
    default = (MEGATRON_FLAGS.get(flag) or TASD_FLAGS.get(flag) or {}).get("default")
    return getattr(args, name, default)


def _count(flag: str, value: Any) -> int:
    try:
        return as_count(flag, value)
    except ValueError as e:
        raise ValueError(str(e)) from None


def replication_strategy(args: Any, world_size: int | None = None) -> ReplicationStrategy | None:
    """The lazy replication strategy ``args`` describe (``--replication-strategy``, default
    clique as in NVRx, ``--replication-jump``, ``--replication-factor``), None without
    ``--replication``. Lazy: its process groups are created by the manager's first collective
    call, so building it is local. With ``world_size`` (default ``args.world_size`` when present)
    the placement is checked against it. Raises ValueError naming the flag at fault."""
    if not _get(args, "replication"):
        return None
    jump = _get(args, "replication_jump")
    if jump is None:
        raise ValueError("--replication requires --replication-jump (the spacing between ranks that hold "
                         "each other's replicas, e.g. the number of ranks per node)")
    jump = _count("--replication-jump", jump)
    factor = _count("--replication-factor", _get(args, "replication_factor"))
    name = _get(args, "replication_strategy") or "clique"
    if name not in ("clique", "ring"):
        raise ValueError(f"--replication-strategy must be 'clique' or 'ring', got {name!r}")
    config = ReplicationConfig(strategy=name, replication_jump=jump, replication_factor=factor)
    world = world_size if world_size is not None else getattr(args, "world_size", None)
    if world is not None:
        try:
            config.check_world_size(world)
        except ValueError as e:
            raise ValueError(f"--replication-strategy {name} with --replication-jump {jump} and --replication-factor "
                             f"{factor} does not fit world size {world}: {e}") from None
    return config.build(lazy=True)


def _check(args: Any, world_size: int | None = None) -> None:
    """Megatron-LM's rules for these flags that are errors there (assertions), as ValueErrors
    naming the flag, plus tasd's checks of its values. Does not change ``args``."""
    ckpt_type = _get(args, "non_persistent_ckpt_type")
    if ckpt_type not in _CKPT_TYPES:
        raise ValueError(f"--non-persistent-ckpt-type {ckpt_type!r} is not supported: use 'global' or 'local' "
                         "(Megatron-LM accepts 'in_memory' on the command line but rejects it in validation)")
    algo = _get(args, "non_persistent_local_ckpt_algo")
    if algo not in _ALGOS:
        raise ValueError(f"--non-persistent-local-ckpt-algo must be one of {list(_ALGOS)}, got {algo!r}")
    interval = _get(args, "non_persistent_save_interval")
    if interval is not None:
        _count("--non-persistent-save-interval", interval)
    if ckpt_type == "local" and _get(args, "non_persistent_local_ckpt_dir") is None:
        raise ValueError("--non-persistent-ckpt-type local requires --non-persistent-local-ckpt-dir (the node-local "
                         "directory for the checkpoints)")
    if _get(args, "replication"):
        if _get(args, "replication_jump") is None:
            raise ValueError("--replication requires --replication-jump (the spacing between ranks that hold each "
                             "other's replicas, e.g. the number of ranks per node)")
        if ckpt_type != "local":
            raise ValueError(f"--replication requires --non-persistent-ckpt-type local, got {ckpt_type!r}")
        replication_strategy(args, world_size)
    session = _get(args, "local_ckpt_session_id")
    if session is not None:
        try:
            check_session_id(session)
        except ValueError as e:
            raise ValueError(f"--local-ckpt-session-id: {e}") from None


def validate_args(args: Any, world_size: int | None = None, strict: bool = False) -> Any:
    """Check ``args`` (an argparse Namespace or any object with these attributes; a missing one
    counts as its flag's default) as Megatron-LM core_v0.16.1's ``validate_args`` does for these
    flags, and return it. Errors raise ValueError naming the flag:

    - ``--non-persistent-ckpt-type`` must be 'global', 'local' or unset ('in_memory' is rejected);
    - ``local`` requires ``--non-persistent-local-ckpt-dir``;
    - ``--replication`` requires ``--replication-jump`` and ``--non-persistent-ckpt-type local``;
    - tasd's checks: ``--non-persistent-local-ckpt-algo`` and ``--replication-strategy`` among
      their choices, ``--replication-jump``/``--replication-factor``/``--non-persistent-save-interval``
      whole numbers >= 1, the replication placement fitting ``world_size`` (default
      ``args.world_size`` when present), ``--local-ckpt-session-id`` a plain directory name.

    What Megatron-LM only warns about is done as it does (a warning is logged and ``args``
    changed), or raises ValueError with ``strict=True``:

    - ``--replication-jump`` without ``--replication`` is ignored (set to None);
    - ``--async-save`` without ``--use-persistent-ckpt-worker`` is turned off, for distributed
      checkpoint formats (``args.use_dist_ckpt``, else ``args.ckpt_format`` other than 'torch';
      assumed when ``args`` has neither, as Megatron's default format is torch_dist).
    """
    _check(args, world_size)

    def relax(message: str, apply: Callable[[], None]) -> None:
        if strict:
            raise ValueError(message)
        logger.warning("%s", message)
        apply()

    if not _get(args, "replication") and _get(args, "replication_jump"):
        relax("--replication-jump was given without --replication: ignored",
              lambda: setattr(args, "replication_jump", None))
    use_dist = getattr(args, "use_dist_ckpt", None)
    if use_dist is None:
        use_dist = getattr(args, "ckpt_format", "torch_dist") != "torch"
    if use_dist and _get(args, "async_save") and not _get(args, "use_persistent_ckpt_worker"):
        relax("--async-save requires --use-persistent-ckpt-worker (as in Megatron-LM): --async-save disabled",
              lambda: setattr(args, "async_save", False))
    return args


class MegatronLocalCheckpointManager(LocalCheckpointManager):
    """A :class:`~tasd.managers.LocalCheckpointManager` for Megatron-LM's loop (same arguments and
    options), with two differences:

    - ``keep_loaded`` defaults to True: Megatron-LM's resume calls find_latest and load twice
      (common part, then everything); the second reads no file and moves no replica (the first
      result, dropped by Megatron-LM, is handed over: see :mod:`tasd.managers.reuse`).
    - ``save(..., is_async=True)`` returns a ``MegatronAsyncRequest`` (see
      :func:`to_mcore_request`), which megatron-core's ``AsyncCallsQueue`` (forked or
      persistent) runs and which tasd's ``AsyncCallsQueue`` runs with all of tasd's bookkeeping;
      without megatron-core installed, tasd's own request.

    Megatron-LM 0.16.1 finalizes its async saves only at the top of each iteration
    (``maybe_finalize_async_save(blocking=False)``: calls already finished on every rank) and
    starts the next save even when the last one is not finalized (it prints "Starting a checkpoint
    save before previous has finished"). At most ``max_saves_in_flight`` (default 1) saves are
    then unfinalized: the new save first waits for the older one's writer (it reports from
    megatron-core's worker) and finalizes it, so it is published, not lost; megatron-core's later
    finalize of it does nothing. ``max_saves_in_flight=2`` (an option of
    :func:`build_checkpoint_manager`) holds one more save's staging buffer instead of waiting.
    """

    def __init__(self, root_local_ckpt_dir: Any, session_id: str = "", repl_strategy: Any = None, *,
                 keep_loaded: bool = True, **options: Any):
        super().__init__(root_local_ckpt_dir, session_id, repl_strategy, keep_loaded=keep_loaded, **options)

    def save(self, ta_state_dict: Any, iteration: int, is_async: bool = False) -> Any:
        request = super().save(ta_state_dict, iteration, is_async=is_async)
        if request is None:
            return None
        try:
            return to_mcore_request(request)
        except ImportError:
            logger.debug("megatron-core is not installed: returning tasd's AsyncRequest")
            return request

    save.__doc__ = (LocalCheckpointManager.save.__doc__ or "") + """
        MegatronLocalCheckpointManager: the request is a MegatronAsyncRequest when megatron-core is
        installed (for megatron-core's AsyncCallsQueue as well as tasd's)."""


def build_checkpoint_manager(args: Any, **options: Any) -> LocalCheckpointManager | None:
    """The local checkpoint manager ``args`` describe, as Megatron-LM's ``training.py`` builds it
    (None unless ``--non-persistent-ckpt-type local``): a :class:`MegatronLocalCheckpointManager`
    on ``--non-persistent-local-ckpt-dir`` with session ``--local-ckpt-session-id`` (default "":
    this job's checkpoints only) and, with ``--replication``, the lazy strategy of
    :func:`replication_strategy`. ``options`` go to the manager (e.g. ``keep_loaded``,
    ``max_saves_in_flight``). Raises ValueError naming the flag when ``args`` break the rules of
    :func:`validate_args` (it does not change ``args``), including a replication placement that
    does not fit this job's world size (torch.distributed's; 1 without it). Constructing it is
    local; all ranks build it, and its first save/find_latest/load is collective."""
    world_size = collectives.rank_and_size()[1]
    _check(args, world_size)
    if _get(args, "non_persistent_ckpt_type") != "local":
        return None
    strategy = replication_strategy(args, world_size)
    manager = MegatronLocalCheckpointManager(_get(args, "non_persistent_local_ckpt_dir"),
                                             session_id=_get(args, "local_ckpt_session_id") or "",
                                             repl_strategy=strategy, **options)
    logger.info("local checkpoints in %s (replication: %s)", manager.local_ckpt_dir,
                "none" if strategy is None else repr(strategy))
    return manager


# -- save and load as Megatron-LM's loop does --------------------------------------------------------
#: Keys of Megatron-LM's ``checkpointing_context`` this module reads and writes.
CONTEXT_MANAGER_KEY = "local_checkpoint_manager"
CONTEXT_CACHE_KEY = "local_checkpoint_cache"


def _data_parallel_group(group: Any) -> Any:
    """``group``, else Megatron's data-parallel group with context parallelism when megatron-core's
    model parallelism is initialized (what Megatron-LM passes), else None (the world)."""
    if group is not None:
        return group
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def save_local_checkpoint(manager: LocalCheckpointManager, sharded_state_dict: Any, iteration: int, args: Any,
                          context: dict | None = None, parallelization_group: Any = None) -> Any:
    """Megatron-LM's local save step (``save_checkpoint`` with ``--non-persistent-ckpt-type
    local``) on tasd: wrap ``sharded_state_dict`` with ``tasd.mcore.MCoreTensorAwareStateDict``
    (algorithm ``--non-persistent-local-ckpt-algo``; the shard distribution cached in
    ``context['local_checkpoint_cache']`` is reused when ``--ckpt-assume-constant-structure``) and
    ``manager.save(..., iteration, is_async=args.async_save)``. The new distribution is stored in
    ``context`` (when given) after the save returns, as Megatron-LM does.

    ``parallelization_group``: the group shards are spread over for 'fully_parallel' (default:
    Megatron's data-parallel group with context parallelism when megatron-core's model
    parallelism is initialized, else the world). Collective (every rank calls it together).
    Returns None for a synchronous save; for ``--async-save`` the request, as a
    :data:`MegatronAsyncRequest`, to schedule on megatron-core's (or tasd's) AsyncCallsQueue and
    finalize on every rank. Raises what ``from_state_dict`` and ``manager.save`` raise."""
    from tasd.mcore import MCoreTensorAwareStateDict

    algo = _get(args, "non_persistent_local_ckpt_algo")
    cached = None
    if _get(args, "ckpt_assume_constant_structure") and context is not None:
        cached = context.get(CONTEXT_CACHE_KEY)
    ta_state_dict, metadata = MCoreTensorAwareStateDict.from_state_dict(
        sharded_state_dict, algo=algo, parallelization_group=_data_parallel_group(parallelization_group),
        cached_metadata=cached)
    request = manager.save(ta_state_dict, iteration, is_async=bool(_get(args, "async_save")))
    if context is not None:
        context[CONTEXT_CACHE_KEY] = metadata
    return None if request is None else to_mcore_request(request)


def load_local_checkpoint(manager: LocalCheckpointManager, sharded_state_dict: Any, args: Any,
                          parallelization_group: Any = None, find_latest: bool = True) -> tuple[Any, tuple] | None:
    """Megatron-LM's local load step (``_load_base_checkpoint`` for ``--non-persistent-ckpt-type
    local``) on tasd: ``manager.find_latest()`` (unless ``find_latest=False``; None when there is
    no local checkpoint), ``manager.load()``, then ``to_state_dict(sharded_state_dict, algo=
    --non-persistent-local-ckpt-algo, parallelization_group=...)`` of the loaded object. Returns
    ``(state_dict, ckpt_id)`` with ``ckpt_id == (iteration, rank, session_id)``.

    Megatron-LM calls it twice per resume: first with ``sharded_state_dict=None`` (the common part
    and the arguments), then with the model's sharded state dict. The manager keeps the first
    load's result (with ``keep_loaded=True``, the default of :class:`MegatronLocalCheckpointManager`),
    so the second reads no file and moves no replica.
    ``parallelization_group`` as in :func:`save_local_checkpoint`. Collective."""
    if find_latest and manager.find_latest() < 0:
        return None
    ta_state_dict, ckpt_id = manager.load()
    state_dict = ta_state_dict.to_state_dict(sharded_state_dict, algo=_get(args, "non_persistent_local_ckpt_algo"),
                                             parallelization_group=_data_parallel_group(parallelization_group))
    return state_dict, ckpt_id


# -- requests for megatron-core's AsyncCallsQueue ------------------------------------------------------
class _LoggedCall:
    """Runs ``fn`` and logs an exception instead of raising it (picklable when ``fn`` is).

    megatron-core's persistent worker loop (``PersistentAsyncCaller.async_loop``) dies on an
    exception and its trainer then polls for a completion that never comes; a local checkpoint
    request pickled for it runs its writer under this guard, so the worker reports the call done
    and the save's finalize, which reads the writer's own report (its traceback) and checks that
    this rank's part was stored, fails the save on every rank instead."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.fn(*args, **kwargs)
        except Exception:
            logger.exception("asynchronous checkpoint writer %r failed; the save's finalize will fail it on every "
                             "rank", self.fn)
            return None

    def __repr__(self) -> str:
        return f"_LoggedCall({self.fn!r})"


def _define_request_class() -> type:
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest as MCoreAsyncRequest

    from tasd.managers.async_ckpt import AsyncRequest as TasdAsyncRequest
    from tasd.managers.async_ckpt.request import notify_frozen

    class MegatronAsyncRequest(MCoreAsyncRequest):
        """megatron-core's ``AsyncRequest`` that also carries tasd's ``handle`` and the methods
        tasd's AsyncCallsQueue calls, so it runs on either queue (see :func:`to_mcore_request`)."""

        handle: Any = None  # an instance attribute once set; not one of the tuple's fields

        def _replace(self, **fields: Any) -> "MegatronAsyncRequest":
            new = super()._replace(**fields)
            new.__dict__.update(self.__dict__)  # keeps the handle (megatron-core's freeze/_replace too)
            return new

        def __copy__(self) -> "MegatronAsyncRequest":
            return self._replace()

        def __reduce__(self) -> tuple:
            """A pickled request (what megatron-core's persistent worker receives) drops the handle
            and runs async_fn under :class:`_LoggedCall`."""
            fields = list(self)
            if fields[0] is not None and not isinstance(fields[0], _LoggedCall):
                fields[0] = _LoggedCall(fields[0])
            return type(self), tuple(fields)

        def freeze(self) -> "MegatronAsyncRequest":
            """A frozen copy with its own finalize list (the queues freeze what they schedule);
            tells the handle ``frozen()``: the save then knows that a queue took it, also when
            that queue (megatron-core's) tells nothing else."""
            notify_frozen(self.handle)
            return self._replace(is_frozen=True, finalize_fns=list(self.finalize_fns))

        check_args = TasdAsyncRequest.check_args
        resolved_args = TasdAsyncRequest.resolved_args
        execute_sync = TasdAsyncRequest.execute_sync

    MegatronAsyncRequest.__module__ = __name__
    MegatronAsyncRequest.__qualname__ = "MegatronAsyncRequest"
    return MegatronAsyncRequest


def __getattr__(name: str) -> Any:
    # MegatronAsyncRequest subclasses megatron-core's AsyncRequest: defined (importing megatron-core)
    # on first use, then a module attribute (pickling finds it here by name in any process).
    if name == "MegatronAsyncRequest":
        cls = _define_request_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_mcore_request(request: Any) -> Any:
    """``request`` (tasd's ``AsyncRequest``, e.g. from ``LocalCheckpointManager.save(...,
    is_async=True)``) as a ``MegatronAsyncRequest``: a subclass of megatron-core's
    ``AsyncRequest`` with the same fields, that keeps tasd's handle.

    What megatron-core 0.16.1's ``AsyncCallsQueue`` needs of a request, and why tasd's own does
    not fit as it is: its persistent worker runs only instances of megatron-core's
    ``AsyncRequest`` (any other object it receives is silently skipped, and the trainer then
    waits for it forever); ``schedule_async_request`` rebuilds a request whose field count
    differs from its 7 with ``AsyncRequest(**request._asdict())``, which tasd's 8-field request
    (``handle`` added last) fails; it calls ``freeze()`` and ``_replace(call_idx=...,
    finalize_fns=[])``, pickles the whole request for its persistent worker (torch's queue: the
    shared-memory staging buffer passes as a file descriptor), and forks for its temporal one.
    A MegatronAsyncRequest is such an instance; pickled, it drops the handle and runs its writer
    under a guard that logs a failure instead of killing megatron-core's worker loop (the save's
    finalize then fails it on every rank). Freezing it (megatron-core's queue does, as every
    queue) tells the save that a queue took it: when Megatron-LM starts the next save before
    megatron-core's queue finalized this one, the manager waits for this writer's own report and
    finalizes it then (see ``BaseCheckpointManager.save``), instead of dropping it. On tasd's
    ``AsyncCallsQueue`` it keeps the handle and behaves as tasd's request. Returns ``request``
    itself when it already is one. Raises ImportError (naming the ``megatron`` extra) without
    megatron-core, TypeError for anything that is not an AsyncRequest."""
    try:
        cls = globals().get("MegatronAsyncRequest") or __getattr__("MegatronAsyncRequest")
    except ImportError as e:
        raise ImportError("to_mcore_request needs megatron-core (pip install 'tasd-checkpoint[megatron]')") from e
    if isinstance(request, cls):
        return request
    from tasd.managers.async_ckpt import AsyncRequest as TasdAsyncRequest

    if not isinstance(request, TasdAsyncRequest):
        raise TypeError(f"to_mcore_request takes tasd's AsyncRequest, got {type(request).__name__}")
    out = cls(request.async_fn, request.async_fn_args, request.finalize_fns, request.async_fn_kwargs,
              request.preload_fn, request.is_frozen, request.call_idx)
    out.handle = request.handle
    return out


def install_nvrx_compat(route_mcore: bool = False) -> bool:
    """Make the NVRx import paths Megatron-LM's code uses resolve to tasd when NVRx is not
    installed; see :func:`tasd.adapters.nvrx_compat.install` for the paths, ``route_mcore`` and
    what it does when NVRx is installed. Returns True when the compatibility modules are in place."""
    from tasd.adapters import nvrx_compat

    return nvrx_compat.install(route_mcore=route_mcore)
