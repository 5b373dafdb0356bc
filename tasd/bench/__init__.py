"""``tasd bench``: tasd against the machine's limits and its peers, measured in one run.

Scenarios (:data:`tasd.bench.scenarios.SCENARIOS`) each have a config dataclass and a function;
:func:`run_bench` composes them, prints tables with progress, and writes JSON, PNG plots and
Markdown. Measurement method: :mod:`tasd.bench.measure`; what is timed: :mod:`tasd.bench.methods`
(in-process) and :mod:`tasd.bench.fresh` (loads in fresh processes). nvidia-resiliency-ext rows
need that package (optional, never a dependency) and run through :mod:`tasd.bench.nvrx_shim` on CPU.
"""

from tasd.bench.runner import run_bench, unknown_scenarios
from tasd.bench.scenarios import SCENARIOS

__all__ = ["SCENARIOS", "run_bench", "unknown_scenarios"]
