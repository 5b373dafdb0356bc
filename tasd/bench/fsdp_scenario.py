"""``tasd bench``'s ``fsdp`` scenario, parent side: its config, the runs and the figures, table and
notes they make (rank side: :mod:`tasd.bench.fsdp`).

One ``run_ranks`` call times the in-process methods interleaved (tasd's async save stall, DCP's
``async_save`` stall, the copy limit) on one FSDP2 state dict per rank, after a warm-up round;
then each resume is timed in fresh rank processes, the resumes of each repeat in a rotated order,
the files evicted from the page cache before each, the first (warm-up) run of each probed for
memory and checked against the save (a resume that restores other data fails the scenario).
The model runs on a CPU mesh over gloo, also on a machine with CUDA.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

from tasd.bench.fsdp import PRELOAD, RESUMES, SAVED_BY, SAVES, FSDPPoint, methods_rank, resume_rank
from tasd.bench.harness import RUN, Context, ExtraTable, ScenarioResult, fresh_resumes
from tasd.bench.measure import Figure, add_ratios, figure
from tasd.launch import run_ranks

logger = logging.getLogger(__name__)

SCENARIO = "fsdp"
MiB = 1 << 20
#: run_ranks options: the benchmark's limits, and FSDP/DCP imported once by the fork server when
#: this scenario is the first to start it.
RANKS = {**RUN, "preload": PRELOAD}


@dataclass
class FSDPConfig:
    """tasd against DCP on an FSDP2 model of ``layers`` ``nn.Linear(hidden, hidden)`` sharded over
    ``world`` ranks with Adam (full size: 16 x 2048, 128 MiB of parameters and 384 MiB of state
    per rank on 2 ranks); clique replication ``factor`` (1: none); ``repeats`` timed rounds of the
    in-process ``methods`` (of :data:`tasd.bench.fsdp.SAVES`) after a warm-up, ``load_repeats``
    timed runs of each of ``resumes`` (of :data:`~tasd.bench.fsdp.RESUMES`; each needs its save
    among ``methods``) after a warm-up one."""

    world: int = 2
    layers: int = 16
    hidden: int = 2048
    factor: int = 2
    repeats: int = 5
    load_repeats: int = 3
    methods: tuple[str, ...] = tuple(SAVES)
    resumes: tuple[str, ...] = tuple(RESUMES)

    @classmethod
    def quick(cls) -> "FSDPConfig":
        """4 x 512: 2 MiB of parameters and 6 MiB of state per rank on 2 ranks."""
        return cls(layers=4, hidden=512, repeats=2, load_repeats=1)

    def point(self) -> FSDPPoint:
        return FSDPPoint(self.world, self.layers, self.hidden, self.factor)


def _info(name: str):
    return SAVES.get(name) or RESUMES[name]


def _params(point: FSDPPoint, per_rank: list[dict], phase: str) -> dict:
    """A figure's params: the point, the largest rank's tensor bytes and count, and the phase (so that
    ratios compare a stall with stalls, a resume with resumes)."""
    states = [r["state"] for r in per_rank]
    return {"world": point.world, "factor": point.factor, "layers": point.layers, "hidden": point.hidden,
            "nbytes": max((s["tensor_bytes"] for s in states), default=0),
            "n_tensors": max((s["tensors"] for s in states), default=0), "phase": phase}


def _saves(cfg: FSDPConfig, ctx: Context, point: FSDPPoint, root: str) -> tuple[list[Figure], list[dict]]:
    ctx.step(f"{SCENARIO}: W{point.world} FSDP2 {point.layers} x Linear({point.hidden}): saves")
    per_rank = run_ranks(methods_rank, point.world, point, root, list(cfg.methods), cfg.repeats, **RANKS)
    params = _params(point, per_rank, "save")
    figures = [figure(SCENARIO, n, SAVES[n].label, SAVES[n].kind, params, params["nbytes"],
                      [r["times"][n] for r in per_rank]) for n in cfg.methods]
    return figures, per_rank


def _resumes(cfg: FSDPConfig, ctx: Context, point: FSDPPoint, root: str, params: dict) -> list[Figure]:
    return fresh_resumes(ctx, SCENARIO, list(cfg.resumes), list(cfg.methods), RESUMES, SAVED_BY, cfg.load_repeats,
                         root, params, lambda name, first: run_ranks(resume_rank, point.world, point, root, name,
                                                                      first, **RANKS))


COLUMNS = ["rank", "tensors", "DTensor shards", "model MiB", "optimizer MiB", "tasd own part file MiB",
           "DCP files MiB"]


def _rows(per_rank: list[dict]) -> list[list]:
    def mib(n: int | None) -> float | None:
        return None if n is None else n / MiB
    return [[rank, r["state"]["tensors"], r["state"]["dtensors"], mib(r["state"]["model_bytes"]),
             mib(r["state"]["optim_bytes"]), mib(r["tasd_part_bytes"]), mib(r["dcp_bytes"])]
            for rank, r in enumerate(per_rank)]


def _notes(cfg: FSDPConfig) -> list[str]:
    notes = [f"{n}: {_info(n).label}." for n in (*cfg.methods, *cfg.resumes)]
    notes += [
        f"Model: {cfg.layers} x nn.Linear({cfg.hidden}, {cfg.hidden}) (float32, ReLU between), every Linear and the "
        f"root fully_shard'ed (FSDP2) on init_device_mesh('cpu', ({cfg.world},)) over gloo, Adam, trained one step; "
        "the point's MiB and tensor count are of every local shard and plain tensor of get_state_dict(model, optim) "
        "on the rank holding the most; GB/s are over those bytes for every row.",
        "Saves: the state dict is taken once, before any clock, and both methods save that same object (its cost, "
        "the same for both, is not in the stall). tasd: clique replication factor "
        f"{cfg.factor}, its persistent queue started before any clock. DCP: default stager and thread executor, "
        "its background collectives on a gloo group of its own. Each save's completion (blocking finalize, or the "
        "future's result) and the removal of the superseded checkpoint run after the clock.",
        "Resumes run in fresh processes after the files were evicted from the page cache. The new model and "
        "optimizer are built (another initialization) and the optimizer's state made (get_state_dict's "
        "zero-gradient step, which in a fresh process also imports torch._dynamo and fills DTensor's caches, "
        "0.1-0.5 s here: the job's first step pays it otherwise) before the clock; it stops when the state is set "
        "in both. Each first run is checked against the save (every tensor's bytes, dtype and shape), after "
        "checking that the new state differed from it at every tensor but the step counts.",
    ]
    return notes


def fsdp(cfg: FSDPConfig, ctx: Context) -> ScenarioResult:
    """Run the scenario (see the module docstring)."""
    if cfg.world < 2:
        raise ValueError(f"{SCENARIO}: needs at least 2 ranks, got {cfg.world}")
    unknown = [n for n in (*cfg.methods, *cfg.resumes) if n not in SAVES and n not in RESUMES]
    if unknown:
        raise ValueError(f"{SCENARIO}: unknown method(s) {', '.join(unknown)}; known: "
                         f"{', '.join([*SAVES, *RESUMES])}")
    point = cfg.point()
    root = ctx.scratch(SCENARIO)
    try:
        figures, per_rank = _saves(cfg, ctx, point, str(root))
        figures += _resumes(cfg, ctx, point, str(root), _params(point, per_rank, "resume"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    add_ratios(figures)
    table = ExtraTable(f"{SCENARIO}: what each rank holds and writes per save", COLUMNS, _rows(per_rank))
    return ScenarioResult(figures, None, _notes(cfg), [table])
