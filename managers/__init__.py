"""Checkpoint managers: local checkpoints on node-local storage, replicated between ranks."""

from tasd.managers.base_manager import BaseCheckpointManager
from tasd.managers.config import ReplicationConfig, ReplicationMismatchError
from tasd.managers.errors import CheckpointingException, CorruptCheckpointError
from tasd.managers.local_manager import LocalCheckpointManager
from tasd.managers.replication import NoReplicasAvailableError

__all__ = ["BaseCheckpointManager", "CheckpointingException", "CorruptCheckpointError",
           "LocalCheckpointManager", "NoReplicasAvailableError", "ReplicationConfig",
           "ReplicationMismatchError"]
