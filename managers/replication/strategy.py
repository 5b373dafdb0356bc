"""Replication strategy base: who stores a replica of whose checkpoint part, and the process group
replica exchanges run on."""

from __future__ import annotations

import abc
import logging
from typing import Any

import torch.distributed as dist

from tasd.managers import collectives

from tasd.managers.errors import CheckpointingException
from tasd.managers.replication.groups import as_count, check_params

logger = logging.getLogger(__name__)


class NoReplicasAvailableError(CheckpointingException):
    """Some ranks' parts of checkpoint ``iteration`` exist nowhere any more (neither the owner's
    own copy nor any replica). ``owners`` lists those ranks."""

    def __init__(self, iteration: int, owners: list[int]):
        self.iteration = iteration
        self.owners = sorted(owners)
        names = ", ".join(str(o) for o in self.owners)
        plural = "s" if len(self.owners) != 1 else ""
        super().__init__(
            f"checkpoint iteration {iteration} cannot be recovered: no rank holds the part of "
            f"rank{plural} {names} (neither the owner's copy nor any replica is left)")

    def __reduce__(self):
        return type(self), (self.iteration, self.owners)


class ReplicationStrategy(abc.ABC):
    """Which ranks keep a replica of which rank's checkpoint part.

    ``holders``/``held_owners``/``check_world_size``/``settings`` are pure (not collective).
    ``group`` is a gloo process group over all ranks dedicated to replica exchange: parts live in
    host memory, so their traffic never goes through the GPU or the training's communicators, and
    exchanges (which may run in a background thread) never interleave with other collectives.
    Creating it is collective over the world and happens on the thread that first needs it: eager
    strategies create it in ``__init__`` when torch.distributed is initialized (all ranks construct
    the strategy together), lazy ones (``lazy = True``) on the first access of ``group``. The
    managers access ``group`` at the start of their collective calls, on the calling (training)
    thread, before any background work starts. ``group`` is None while torch.distributed is not
    initialized (a world of one).

    A pickled strategy drops its group; the copy creates a new one on first access of ``group``.
    """

    name: str = ""  # "clique" or "ring", set by the concrete classes
    lazy: bool = False

    def __init__(self, replication_jump: int = 1, replication_factor: int = 2):
        self.replication_jump, self.replication_factor, _ = check_params(replication_jump,
                                                                          replication_factor)
        self._group: Any = None
        if not self.lazy:
            self._maybe_create_group()

    @classmethod
    def from_replication_params(cls, replication_jump: int = 1,
                                replication_factor: int = 2) -> "ReplicationStrategy":
        """NVRx-style constructor; same as ``cls(replication_jump, replication_factor)``."""
        return cls(replication_jump, replication_factor)

    # -- placement (pure) -----------------------------------------------------------------------
    @abc.abstractmethod
    def check_world_size(self, world_size: int) -> None:
        """Raise ValueError (naming the numbers and the rule) if this strategy cannot place
        replicas on ``world_size`` ranks."""

    @abc.abstractmethod
    def holders(self, owner: int, world_size: int) -> list[int]:
        """Ranks that store a replica of ``owner``'s part, without ``owner``, in a deterministic
        order; ``replication_factor - 1`` distinct ranks. Raises ValueError for an invalid world
        size or an owner outside ``range(world_size)``."""

    def held_owners(self, rank: int, world_size: int) -> list[int]:
        """Owners (sorted, without ``rank``) whose parts ``rank`` stores replicas of: the inverse of
        :meth:`holders`. Raises ValueError like :meth:`holders`."""
        self._check_rank("rank", rank, world_size)
        return sorted(o for o in range(world_size) if o != rank and rank in self.holders(o, world_size))

    def _check_rank(self, what: str, rank: int, world_size: int) -> int:
        world = as_count("world size", world_size)
        self.check_world_size(world)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"{what} must be an int in [0, {world}) for world size {world}, "
                             f"got {rank!r}")
        return world

    # -- identity -------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        """JSON-serializable settings recorded in checkpoint headers."""
        return {"strategy": self.name, "replication_jump": self.replication_jump,
                "replication_factor": self.replication_factor}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReplicationStrategy):
            return NotImplemented
        return self.settings == other.settings

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.settings.items())))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(replication_jump={self.replication_jump}, "
                f"replication_factor={self.replication_factor})")

    # -- process group --------------------------------------------------------------------------
    @property
    def group(self) -> Any:
        """The replica-exchange process group (see the class docstring: creating it is collective);
        None without torch.distributed."""
        if self._group is None:
            self._maybe_create_group()
        return self._group

    def _maybe_create_group(self) -> None:
        if dist.is_available() and dist.is_initialized():
            # A dead or stuck peer must fail the exchange after the job's own timeout, not 30 min.
            self._group = dist.new_group(backend="gloo", timeout=collectives.group_timeout())
            logger.debug("%r: created its replica-exchange gloo group", self)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_group"] = None  # process groups do not pickle
        return state
