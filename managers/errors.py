"""Exceptions raised on purpose by tasd."""


class CheckpointingException(Exception):
    """Base of every error the library raises on purpose (bad checkpoint, failed save, ...)."""


class CorruptCheckpointError(CheckpointingException):
    """A checkpoint file is malformed, truncated, fails its checksums or names forbidden globals."""


class PeerUnreachableError(CheckpointingException):
    """A collective or point-to-point operation of tasd's own process groups failed: a peer died, is
    stuck, or timed out. The rank that sees it raises at once instead of entering another
    collective that would wait for the same peer again; tasd's groups may be unusable afterwards,
    the training's own groups are untouched."""
