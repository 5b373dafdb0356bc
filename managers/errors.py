"""Exceptions raised on purpose by tasd."""


class CheckpointingException(Exception):
    """Base of every error the library raises on purpose (bad checkpoint, failed save, ...)."""


class CorruptCheckpointError(CheckpointingException):
    """A checkpoint file is malformed, truncated, fails its checksums or names forbidden globals."""
