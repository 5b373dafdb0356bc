"""The issue's performance targets, each a ratio of two medians measured in the same run.

A target is judged only when both figures were measured (otherwise "n/a" with the reason); it is a
report, never an assertion: these machines are noisy, so the ratio is what a reader compares.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasd.bench.measure import Figure


@dataclass(frozen=True)
class Target:
    """``tasd`` (a method of ``scenario`` at ``n_tensors``) over ``other`` (the same scenario at
    ``other_n_tensors``, default the same count) must be at most ``bound``."""

    text: str
    scenario: str
    tasd: str
    other: str
    bound: float
    n_tensors: int = 32
    other_n_tensors: int | None = None


TARGETS = (
    Target("restart <= NVRx's restart", "restart", "tasd_load", "nvrx_load", 1.0),
    Target("restart <= 1.2x a raw read of the own part into fresh memory", "restart", "tasd_load", "read", 1.2),
    Target("restart right after a save <= NVRx's", "restart_warm", "tasd_load", "nvrx_load", 1.0),
    Target("recovery of a lost rank <= NVRx's, 32 tensors", "recovery", "tasd_load", "nvrx_load", 1.0),
    Target("recovery of a lost rank far below NVRx's (<= 0.5x), 10,032 tensors", "recovery", "tasd_load",
           "nvrx_load", 0.5, n_tensors=10_032),
    Target("back-to-back async save stall <= 1.2x a plain copy into preallocated memory", "save_stall",
           "tasd_async", "copy", 1.2),
    Target("async save stall (CUDA) <= 1.2x a pinned device-to-host copy of the same bytes", "save_stall",
           "tasd_async", "d2h_pinned", 1.2),
    Target("stall at 10,032 tensors <= 2x the stall at 32 tensors of the same bytes", "tensor_sweep",
           "tasd_async", "tasd_async", 2.0, n_tensors=10_032, other_n_tensors=32),
)


def _find(figures: list[Figure], method: str, n_tensors: int) -> Figure | None:
    return next((f for f in figures if f.method == method and f.params.get("n_tensors") == n_tensors), None)


def judge(results: dict[str, list[Figure]]) -> list[dict]:
    """Every target whose scenario ran: {"target", "scenario", "ratio", "bound", "met", "why"}; ``met``
    is None (and ``why`` says why) when a figure is missing."""
    out = []
    for t in TARGETS:
        if t.scenario not in results:
            continue
        figures = results[t.scenario]
        a = _find(figures, t.tasd, t.n_tensors)
        b = _find(figures, t.other, t.other_n_tensors or t.n_tensors)
        row = {"target": t.text, "scenario": t.scenario, "bound": t.bound, "ratio": None, "met": None, "why": ""}
        missing = [(name, f) for name, f in ((t.tasd, a), (t.other, b)) if f is None or f.median_s is None]
        if missing:
            name, f = missing[0]
            row["why"] = f"{name}: {f.error if f is not None and f.error else 'not measured in this run'}"
        else:
            row["ratio"] = a.median_s / b.median_s
            row["met"] = row["ratio"] <= t.bound
        out.append(row)
    return out
