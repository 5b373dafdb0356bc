"""The issue's performance targets, each a ratio of two figures measured in the same run (medians
of times, or bytes a save wrote).

A target is judged only when both figures were measured (otherwise "n/a" with the reason); it is a
report, never an assertion: these machines are noisy, so the ratio is what a reader compares.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasd.bench.measure import Figure


@dataclass(frozen=True)
class Target:
    """``tasd`` (a method of ``scenario`` at ``n_tensors``) over ``other`` (the same scenario at
    ``other_n_tensors``, default the same count) must be at most ``bound``. ``n_tensors`` None:
    any count. ``where``: (param, value) pairs both figures must also have. ``value``: what is
    compared, the median time ("median_s") or a key of the figures' ``values``."""

    text: str
    scenario: str
    tasd: str
    other: str
    bound: float
    n_tensors: int | None = 32
    other_n_tensors: int | None = None
    where: tuple[tuple[str, object], ...] = ()
    value: str = "median_s"


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
    Target("Megatron GPT, DP 2: fully_parallel writes <= 0.55x the DP-replicated bytes atomic writes (1/DP, "
           "+10% for balance; the rank writing the most)", "megatron", "tasd_fp_sync", "tasd_atomic_sync", 0.55,
           n_tensors=None, where=(("dp", 2),), value="replicated_bytes"),
    Target("FSDP: async save stall <= 0.5x DCP async_save", "fsdp", "tasd_async", "dcp_async", 0.5, n_tensors=None),
    Target("FSDP: resume faster than DCP load (<= 1.0x)", "fsdp", "tasd_resume", "dcp_resume", 1.0, n_tensors=None),
)


def _find(figures: list[Figure], method: str, n_tensors: int | None, where: tuple) -> Figure | None:
    return next((f for f in figures if f.method == method
                 and (n_tensors is None or f.params.get("n_tensors") == n_tensors)
                 and all(f.params.get(k) == v for k, v in where)), None)


def _value(f: Figure | None, name: str) -> float | None:
    if f is None:
        return None
    return f.median_s if name == "median_s" else f.values.get(name)


def judge(results: dict[str, list[Figure]]) -> list[dict]:
    """Every target whose scenario ran: {"target", "scenario", "ratio", "bound", "met", "why"}; ``met``
    is None (and ``why`` says why) when a figure is missing."""
    out = []
    for t in TARGETS:
        if t.scenario not in results:
            continue
        figures = results[t.scenario]
        a = _find(figures, t.tasd, t.n_tensors, t.where)
        b = _find(figures, t.other, t.other_n_tensors or t.n_tensors, t.where)
        row = {"target": t.text, "scenario": t.scenario, "bound": t.bound, "ratio": None, "met": None, "why": ""}
        missing = [(name, f) for name, f in ((t.tasd, a), (t.other, b)) if _value(f, t.value) is None]
        if missing:
            name, f = missing[0]
            row["why"] = f"{name}: {f.error if f is not None and f.error else 'not measured in this run'}"
        elif not _value(b, t.value):
            row["why"] = f"{t.other}: {t.value} is 0"
        else:
            row["ratio"] = _value(a, t.value) / _value(b, t.value)
            row["met"] = row["ratio"] <= t.bound
        out.append(row)
    return out
