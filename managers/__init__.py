"""Checkpoint managers: local checkpoints on node-local storage, replicated between ranks."""

from tasd.managers.base_manager import BaseCheckpointManager
from tasd.managers.errors import CheckpointingException, CorruptCheckpointError
from tasd.managers.local_manager import LocalCheckpointManager

__all__ = ["BaseCheckpointManager", "CheckpointingException", "CorruptCheckpointError",
           "LocalCheckpointManager"]
