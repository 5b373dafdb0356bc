"""The one place that names part files: ``iter_{iteration:07d}_{owner}_local.tasd``, optionally
followed by ``.pending`` (stored, not yet published) and ``.dirty`` (being written). Only files
named exactly like a published part count for find_latest, load and ``tasd inspect``."""

from __future__ import annotations

import re
from typing import NamedTuple

PENDING_SUFFIX = ".pending"
DIRTY_SUFFIX = ".dirty"

_PART_RE = re.compile(r"^iter_(\d{7,19})_(\d{1,9})_local\.tasd((?:\.pending)?(?:\.dirty)?)$")


class PartName(NamedTuple):
    iteration: int
    owner: int
    published: bool  # no .pending / .dirty suffix


def part_name(iteration: int, owner: int, pending: bool = False) -> str:
    return f"iter_{iteration:07d}_{owner}_local.tasd" + (PENDING_SUFFIX if pending else "")


def parse_part_name(name: str) -> PartName | None:
    """The iteration and owner a file name stands for (None when it is not a part's name)."""
    m = _PART_RE.match(name)
    if m is None:
        return None
    return PartName(int(m.group(1)), int(m.group(2)), not m.group(3))
