"""How ``tasd bench`` measures: clocks, memory and disk probes, and the figures they make.

Rank side (inside processes started by :func:`tasd.launch.run_ranks`):

* :func:`run_methods` runs a list of :class:`Method` objects interleaved: one untimed warm-up round,
  during which each method's host memory and disk writes are probed, then ``repeats`` timed
  rounds. Every call starts right after a ``dist.barrier()`` and is timed with
  ``time.perf_counter``; what a call returns (its completion: a blocking finalize, the removal of a
  superseded file) runs after the clock stops, before the next call.
* :class:`Probe` reads this process and its children (async workers) from ``/proc``: PSS (shared
  pages split between the processes that map them, so a buffer shared with a worker counts once),
  sampled every 5 ms in a thread for the peak, and ``write_bytes`` of ``/proc/PID/io`` (bytes sent
  to storage, including those of children already reaped).

Parent side: :func:`figure` turns per-rank results into a :class:`Figure`: for each repeat the
slowest rank's time, then the median and the range over repeats; memory and disk figures are the
largest over ranks. Bandwidths are decimal (1e9 bytes/s).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

#: Interval of the memory sampler, seconds.
SAMPLE_S = 0.005


def _children(pid: int) -> list[int]:
    try:
        import psutil
    except ModuleNotFoundError:  # without the bench extra: this process only
        return []
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _proc_field(path: str, name: str) -> int | None:
    try:
        with open(path, "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key.strip() == name.encode():
                    return int(value.split()[0])
    except OSError:  # the process ended meanwhile
        return None
    return None


class Probe:
    """Host memory (PSS) and bytes written to storage by this process and its children. Local."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def pids(self) -> list[int]:
        return [self.pid, *_children(self.pid)]

    def pss_bytes(self) -> int:
        """Sum of the PSS of this process and its children, bytes (RSS where PSS is unavailable)."""
        total = 0
        for pid in self.pids():
            kib = _proc_field(f"/proc/{pid}/smaps_rollup", "Pss")
            if kib is None:
                kib = _proc_field(f"/proc/{pid}/status", "VmRSS") or 0
            total += kib * 1024
        return total

    def write_bytes(self) -> int:
        """Bytes this process and its children sent to storage so far (``/proc/PID/io``)."""
        total = 0
        for pid in self.pids():
            total += (_proc_field(f"/proc/{pid}/io", "write_bytes") or 0) - (
                _proc_field(f"/proc/{pid}/io", "cancelled_write_bytes") or 0)
        return total


