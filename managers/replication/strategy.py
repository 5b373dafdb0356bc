"""Replication strategy base: who stores a replica of whose checkpoint part, and the groups among
peers that replica exchanges run on."""

from __future__ import annotations

import abc
import logging
import threading

import torch.distributed as dist

from tasd.managers import subgroups
from tasd.managers.errors import CheckpointingException
from tasd.managers.replication.groups import as_count, check_params
from tasd.managers.subgroups import Subgroup

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
    """Which ranks keep a replica of which rank's checkpoint part, and the groups replicas move on.

    ``holders``/``held_owners``/``peers``/``exchange_specs``/``check_world_size``/``settings`` are
    pure (not collective) and cost O(F) per call for the concrete strategies (never O(W)).

    ``exchange_groups`` maps each peer of this rank (every rank it exchanges parts with: its
    holders and the owners it holds for) to a :class:`~tasd.managers.subgroups.Subgroup`, a gloo
    group of tasd's own among a few peers only (see :meth:`exchange_specs`): parts live in host
    memory, so their traffic never goes through the GPU or the training's communicators,
    exchanges (which may run in a background thread) never interleave with other collectives,
    and no rank connects to more than its peers. Creating them is collective over the members of
    each group (all created at once, concurrently, by one :func:`~tasd.managers.subgroups.subgroups`
    call). Eager strategies start creating them in ``__init__`` when torch.distributed is
    initialized and the world size fits the strategy (all ranks construct the strategy together),
    in a thread of their own, so that construction returns at once; lazy ones (``lazy = True``)
    create them on the first access of ``exchange_groups``. tasd's groups touch no
    torch.distributed state of the process (no ``new_group``), so they may be created on any
    thread, and an access while they are being created waits: the managers start the creation in
    their background exchange thread at a collective point every rank reaches (find_latest, or
    a save's replication), so that a restart that moves no part never waits for it; an exchange
    on the training thread (a sync save, a load that recovers a part) waits for it. It is empty
    while torch.distributed is not initialized (a world of one).

    A pickled strategy drops its groups; the copy creates them on first access of
    ``exchange_groups`` (as a lazy strategy does).
    """

    name: str = ""  # "clique" or "ring", set by the concrete classes
    lazy: bool = False

    def __init__(self, replication_jump: int = 1, replication_factor: int = 2):
        self.replication_jump, self.replication_factor, _ = check_params(replication_jump,
                                                                          replication_factor)
        self._groups: dict[int, Subgroup] | None = None  # None: not created yet
        self._creating = threading.Lock()  # one creation at a time; later accessors wait for it
        if not self.lazy and _distributed():
            try:
                self.check_world_size(dist.get_world_size())
            except ValueError as e:  # no groups to make: the managers reject this world size
                logger.debug("%r: no exchange groups created: %s", self, e)
            else:
                threading.Thread(target=self._create_in_background, name="tasd-exchange-groups", daemon=True).start()

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

    def peers(self, rank: int, world_size: int) -> list[int]:
        """The ranks ``rank`` exchanges parts with (sorted, without ``rank``): its holders and the
        owners it holds for. O(F) with the clique and ring lookups (the default
        :meth:`held_owners` walks the world). Raises ValueError like :meth:`holders`."""
        return sorted(set(self.holders(rank, world_size)) | set(self.held_owners(rank, world_size)))

    def exchange_specs(self, rank: int, world_size: int) -> dict[int, tuple[str, tuple[int, ...]]]:
        """peer -> ``(purpose, ranks)`` of the group ``rank`` exchanges with that peer on, for every
        peer in :meth:`peers` (several peers may share one group). Pure, as costly as
        :meth:`peers`; symmetric: ``rank`` is given the same group for ``peer`` as ``peer`` is for
        ``rank``. This default: one 2-rank group per pair of peers. Raises ValueError like
        :meth:`holders`."""
        return {p: (f"{self.name}-exchange", (min(rank, p), max(rank, p))) for p in self.peers(rank, world_size)}

    # -- exchange groups --------------------------------------------------------------------------
    @property
    def exchange_groups(self) -> dict[int, Subgroup]:
        """peer rank -> the :class:`~tasd.managers.subgroups.Subgroup` this rank exchanges parts
        with it on, for every peer of this rank; empty without torch.distributed. Created on first
        access when not yet created (collective over each group's members: see the class
        docstring); thread-safe: an access while another thread creates them waits for that
        creation; later accesses are local. Raises ValueError when the world size does not fit
        the strategy, RuntimeError (from gloo) when a peer does not arrive within the job's
        timeout."""
        if self._groups is None:
            if not _distributed():
                return {}
            with self._creating:
                if self._groups is None:
                    self._create_groups()
            assert self._groups is not None
        return self._groups

    def _create_in_background(self) -> None:
        """Create the exchange groups (as ``exchange_groups`` does) on a background thread: a
        failure is logged, not raised; the next access of ``exchange_groups`` tries again and
        raises."""
        try:
            self.exchange_groups  # noqa: B018 - creates them
        except Exception:
            logger.warning("%r: creating the replica exchange groups failed (retried when they are needed)", self,
                           exc_info=True)

    def _create_groups(self) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        specs = self.exchange_specs(rank, world)
        distinct = list(dict.fromkeys(specs.values()))
        made = dict(zip(distinct, subgroups.subgroups(distinct))) if distinct else {}
        self._groups = {peer: made[spec] for peer, spec in specs.items()}
        logger.debug("%r: rank %d exchanges with %d peer(s) on %d group(s): %s", self, rank, len(specs),
                     len(made), list(made.values())[:8])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_groups"] = None  # process groups do not pickle
        del state["_creating"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._creating = threading.Lock()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
