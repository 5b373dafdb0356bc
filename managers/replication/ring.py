"""Ring replication: rank r stores the parts of r-J, r-2J, ..., r-(F-1)J (mod W)."""

from __future__ import annotations

import math

from tasd.managers.replication.groups import as_count
from tasd.managers.replication.strategy import ReplicationStrategy


class RingReplicationStrategy(ReplicationStrategy):
    """holders(owner) = [(owner + k*J) % W for k in 1..F-1]; works for any world size with
    ``W // gcd(W, J) >= F`` (the F ranks r, r+J, ... are distinct). A rank exchanges parts with
    each of its peers (r +- kJ, k < F) on a gloo group of those two ranks only (purpose
    ``ring-exchange``): up to 2(F-1) groups per rank, whatever the world size. Constructing it
    starts creating them in a background thread when torch.distributed is initialized
    (collective: every rank and its peers construct it together, in practice all ranks)."""

    name = "ring"

    def check_world_size(self, world_size: int) -> None:
        world = as_count("world size", world_size)
        jump, factor = self.replication_jump, self.replication_factor
        reach = world // math.gcd(world, jump)
        if reach < factor:
            raise ValueError(
                f"ring replication with replication_factor {factor} and replication_jump {jump} "
                f"needs {factor} distinct ranks among r, r+{jump}, r+{2 * jump}, ... (mod world size), but "
                f"world size {world} gives only {world} / gcd({world}, {jump}) = {reach}: use a "
                f"world size with world_size / gcd(world_size, replication_jump) >= "
                f"replication_factor, or a smaller factor")

    def holders(self, owner: int, world_size: int) -> list[int]:
        world = self._check_rank("owner", owner, world_size)
        return [(owner + k * self.replication_jump) % world for k in range(1, self.replication_factor)]

    def held_owners(self, rank: int, world_size: int) -> list[int]:
        world = self._check_rank("rank", rank, world_size)
        return sorted((rank - k * self.replication_jump) % world
                      for k in range(1, self.replication_factor))


class LazyRingReplicationStrategy(RingReplicationStrategy):
    """Ring replication whose exchange groups are created on the first access of
    ``exchange_groups`` (collective: that access must happen on each rank and its peers together,
    in practice all ranks). Constructing it is local."""

    lazy = True