class PeakSampler:
    """Samples :meth:`Probe.pss_bytes` every SAMPLE_S seconds in a thread while in a ``with`` block;
    ``peak`` is the largest sample (including one taken on entry and one on exit)."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tasd-bench-memory", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, self.probe.pss_bytes())

    def __enter__(self) -> "PeakSampler":
        self.peak = self.probe.pss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.probe.pss_bytes())


Completion = Callable[[], None]


@dataclass
class Method:
    """One thing to time on every rank. ``call()`` is timed; it may return a completion, run after
    the clock stops (finalize, cleanup). ``measure``, when given, is read after the call and
    replaces the wall time (a phase a manager measured itself, e.g. ``last_save.exchange_s``)."""

    name: str
    call: Callable[[], Completion | None]
    measure: Callable[[], float] | None = None


def _probed(method: Method, probe: Probe) -> dict[str, int]:
    """Run ``method`` once (untimed) with memory and disk probes; what it added to host memory at
    its peak and once completed, and what it wrote."""
    base, written = probe.pss_bytes(), probe.write_bytes()
    with PeakSampler(probe) as sampler:
        done = method.call()
        if done is not None:
            done()
    steady = max(0, probe.pss_bytes() - base)  # the peak is at least what is still held (sampled every 5 ms)
    return {"mem_peak_bytes": max(steady, sampler.peak - base), "mem_steady_bytes": steady,
            "disk_write_bytes": max(0, probe.write_bytes() - written)}


def rotated(items: list, i: int) -> list:
    """``items`` starting at index ``i`` (mod len) and wrapping around: repeat ``i`` of an
    interleaved measurement runs the methods in this order, so that no method always follows the
    same one (a write leaves the disk busy for whatever reads next)."""
    k = i % len(items) if items else 0
    return items[k:] + items[:k]


def run_methods(methods: list[Method], repeats: int, between: Completion | None = None) -> dict[str, dict]:
    """Warm up and time ``methods`` on this rank, interleaved (see the module docstring).
    Collective: every rank calls it with the same methods and ``repeats``. ``between`` runs
    untimed after each call's completion (e.g. ``os.sync``). Returns {name: {"times_s": [...],
    "mem_peak_bytes", "mem_steady_bytes", "disk_write_bytes"}}."""
    probe, out = Probe(), {}
    for m in methods:
        dist.barrier()
        out[m.name] = {"times_s": [], **_probed(m, probe)}
        if between:
            between()
    for i in range(repeats):
        for m in rotated(methods, i):
            dist.barrier()
            t0 = time.perf_counter()
            done = m.call()
            elapsed = time.perf_counter() - t0
            out[m.name]["times_s"].append(m.measure() if m.measure else elapsed)
            if done is not None:
                done()
            if between:
                between()
    return out


def timed_once(fn: Callable[[], Any], probe_memory: bool) -> dict[str, Any]:
    """Time ``fn()`` once on this rank right after a barrier (collective), optionally with the
    memory and disk probes. What ``fn`` returns is dropped after the clock stops."""
    probe = Probe()
    base, written = (probe.pss_bytes(), probe.write_bytes()) if probe_memory else (0, 0)
    dist.barrier()
    sampler = PeakSampler(probe) if probe_memory else None
    if sampler:
        sampler.__enter__()
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    out: dict[str, Any] = {"time_s": elapsed}
    if sampler:
        sampler.__exit__(None, None, None)
        steady = max(0, probe.pss_bytes() - base)
        out.update(mem_peak_bytes=max(steady, sampler.peak - base), mem_steady_bytes=steady,
                   disk_write_bytes=max(0, probe.write_bytes() - written))
    del result
    return out


# -- parent side ---------------------------------------------------------------------------------
@dataclass
class Figure:
    """One row of results: ``method`` measured in ``scenario`` with ``params`` (world, n_tensors,
    size_bytes per rank, factor, ...). ``kind``: "tasd", "limit" (what the machine allows) or
    "peer". ``times_s``: the slowest rank's time per repeat. ``nbytes``: the bytes per rank the
    bandwidth is computed over. ``ratios``: this figure's median over each other figure's median
    in the same group ("vs NAME"), filled by :func:`add_ratios`. ``error``: why it has no times.
    ``values``: other quantities measured with it (bytes, counts), by name (a scenario says which)."""

    scenario: str
    method: str
    label: str
    kind: str
    params: dict
    times_s: list[float] = field(default_factory=list)
    per_rank_median_s: list[float] = field(default_factory=list)
    nbytes: int = 0
    mem_peak_bytes: int | None = None
    mem_steady_bytes: int | None = None
    disk_write_bytes: int | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    values: dict[str, float] = field(default_factory=dict)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def min_s(self) -> float | None:
        return min(self.times_s) if self.times_s else None

    @property
    def max_s(self) -> float | None:
        return max(self.times_s) if self.times_s else None

    @property
    def gb_s(self) -> float | None:
        m = self.median_s
        return self.nbytes / 1e9 / m if m and self.nbytes else None

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(median_s=self.median_s, min_s=self.min_s, max_s=self.max_s, gb_s=self.gb_s)
        return d


def _largest(per_rank: list[dict], key: str) -> int | None:
    values = [r[key] for r in per_rank if r.get(key) is not None]
    return max(values) if values else None


def figure(scenario: str, method: str, label: str, kind: str, params: dict, nbytes: int,
           per_rank: list[dict]) -> Figure:
    """A Figure from each rank's ``{"times_s": [...], "mem_peak_bytes", ...}`` (from
    :func:`run_methods`, or assembled from :func:`timed_once` calls)."""
    runs = list(zip(*(r["times_s"] for r in per_rank)))
    return Figure(scenario, method, label, kind, dict(params), times_s=[max(run) for run in runs],
                  per_rank_median_s=[statistics.median(r["times_s"]) for r in per_rank], nbytes=nbytes,
                  mem_peak_bytes=_largest(per_rank, "mem_peak_bytes"),
                  mem_steady_bytes=_largest(per_rank, "mem_steady_bytes"),
                  disk_write_bytes=_largest(per_rank, "disk_write_bytes"))


def add_ratios(figures: list[Figure]) -> None:
    """For each tasd figure, its median over every limit's and peer's median with the same params."""
    for f in figures:
        if f.kind != "tasd" or f.median_s is None:
            continue
        for other in figures:
            if other is not f and other.params == f.params and other.median_s:
                f.ratios[other.method] = f.median_s / other.median_s


def evict(root: Path) -> None:
    """fsync every file under ``root`` and drop it from the page cache (POSIX_FADV_DONTNEED; best
    effort: tmpfs keeps its pages), so that the next read comes from the disk. Local."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # removed meanwhile by a cleanup thread
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
