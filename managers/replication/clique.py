"""Clique replication: ranks n, n+J, ..., n+(F-1)J form a group; every member stores every member's
part (NVRx's CliqueReplicationStrategy placement)."""

from __future__ import annotations

from tasd.managers.replication.groups import parse_group_sequence
from tasd.managers.replication.strategy import ReplicationStrategy


class CliqueReplicationStrategy(ReplicationStrategy):
    """Groups from :func:`parse_group_sequence`; needs ``world_size % (J * F) == 0``. Constructing it
    creates the exchange group when torch.distributed is initialized (collective on all ranks)."""

    name = "clique"

    def __init__(self, replication_jump: int = 1, replication_factor: int = 2):
        self._groups: dict[int, dict[int, list[int]]] = {}  # world size -> rank -> its group
        super().__init__(replication_jump, replication_factor)

    def groups(self, world_size: int) -> list[list[int]]:
        """All clique groups for ``world_size`` (sorted). Raises ValueError if it does not fit."""
        return parse_group_sequence(self.replication_jump, self.replication_factor, world_size)

    def _group_of(self, world_size: int) -> dict[int, list[int]]:
        if world_size not in self._groups:
            self._groups[world_size] = {r: g for g in self.groups(world_size) for r in g}
        return self._groups[world_size]

    def check_world_size(self, world_size: int) -> None:
        parse_group_sequence(self.replication_jump, self.replication_factor, world_size)

    def holders(self, owner: int, world_size: int) -> list[int]:
        world = self._check_rank("owner", owner, world_size)
        return [r for r in self._group_of(world)[owner] if r != owner]

    def held_owners(self, rank: int, world_size: int) -> list[int]:
        return self.holders(rank, world_size)  # a clique is symmetric


class LazyCliqueReplicationStrategy(CliqueReplicationStrategy):
    """Clique replication whose exchange group is created on the first access of ``group``
    (collective: that access must happen on all ranks together). Constructing it is local."""

    lazy = True
