"""Many small device tensors to host memory in a few transfers (used by :func:`tasd.staging.stage`).

A device-to-host copy costs several microseconds to launch whatever its size, so staging a state of
10,000 small tensors one copy each spends most of the training's stall launching copies (measured on
an H200: 256 MiB in 10,032 tensors took 75 ms as per-tensor copies, against 10 ms in 32). Here,
consecutive small tensors of the current CUDA device (in layout order) are gathered by one
multi-tensor kernel (``torch._foreach_copy_`` within the device) into a device *bounce buffer*, at
the same offsets relative to each other as in the host layout, and the buffer then goes to the host
in one copy per run. Runs span at most :data:`BOUNCE_BYTES`; large tensors (from
:data:`SMALL_BYTES`) and tensors of other devices are copied directly.

Everything is queued on the current stream, in order: a bounce buffer is reused only after its
previous copy to the host (the stream orders it; an event orders it across streams). The padding
between tensors comes from the buffer's zeros. The plan of a layout (its runs, the buffer and the
views into it) is kept for the layouts staged most recently (:data:`PLANS_KEPT`), so a model saved
every few minutes creates no tensor objects after its first save; the device memory this holds is at
most BOUNCE_BYTES per kept plan, on the device it was made for.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tasd import device

#: Tensors smaller than this are gathered on the device; larger ones are copied directly.
SMALL_BYTES = 1 << 20
#: The most bytes of the host layout one run (and so one bounce buffer) spans.
BOUNCE_BYTES = 16 << 20
#: Plans of this many layouts are kept (with their bounce buffers).
PLANS_KEPT = 2


@dataclass(frozen=True)
class Run:
    """Tensors ``first``..``last`` (inclusive, consecutive in the layout, all small and on one device),
    spanning host bytes ``start``..``end`` of the staging buffer."""

    first: int
    last: int
    start: int
    end: int


def plan_runs(layout: Sequence[Any], small: Sequence[bool], max_span: int = BOUNCE_BYTES) -> list[Run]:
    """Cut the tensors of ``layout`` (entries with ``offset`` and ``nbytes``) marked ``small`` into
    runs of consecutive small tensors, each spanning at most ``max_span`` bytes of the layout (a
    run of one tensor may span more). Runs of a single tensor are left out (a direct copy is as
    cheap). Pure; not collective."""
    runs: list[Run] = []
    first = -1

    def close(last: int) -> None:
        if first >= 0 and last > first:
            runs.append(Run(first, last, layout[first].offset, layout[last].offset + layout[last].nbytes))

    for i, lay in enumerate(layout):
        if not small[i]:
            close(i - 1)
            first = -1
            continue
        if first >= 0 and lay.offset + lay.nbytes - layout[first].offset > max_span:
            close(i - 1)
            first = -1
        if first < 0:
            first = i
    close(len(layout) - 1)
    return runs


@dataclass
class _Plan:
    """How one layout's tensors on ``dev`` go to the host: ``runs`` through ``bounce`` (device views
    of each run's tensors in ``views``), the other indices ``direct``."""

    dev: torch.device
    devices: tuple
    runs: list[Run]
    direct: list[int]
    bounce: torch.Tensor | None
    views: list[list[torch.Tensor]]
    last_use: Any = None  # event recorded after the last copy out of ``bounce``
    lock: threading.Lock = field(default_factory=threading.Lock)


_plans: OrderedDict[int, tuple[Any, _Plan]] = OrderedDict()
_plans_lock = threading.Lock()


def _make_plan(layout: Any, devices: tuple, dev: torch.device) -> _Plan:
    small = [d == dev and 0 < lay.nbytes < SMALL_BYTES for d, lay in zip(devices, layout)]
    runs = plan_runs(layout, small)
    in_runs = set()
    for r in runs:
        in_runs.update(range(r.first, r.last + 1))
    direct = [i for i in range(len(layout)) if i not in in_runs]
    span = max((r.end - r.start for r in runs), default=0)
    bounce = torch.zeros(span, dtype=torch.uint8, device=dev) if runs else None
    views = [[bounce[layout[i].offset - r.start: layout[i].offset - r.start + layout[i].nbytes]
              .view(layout[i].dtype).view(layout[i].shape) for i in range(r.first, r.last + 1)] for r in runs]
    return _Plan(dev, devices, runs, direct, bounce, views)


def _plan(layout: Any, devices: tuple, dev: torch.device) -> _Plan:
    key = id(layout)
    with _plans_lock:
        hit = _plans.get(key)
        if hit is not None and hit[0] is layout and hit[1].dev == dev and hit[1].devices == devices:
            _plans.move_to_end(key)
            return hit[1]
    plan = _make_plan(layout, devices, dev)
    with _plans_lock:
        _plans[key] = (layout, plan)  # holds the layout: its id stays unique while kept
        _plans.move_to_end(key)
        while len(_plans) > PLANS_KEPT:
            _plans.popitem(last=False)
    return plan


def copy_to_host(tensors: Sequence[torch.Tensor], devices: Sequence[torch.device], layout: Any,
                 buffer: torch.Tensor, host_views: Sequence[torch.Tensor], dev: torch.device | None = None) -> None:
    """Queue on the current stream the copies of ``tensors`` (on ``devices``) into ``buffer``, a
    1-D uint8 host tensor laid out by ``layout`` (``host_views``: one view of ``buffer`` per
    entry): small tensors of ``dev`` (default: the current CUDA device) through bounce buffers,
    the others directly (non-blocking). The caller waits for the stream (or an event recorded
    after this) before reading ``buffer``. Not collective; thread-safe."""
    if dev is None:
        dev = device.default_device()
    plan = _plan(layout, tuple(devices), dev)
    with plan.lock:
        if plan.runs:
            if plan.last_use is not None:  # the previous copies out of the buffer, on whatever stream
                torch.cuda.current_stream(dev).wait_event(plan.last_use)
            for run, views in zip(plan.runs, plan.views):
                torch._foreach_copy_(views, list(tensors[run.first:run.last + 1]))
                buffer[run.start:run.end].copy_(plan.bounce[:run.end - run.start], non_blocking=True)
            plan.last_use = device.record_event() if dev.type == "cuda" else None
        if plan.direct:
            torch._foreach_copy_([host_views[i] for i in plan.direct], [tensors[i] for i in plan.direct],
                                 non_blocking=True)
