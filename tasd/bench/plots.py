"""PNG plots of ``tasd bench`` results (matplotlib, from the ``bench`` extra).

A sweep gets time and bandwidth against its parameter (state size, tensor count, world size or
factor), one line per method: the median with the range over repeats as error bars. A single
point gets a bar chart of each method's median time with its range.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasd.bench.measure import Figure

logger = logging.getLogger(__name__)

_XLABEL = {"nbytes": "state size per rank (MiB)", "n_tensors": "tensors per rank", "world": "world size (ranks)",
           "factor": "replication factor (clique)"}
_COLOR = {"tasd": "tab:blue", "limit": "tab:gray", "peer": "tab:orange"}


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("tasd bench --plots needs matplotlib: pip install 'tasd-checkpoint[bench]'") from e
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _x(f: Figure, x: str) -> float:
    return f.params[x] / (1 << 20) if x == "nbytes" else f.params[x]


def _sweep(ax_time, ax_bw, figures: list[Figure], x: str) -> None:
    for method in dict.fromkeys(f.method for f in figures):
        pts = sorted((f for f in figures if f.method == method and f.median_s is not None), key=lambda f: _x(f, x))
        if not pts:
            continue
        xs = [_x(f, x) for f in pts]
        med = [f.median_s for f in pts]
        err = [[m - f.min_s for m, f in zip(med, pts)], [f.max_s - m for m, f in zip(med, pts)]]
        style = {"marker": "o", "capsize": 3, "label": method,
                 "linestyle": "-" if pts[0].kind == "tasd" else "--"}
        ax_time.errorbar(xs, med, yerr=err, **style)
        ax_bw.plot(xs, [f.gb_s for f in pts], marker="o", linestyle=style["linestyle"], label=method)
    for ax in (ax_time, ax_bw):
        ax.set_xlabel(_XLABEL[x])
        if x in ("nbytes", "n_tensors"):
            ax.set_xscale("log")
        else:  # world size and factor are small integers
            ax.set_xticks(sorted({_x(f, x) for f in figures}))
        ax.grid(True, alpha=0.3)
    ax_time.set_ylabel("seconds (median, range over repeats)")
    ax_bw.set_ylabel("GB/s of state bytes per rank")
    ax_time.legend(fontsize="small")


def _bars(ax_time, ax_bw, figures: list[Figure]) -> None:
    pts = [f for f in figures if f.median_s is not None]
    names = [f.method for f in pts]
    med = [f.median_s for f in pts]
    err = [[m - f.min_s for m, f in zip(med, pts)], [f.max_s - m for m, f in zip(med, pts)]]
    colors = [_COLOR.get(f.kind, "tab:green") for f in pts]
    ax_time.barh(names, med, xerr=err, color=colors, capsize=3)
    ax_time.set_xlabel("seconds (median, range over repeats; slowest rank)")
    ax_bw.barh(names, [f.gb_s or 0 for f in pts], color=colors)
    ax_bw.set_xlabel("GB/s of state bytes per rank")
    for ax in (ax_time, ax_bw):
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    from matplotlib.patches import Patch
    kinds = dict.fromkeys(f.kind for f in pts)
    ax_bw.legend(handles=[Patch(color=_COLOR.get(k, "tab:green"), label=k) for k in kinds], fontsize="small")


def plot_scenario(name: str, figures: list[Figure], x: str | None, directory: Path, title: str) -> Path | None:
    """Draw ``figures`` of scenario ``name`` to ``directory/<name>.png``; returns the path, or None
    when no figure has times. Local."""
    if not any(f.median_s is not None for f in figures):
        return None
    plt = _pyplot()
    fig, (ax_time, ax_bw) = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
    if x is None:
        _bars(ax_time, ax_bw, figures)
    else:
        _sweep(ax_time, ax_bw, figures, x)
    fig.suptitle(title, fontsize="medium")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path
