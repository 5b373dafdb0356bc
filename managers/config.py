"""Validated replication settings (pydantic v2) and the error for a checkpoint saved with others."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasd.managers.errors import CheckpointingException
from tasd.managers.replication import (CliqueReplicationStrategy, LazyCliqueReplicationStrategy,
                                       LazyRingReplicationStrategy, ReplicationStrategy,
                                       RingReplicationStrategy)

_Count = Annotated[int, Field(ge=1, strict=True)]

_CLASSES: dict[tuple[str, bool], type[ReplicationStrategy]] = {
    ("clique", False): CliqueReplicationStrategy, ("clique", True): LazyCliqueReplicationStrategy,
    ("ring", False): RingReplicationStrategy, ("ring", True): LazyRingReplicationStrategy,
}


class ReplicationConfig(BaseModel):
    """Replication settings: ``strategy`` ("clique" or "ring", default "ring"),
    ``replication_jump`` and ``replication_factor`` (ints >= 1; bools, floats and strings are
    rejected). Invalid values raise pydantic's ValidationError (a ValueError). Immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Literal["clique", "ring"] = "ring"
    replication_jump: _Count = 1
    replication_factor: _Count = 2

    @property
    def settings(self) -> dict:
        """Same dict as ``ReplicationStrategy.settings`` (what checkpoint headers record)."""
        return {"strategy": self.strategy, "replication_jump": self.replication_jump,
                "replication_factor": self.replication_factor}

    def check_world_size(self, world_size: int) -> None:
        """Raise ValueError (naming the numbers and the rule) if these settings cannot place
        replicas on ``world_size`` ranks. Local, never touches torch.distributed."""
        self.build(lazy=True).check_world_size(world_size)

    def build(self, lazy: bool = True) -> ReplicationStrategy:
        """The strategy object. ``lazy=True`` (default) is local and creates its process group on
        first use; ``lazy=False`` creates it now when torch.distributed is initialized, so then all
        ranks must call build together."""
        return _CLASSES[(self.strategy, bool(lazy))](self.replication_jump, self.replication_factor)

    @classmethod
    def from_strategy(cls, strategy: ReplicationStrategy) -> "ReplicationConfig":
        """The settings of ``strategy`` (lazy or not)."""
        if not isinstance(strategy, ReplicationStrategy):
            raise TypeError(f"expected a ReplicationStrategy, got {type(strategy).__name__}")
        return cls(**strategy.settings)

    def describe(self) -> str:
        """In words, e.g. ``"ring, factor 2, jump 1"``."""
        return describe_settings(self.settings)


def describe_settings(settings: dict | None) -> str:
    """``settings`` (as in checkpoint headers) in words; None is "no replication". Never raises."""
    if settings is None:
        return "no replication"
    try:
        return (f"{settings['strategy']}, factor {settings['replication_factor']}, "
                f"jump {settings['replication_jump']}")
    except (KeyError, TypeError):
        return f"unrecognised replication settings {settings!r}"


class ReplicationMismatchError(CheckpointingException):
    """Checkpoint ``iteration`` was saved with replication settings ``saved`` but this manager uses
    ``current`` (settings dicts; None = no replication). Raised by find_latest/load."""

    def __init__(self, iteration: int, saved: dict | None, current: dict | None):
        self.iteration = iteration
        self.saved = saved
        self.current = current
        super().__init__(f"checkpoint iteration {iteration} was saved with {describe_settings(saved)} "
                         f"but this manager uses {describe_settings(current)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.iteration, self.saved, self.current)
