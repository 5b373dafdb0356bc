"""Clique replication: ranks n, n+J, ..., n+(F-1)J form a group; every member stores every member's
part (NVRx's CliqueReplicationStrategy placement)."""

from __future__ import annotations

from tasd.managers.replication.groups import as_count, parse_group_sequence
from tasd.managers.replication.strategy import ReplicationStrategy


class CliqueReplicationStrategy(ReplicationStrategy):
    """Groups from :func:`parse_group_sequence`; needs ``world_size % (J * F) == 0``. A rank
    exchanges parts on one gloo group over its clique (F ranks, purpose ``clique-exchange``).
    Constructing it starts creating that group in a background thread when torch.distributed is
    initialized (collective: every member of each clique constructs it, in practice all ranks
    together)."""

    name = "clique"

    def groups(self, world_size: int) -> list[list[int]]:
        """All clique groups for ``world_size`` (sorted): O(W), for inspection and tests; the
        lookups below are O(F). Raises ValueError if it does not fit."""
        return parse_group_sequence(self.replication_jump, self.replication_factor, world_size)

    def check_world_size(self, world_size: int) -> None:
        jump, factor = self.replication_jump, self.replication_factor
        world = as_count("world size", world_size)
        if world % (jump * factor) != 0:
            raise ValueError(
                f"clique replication needs the world size ({world}) to be divisible by "
                f"replication_jump x replication_factor ({jump} x {factor} = {jump * factor})")

    def group_of(self, rank: int, world_size: int) -> list[int]:
        """The clique of ``rank`` (sorted, ``rank`` included), computed in O(F): the ranks with
        the same remainder modulo J, cut into consecutive groups of F (as
        :func:`parse_group_sequence`). ValueError for an invalid world size or rank."""
        self._check_rank("rank", rank, world_size)
        jump, factor = self.replication_jump, self.replication_factor
        first = (rank // jump) // factor * factor
        return [rank % jump + jump * (first + k) for k in range(factor)]

    def holders(self, owner: int, world_size: int) -> list[int]:
        return [r for r in self.group_of(owner, world_size) if r != owner]

    def held_owners(self, rank: int, world_size: int) -> list[int]:
        return self.holders(rank, world_size)  # a clique is symmetric

    def exchange_specs(self, rank: int, world_size: int) -> dict[int, tuple[str, tuple[int, ...]]]:
        """Every peer of ``rank`` maps to the one group over its clique (:meth:`group_of`)."""
        clique = tuple(self.group_of(rank, world_size))
        return {p: ("clique-exchange", clique) for p in clique if p != rank}


class LazyCliqueReplicationStrategy(CliqueReplicationStrategy):
    """Clique replication whose exchange group is created on the first access of
    ``exchange_groups`` (collective: that access must happen on all members of the clique
    together). Constructing it is local."""

    lazy = True
