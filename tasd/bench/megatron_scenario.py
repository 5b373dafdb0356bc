"""``tasd bench``'s ``megatron`` scenario, parent side: its config, the runs at each point and the
figures, tables and notes they make (rank side: :mod:`tasd.bench.megatron`).

At each (world, tp) point: one ``run_ranks`` call times the in-process methods interleaved
(saves, stalls, the copy limit, the peers), describes what each algorithm keeps and writes, and
counts the exchange's operations at two model sizes; then each resume is timed in fresh rank
processes, the resumes of each repeat in a rotated order, the files evicted from the page cache
before each, the first (warm-up) run of each probed for memory and checked against the save.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from dataclasses import dataclass

from tasd.bench.harness import RUN, Context, ExtraTable, ScenarioResult, fresh_resumes
from tasd.bench.measure import Figure, add_ratios, figure
from tasd.bench.megatron import (ALGOS, MCORE_ASYNC_CUDA, RESUMES, SAVED_BY, SAVES, GPTPoint, methods_rank,
                                 resume_rank)
from tasd.launch import run_ranks

logger = logging.getLogger(__name__)

SCENARIO = "megatron"
MiB = 1 << 20
#: run_ranks options: the benchmark's limits, and megatron-core imported once by the fork server
#: when this scenario is the first to start it (each rank imports it before any clock anyway).
RANKS = {**RUN, "preload": ("tasd._megatron_imports",)}


@dataclass
class MegatronConfig:
    """tasd's local checkpoints of megatron-core's GPTModel with its distributed optimizer, as
    Megatron-LM saves and resumes them, at each (world, tp) of ``points`` (data parallel world //
    tp): a GPT of ``layers`` layers, width ``hidden``, ``heads`` heads; clique replication
    ``factor`` (1: none); ``repeats`` timed rounds of the in-process methods after a warm-up,
    ``load_repeats`` timed resumes of each kind after a warm-up one; the exchange's operations
    counted at ``count_layers`` layers of width ``count_hidden``; ``methods`` (of
    :data:`tasd.bench.megatron.SAVES`) and ``resumes`` (of :data:`~tasd.bench.megatron.RESUMES`;
    each needs its save among ``methods``)."""

    points: tuple[tuple[int, int], ...] = ((2, 1), (4, 2))
    layers: int = 8
    hidden: int = 256
    heads: int = 8
    factor: int = 2
    assume_constant_structure: bool = False
    repeats: int = 5
    load_repeats: int = 3
    count_layers: tuple[int, ...] = (2, 8)
    count_hidden: int = 64
    methods: tuple[str, ...] = tuple(SAVES)
    resumes: tuple[str, ...] = tuple(RESUMES)

    @classmethod
    def quick(cls) -> "MegatronConfig":
        return cls(points=((2, 1),), layers=2, hidden=128, repeats=2, load_repeats=1,
                   resumes=("tasd_fp_resume", "tasd_atomic_resume", "torch_resume"))

    def point(self, world: int, tp: int) -> GPTPoint:
        return GPTPoint(world, tp, self.layers, self.hidden, self.heads, self.factor,
                        assume_constant_structure=self.assume_constant_structure)


def unavailable(ctx: Context) -> str | None:
    """Why the scenario cannot run here, or None."""
    if ctx.cuda:
        return ("not run on a machine with CUDA: the scenario runs megatron-core on CPU and gloo "
                "(tasd.adapters.megatron_cpu refuses CUDA)")
    try:
        found = importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:
        found = False
    return None if found else "megatron-core not installed (pip install 'tasd-checkpoint[megatron]')"


def _info(name: str):
    return SAVES.get(name) or RESUMES[name]


def _params(point: GPTPoint, per_rank: list[dict], phase: str) -> dict:
    states = [r["state"]["atomic"] for r in per_rank] if per_rank else []
    return {"world": point.world, "tp": point.tp, "dp": point.dp, "factor": point.factor, "layers": point.layers,
            "hidden": point.hidden, "nbytes": max((s["tensor_bytes"] for s in states), default=0),
            "n_tensors": max((s["tensors"] for s in states), default=0), "phase": phase}


def _error_figures(point: GPTPoint, names: list[str], why: str, phase: str) -> list[Figure]:
    return [Figure(SCENARIO, n, _info(n).label, _info(n).kind, _params(point, [], phase), error=why) for n in names]


def _saves(cfg: MegatronConfig, ctx: Context, point: GPTPoint, root: str) -> tuple[list[Figure], list[dict]]:
    runnable = [n for n in cfg.methods if "cuda" not in SAVES[n].needs]
    sizes = [(layers, cfg.count_hidden) for layers in cfg.count_layers]
    ctx.step(f"{SCENARIO}: W{point.world} TP{point.tp}, GPT {point.layers} layers x {point.hidden}: saves")
    per_rank = run_ranks(methods_rank, point.world, point, root, runnable, cfg.repeats, sizes, **RANKS)
    params = _params(point, per_rank, "save")
    figures = []
    for n in cfg.methods:
        info = SAVES[n]
        if n not in runnable:
            figures.append(Figure(SCENARIO, n, info.label, info.kind, dict(params), nbytes=params["nbytes"],
                                  error=MCORE_ASYNC_CUDA))
            continue
        f = figure(SCENARIO, n, info.label, info.kind, params, params["nbytes"], [r["times"][n] for r in per_rank])
        if n.startswith("tasd_") and n.endswith("_sync"):
            short = n.split("_")[1]
            f.values = {"part_bytes": max(r["part_bytes"].get(short) or 0 for r in per_rank),
                        "tensor_bytes": max(r["state"][short]["tensor_bytes"] for r in per_rank),
                        "replicated_bytes": max(r["state"][short]["replicated_bytes"] for r in per_rank)}
        figures.append(f)
    return figures, per_rank


def _resumes(cfg: MegatronConfig, ctx: Context, point: GPTPoint, root: str, params: dict,
             saved: list[str]) -> list[Figure]:
    return fresh_resumes(ctx, SCENARIO, list(cfg.resumes), saved, RESUMES, SAVED_BY, cfg.load_repeats, root, params,
                         lambda name, first: run_ranks(resume_rank, point.world, point, root, name, first, **RANKS),
                         where=f" W{point.world} TP{point.tp}")


def _bytes_rows(point: GPTPoint, per_rank: list[dict]) -> list[list]:
    rows = []
    for rank, r in enumerate(per_rank):
        for short, algo in ALGOS.items():
            s = r["state"][short]
            part = r["part_bytes"].get(short)
            rows.append([f"W{point.world} TP{point.tp} DP{point.dp}", rank, algo, s["tensors"],
                         s["tensor_bytes"] / MiB, s["replicated_bytes"] / MiB, None if part is None else part / MiB,
                         point.dp])
    return rows


def _count_rows(point: GPTPoint, per_rank: list[dict]) -> list[list]:
    rows = []
    for i, c in enumerate(per_rank[0]["counts"]):
        at = [r["counts"][i] for r in per_rank]
        pairs = [ops for a in at for ops in a["ops_by_peer"].values()]
        rows.append([f"W{point.world} TP{point.tp} DP{point.dp}", c["layers"], c["hidden"],
                     max(a["sharded_tensors"] for a in at), max(a["fetched"] for a in at),
                     max(len(a["ops_by_peer"]) for a in at), min(pairs, default=0), max(pairs, default=0),
                     max(sum(a["ops_by_peer"].values()) for a in at)])
    return rows


BYTES_COLUMNS = ["point", "rank", "algo", "tensors kept", "tensor MiB", "DP-replicated MiB", "own part file MiB",
                 "DP"]
COUNT_COLUMNS = ["point", "layers", "hidden", "ShardedTensors per rank", "shards fetched per rank", "peers per rank",
                 "ops per pair (min)", "ops per pair (max)", "ops per rank"]


def _notes(cfg: MegatronConfig, bytes_rows: list[list], count_rows: list[list]) -> list[str]:
    notes = [f"{n}: {_info(n).label}." for n in (*cfg.methods, *cfg.resumes)]
    notes += [
        "Model: megatron-core's GPTModel (local layer spec, float32) with its DDP and distributed Adam "
        "(Megatron-LM's 'dp_reshardable' sharding), trained one step, on CPU and gloo through "
        "tasd.adapters.megatron_cpu; the point's MiB and tensor count are of everything a rank holds "
        "(its atomic part); GB/s are over those bytes for every row.",
        "tasd saves run Megatron-LM's local save step (tasd.adapters.megatron.save_local_checkpoint with "
        f"--non-persistent-ckpt-type local{' --replication' if cfg.factor > 1 else ''}"
        f"{' --ckpt-assume-constant-structure' if cfg.assume_constant_structure else ''}); async ones are "
        "scheduled on megatron-core's persistent AsyncCallsQueue (its worker patched for CPU), and the stall "
        "ends when the schedule returns. The sharded state dict is built before the clock.",
        "Resumes run in fresh processes after the files were evicted from the page cache: tasd's as Megatron-LM's "
        "load_checkpoint (new manager; load_local_checkpoint with no sharded state dict, then with the model's: "
        "find_latest + load + to_state_dict; the second load is served from the first), then "
        "model.load_state_dict and optimizer.load_state_dict (under torch.no_grad: on CPU in float32 the "
        "optimizer's main parameters are the model's leaf parameters); each first run checked against the save.",
        "torch_save/torch_resume: the rank's regular state dict (every tensor it holds, as to_state_dict "
        "returns it) with torch.save + fsync and torch.load, on the same disk: what a plain copy costs.",
        "megatron-core's dist_checkpointing runs here on CPU under the same patch (its save with the fully "
        f"parallel wrapper over the DP group, Megatron-LM's default); its async save {MCORE_ASYNC_CUDA}.",
    ]
    for point, dp in dict.fromkeys((row[0], row[-1]) for row in bytes_rows):
        fp = [row[5] for row in bytes_rows if row[0] == point and row[2] == "fully_parallel"]
        at = [row[5] for row in bytes_rows if row[0] == point and row[2] == "atomic"]
        if fp and at and sum(at):
            notes.append(f"{point}: fully_parallel kept and wrote {sum(fp) / sum(at):.3f}x the DP-replicated bytes "
                         f"atomic did summed over ranks, {max(fp) / max(at):.3f}x on the rank writing the most "
                         f"(1/DP = {1 / dp:.3f}); the rest of a part (the optimizer's state, sharded over DP) is the "
                         "same with both.")
    for row in count_rows:
        notes.append(f"{row[0]}, GPT {row[1]} layers x {row[2]}: a fully parallel to_state_dict posted {row[6]}-"
                     f"{row[7]} send/recv operations per pair of ranks for {row[4]:,} fetched shards of "
                     f"{row[3]:,} ShardedTensors per rank (tasd moves one packed part per pair: sizes, ready "
                     "flag, prefix, data pieces).")
    return notes


def megatron(cfg: MegatronConfig, ctx: Context) -> ScenarioResult:
    """Run the scenario (see the module docstring); every figure says why when it cannot run here."""
    why = unavailable(ctx)
    figures: list[Figure] = []
    bytes_rows: list[list] = []
    count_rows: list[list] = []
    for world, tp in cfg.points:
        if world % tp:
            raise ValueError(f"{SCENARIO}: tp {tp} does not divide world {world}")
        point = cfg.point(world, tp)
        if why:
            figures += _error_figures(point, [*cfg.methods], why, "save")
            figures += _error_figures(point, [*cfg.resumes], why, "resume")
            continue
        root = ctx.scratch(SCENARIO)
        try:
            saves, per_rank = _saves(cfg, ctx, point, str(root))
            figures += saves
            saved = [f.method for f in saves if f.error is None]
            figures += _resumes(cfg, ctx, point, str(root), _params(point, per_rank, "resume"), saved)
            bytes_rows += _bytes_rows(point, per_rank)
            count_rows += _count_rows(point, per_rank)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    add_ratios(figures)
    tables = [ExtraTable(f"{SCENARIO}: what each rank keeps and writes per save", BYTES_COLUMNS, bytes_rows),
              ExtraTable(f"{SCENARIO}: point-to-point operations of a fully parallel to_state_dict", COUNT_COLUMNS,
                         count_rows)] if bytes_rows else []
    notes = _notes(cfg, bytes_rows, count_rows) if not why else [why]
    return ScenarioResult(figures, "world" if len(cfg.points) > 1 else None, notes, tables)

