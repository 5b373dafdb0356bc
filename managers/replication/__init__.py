"""Replication strategies: which ranks keep replicas of which rank's local checkpoint part.

NVRx-compatible names; placement functions are pure, creating the exchange groups among peers is
collective over their members (see :class:`ReplicationStrategy`).
"""

from tasd.managers.replication.clique import CliqueReplicationStrategy, LazyCliqueReplicationStrategy
from tasd.managers.replication.groups import parse_group_sequence
from tasd.managers.replication.ring import LazyRingReplicationStrategy, RingReplicationStrategy
from tasd.managers.replication.strategy import NoReplicasAvailableError, ReplicationStrategy

__all__ = ["CliqueReplicationStrategy", "LazyCliqueReplicationStrategy", "LazyRingReplicationStrategy",
           "NoReplicasAvailableError", "ReplicationStrategy", "RingReplicationStrategy",
           "parse_group_sequence"]
