"""Replication parameters and NVRx-compatible clique groups (pure functions, no torch.distributed)."""

from __future__ import annotations

import operator
from typing import Any


def as_count(name: str, value: Any, context: str = "") -> int:
    """``value`` as a plain int >= 1, else ValueError naming ``name`` (and ``context``).

    Accepts ints and integer-like objects (``__index__``, e.g. numpy ints); rejects bool, float,
    str and anything else.
    """
    suffix = f" ({context})" if context else ""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number >= 1, got the bool {value!r}{suffix}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number >= 1, got {type(value).__name__} "
                         f"{value!r}{suffix}") from None
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}{suffix}")
    return int(number)


def check_params(replication_jump: Any, replication_factor: Any,
                 world_size: Any = None) -> tuple[int, int, int | None]:
    """Validated (jump, factor, world_size) as plain ints; world_size None is passed through.
    Raises ValueError naming every number given."""
    context = f"replication_jump={replication_jump!r}, replication_factor={replication_factor!r}"
    if world_size is not None:
        context += f", world size {world_size!r}"
    jump = as_count("replication_jump", replication_jump, context)
    factor = as_count("replication_factor", replication_factor, context)
    world = None if world_size is None else as_count("world size", world_size, context)
    return jump, factor, world


def parse_group_sequence(replication_jump: int, replication_factor: int,
                         world_size: int) -> list[list[int]]:
    """Clique replication groups, as NVRx computes them.

    For each ``modulus`` in ``range(replication_jump)``, the ranks ``modulus, modulus + J, ...``
    below ``world_size`` are cut into consecutive groups of ``replication_factor``; all groups are
    returned sorted. Examples: (J=1, F=2, W=4) -> [[0, 1], [2, 3]]; (J=2, F=2, W=4) ->
    [[0, 2], [1, 3]]. Pure function (not collective).

    Raises ValueError when a number is not a whole number >= 1, or when ``world_size`` is not
    divisible by ``replication_jump * replication_factor``; the message names all three numbers.
    """
    jump, factor, world = check_params(replication_jump, replication_factor, world_size)
    assert world is not None
    if world % (jump * factor) != 0:
        raise ValueError(
            f"clique replication needs the world size ({world}) to be divisible by "
            f"replication_jump x replication_factor ({jump} x {factor} = {jump * factor})")
    groups: list[list[int]] = []
    for modulus in range(jump):
        ranks = list(range(modulus, world, jump))
        groups.extend(ranks[i:i + factor] for i in range(0, len(ranks), factor))
    return sorted(groups)
