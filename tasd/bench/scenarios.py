"""The scenarios of ``tasd bench``: each a config dataclass (full-size defaults; ``quick()`` gives the
small version) and a function ``run(config, ctx) -> ScenarioResult``. Every scenario measures tasd
together with the machine's limits and the peers on the same state dicts, in the same processes
and directory (see :mod:`tasd.bench.harness`).

The reference point is the issue's: 2 ranks, clique replication factor 2, 256 MiB per rank in
32 float32 tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tasd.bench.fsdp_scenario import FSDPConfig, fsdp
from tasd.bench.harness import Context, ScenarioResult, load_point, measure_points
from tasd.bench.measure import Figure, add_ratios
from tasd.bench.megatron_scenario import MegatronConfig, megatron
from tasd.bench.methods import Point

MiB = 1 << 20


@dataclass
class PointConfig:
    """A single point: ``world`` ranks, ``size_mib`` per rank in ``n_tensors`` tensors, clique
    ``factor``; ``repeats`` timed runs after one warm-up; ``methods`` to run (in this order)."""

    world: int = 2
    factor: int = 2
    size_mib: float = 256
    n_tensors: int = 32
    repeats: int = 5
    methods: tuple[str, ...] = ()

    def point(self, **change) -> Point:
        p = Point(self.world, int(self.size_mib * MiB), self.n_tensors, self.factor)
        return dataclasses.replace(p, **change)

    @classmethod
    def quick(cls) -> "PointConfig":
        return cls(size_mib=16, repeats=2)


def _done(figures, x: str | None = None, notes: list[str] | None = None) -> ScenarioResult:
    add_ratios(figures)
    return ScenarioResult(figures, x, notes or [])


# -- limits ---------------------------------------------------------------------------------------
@dataclass
class LimitsConfig(PointConfig):
    """The machine's limits on the reference point: copies, writes, gloo send/recv and a read into
    fresh memory in a fresh process."""

    methods: tuple[str, ...] = ("copy", "d2h_pinned", "write", "write_direct", "send_recv")
    read_repeats: int = 3

    @classmethod
    def quick(cls) -> "LimitsConfig":
        return cls(size_mib=16, repeats=2, read_repeats=1)


def limits(cfg: LimitsConfig, ctx: Context) -> ScenarioResult:
    point = cfg.point()
    figures = measure_points(ctx, "limits", [point], list(cfg.methods), cfg.repeats)
    figures += load_point(ctx, "limits", point, ["read"], cfg.read_repeats)
    return _done(figures)


# -- saves ----------------------------------------------------------------------------------------
@dataclass
class SaveStallConfig(PointConfig):
    """Back-to-back asynchronous saves: the training stall of each (time until save/schedule
    returns), each save right after the previous one completed (finalize outside the clock)."""

    methods: tuple[str, ...] = ("copy", "d2h_pinned", "tasd_async", "dcp_async", "nvrx_async", "nvrx_torch_async")


#: Why NVRx's async stalls on CPU are not what they are on a GPU.
NVRX_CPU_NOTE = ("On CPU NVRx's TorchAsyncCheckpoint takes no snapshot: preload_tensors leaves host tensors where "
                 "they are and the first call moves their storage into shared memory for its worker, which then "
                 "writes the live tensors, so its later stalls are only the pickling of handles. NVRx's "
                 "LocalCheckpointManager snapshots by forking a process per save.")


def save_stall(cfg: SaveStallConfig, ctx: Context) -> ScenarioResult:
    figures = measure_points(ctx, "save_stall", [cfg.point()], list(cfg.methods), cfg.repeats)
    return _done(figures, notes=[NVRX_CPU_NOTE] if ctx.nvrx and not ctx.cuda else [])


@dataclass
class SyncSaveConfig(PointConfig):
    """Synchronous saves against a raw write + fsync of the same bytes."""

    methods: tuple[str, ...] = ("write", "write_direct", "tasd_sync", "torch_save", "dcp_save", "nvrx_sync")


def sync_save(cfg: SyncSaveConfig, ctx: Context) -> ScenarioResult:
    return _done(measure_points(ctx, "sync_save", [cfg.point()], list(cfg.methods), cfg.repeats))


@dataclass
class ExchangeConfig(PointConfig):
    """The replica exchange of a save against gloo send/recv of the same bytes and NVRx's replicate."""

    methods: tuple[str, ...] = ("send_recv", "tasd_exchange", "nvrx_replicate")


def exchange(cfg: ExchangeConfig, ctx: Context) -> ScenarioResult:
    return _done(measure_points(ctx, "exchange", [cfg.point()], list(cfg.methods), cfg.repeats))


# -- loads ----------------------------------------------------------------------------------------
@dataclass
class RestartConfig(PointConfig):
    """A restart on the same nodes: each rank loads its own part in a fresh process, files evicted
    from the page cache first."""

    repeats: int = 3
    methods: tuple[str, ...] = ("read", "tasd_load", "torch_load", "dcp_load", "nvrx_load")

    @classmethod
    def quick(cls) -> "RestartConfig":
        return cls(size_mib=16, repeats=1)


def restart(cfg: RestartConfig, ctx: Context) -> ScenarioResult:
    return _done(load_point(ctx, "restart", cfg.point(), list(cfg.methods), cfg.repeats))


@dataclass
class RestartWarmConfig(PointConfig):
    """A restart right after the save, on the same nodes: each load in fresh processes right after
    a new save by the same method, the page cache as that save left it (what decides the write
    path: O_DIRECT writes leave nothing cached)."""

    repeats: int = 3
    methods: tuple[str, ...] = ("read", "tasd_load", "tasd_load_direct", "torch_load", "nvrx_load")

    @classmethod
    def quick(cls) -> "RestartWarmConfig":
        return cls(size_mib=16, repeats=1, methods=("tasd_load", "tasd_load_direct"))


def restart_warm(cfg: RestartWarmConfig, ctx: Context) -> ScenarioResult:
    return _done(load_point(ctx, "restart_warm", cfg.point(), list(cfg.methods), cfg.repeats, right_after_save=True))


@dataclass
class RecoveryConfig(PointConfig):
    """A restart after rank ``lost`` lost its node (its directories removed): every rank loads in a
    fresh process, the lost rank's part coming from a replica; at each of ``tensor_counts``."""

    repeats: int = 3
    lost: int = 1
    tensor_counts: tuple[int, ...] = (32, 10_032)
    methods: tuple[str, ...] = ("read_send", "tasd_load", "nvrx_load")

    @classmethod
    def quick(cls) -> "RecoveryConfig":
        return cls(size_mib=16, repeats=1, tensor_counts=(32,))


def recovery(cfg: RecoveryConfig, ctx: Context) -> ScenarioResult:
    if not 0 <= cfg.lost < cfg.world:
        raise ValueError(f"recovery: lost rank {cfg.lost} is not a rank of a world of {cfg.world}")
    figures = []
    for n in cfg.tensor_counts:
        figures += load_point(ctx, "recovery", cfg.point(n_tensors=n), list(cfg.methods), cfg.repeats, lost=cfg.lost)
    return _done(figures, "n_tensors" if len(cfg.tensor_counts) > 1 else None)


# -- sweeps ---------------------------------------------------------------------------------------
@dataclass
class TensorSweepConfig(PointConfig):
    """The same bytes in more and more tensors."""

    repeats: int = 3
    tensor_counts: tuple[int, ...] = (32, 1_032, 10_032)
    methods: tuple[str, ...] = ("copy", "tasd_async", "tasd_sync", "nvrx_async")

    @classmethod
    def quick(cls) -> "TensorSweepConfig":
        return cls(size_mib=16, repeats=2, tensor_counts=(32, 10_032), methods=("copy", "tasd_async"))


def tensor_sweep(cfg: TensorSweepConfig, ctx: Context) -> ScenarioResult:
    points = [cfg.point(n_tensors=n) for n in cfg.tensor_counts]
    return _done(measure_points(ctx, "tensor_sweep", points, list(cfg.methods), cfg.repeats), "n_tensors")


@dataclass
class WorldSweepConfig(PointConfig):
    """More ranks on this machine (processes sharing its cores, memory bus and disk)."""

    size_mib: float = 128
    repeats: int = 3
    worlds: tuple[int, ...] = (2, 4)
    methods: tuple[str, ...] = ("copy", "write", "send_recv", "tasd_async", "tasd_sync", "tasd_exchange")

    @classmethod
    def quick(cls) -> "WorldSweepConfig":
        return cls(size_mib=4, repeats=2, methods=("copy", "tasd_async", "tasd_sync"))


def world_sweep(cfg: WorldSweepConfig, ctx: Context) -> ScenarioResult:
    figures = []
    for w in cfg.worlds:  # one run per world size
        figures += measure_points(ctx, "world_sweep", [cfg.point(world=w)], list(cfg.methods), cfg.repeats)
    return _done(figures, "world")


@dataclass
class FactorSweepConfig(PointConfig):
    """More copies of each part (clique factor; 1 is no replication) at a fixed world size."""

    world: int = 4
    size_mib: float = 128
    repeats: int = 3
    factors: tuple[int, ...] = (1, 2, 4)
    methods: tuple[str, ...] = ("copy", "write", "send_recv", "tasd_async", "tasd_sync", "tasd_exchange", "nvrx_sync")

    @classmethod
    def quick(cls) -> "FactorSweepConfig":
        return cls(world=2, size_mib=4, repeats=2, factors=(1, 2), methods=("copy", "tasd_async", "tasd_sync"))


def factor_sweep(cfg: FactorSweepConfig, ctx: Context) -> ScenarioResult:
    points = [cfg.point(factor=f) for f in cfg.factors]
    return _done(measure_points(ctx, "factor_sweep", points, list(cfg.methods), cfg.repeats), "factor")


@dataclass
class SizeSweepConfig(PointConfig):
    """Larger and larger states (bytes per rank) in the same number of tensors."""

    repeats: int = 3
    sizes_mib: tuple[float, ...] = (32, 128, 512)
    methods: tuple[str, ...] = ("copy", "write_direct", "tasd_async", "tasd_sync", "dcp_async", "nvrx_async")

    @classmethod
    def quick(cls) -> "SizeSweepConfig":
        return cls(repeats=2, sizes_mib=(4, 16), methods=("copy", "tasd_async", "tasd_sync"))


def size_sweep(cfg: SizeSweepConfig, ctx: Context) -> ScenarioResult:
    points = [cfg.point(size_bytes=int(s * MiB)) for s in cfg.sizes_mib]
    return _done(measure_points(ctx, "size_sweep", points, list(cfg.methods), cfg.repeats), "nbytes")


@dataclass(frozen=True)
class Scenario:
    """A named scenario: its config class, its function and a one-line summary."""

    name: str
    config: type
    run: object
    summary: str = field(default="")


# -- scale ----------------------------------------------------------------------------------------
@dataclass
class ScaleConfig:
    """find_latest and recovery planning simulated in this process at each of ``worlds`` ranks
    (:mod:`tasd.bench.scale`): ``lost_fraction`` of the nodes lost, ``strategy`` placement."""

    worlds: tuple[int, ...] = (16_384, 100_000, 1_000_000)
    strategy: str = "ring"
    factor: int = 2
    jump: int = 8
    lost_fraction: float = 0.01
    repeats: int = 3
    legacy_up_to: int = 100_000  # also time the JSON gather it replaced, up to this many ranks

    @classmethod
    def quick(cls) -> "ScaleConfig":
        return cls(worlds=(16_384,), repeats=2)


def scale(cfg: ScaleConfig, ctx: Context) -> ScenarioResult:
    from tasd.bench import scale as sim
    figures, notes = [], []
    for world in cfg.worlds:
        ctx.step(f"scale: simulating {world:,} ranks")
        case = sim.Case(world, cfg.factor, cfg.jump, cfg.strategy, cfg.lost_fraction)
        r = sim.simulate(case, cfg.repeats, legacy=world <= cfg.legacy_up_to)
        params = {"world": world, "factor": cfg.factor, "strategy": cfg.strategy, "lost_ranks": r.lost_ranks}
        figures.append(Figure("scale", "plan_holder", "find_latest + load planning, a rank holding its part",
                              "tasd", params, times_s=[r.holder_s]))
        figures.append(Figure("scale", "plan_lost", "find_latest + load planning, a rank that lost its part",
                              "tasd", params, times_s=[r.lost_s]))
        if r.json_decode_s is not None:
            figures.append(Figure("scale", "json_gather", "decoding every rank's files as JSON (the protocol "
                                  "before the census)", "peer", params, times_s=[r.json_decode_s]))
        model = "; ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v * 1e3:,.1f} ms" for k, v in r.model.items())
        legacy = (f" (the JSON gather: {r.json_bytes_per_rank / 1e6:,.1f} MB)" if r.json_bytes_per_rank else "")
        notes.append(f"{world:,} ranks, {r.lost_ranks:,} lost: {len(r.calls)} all_reduces carrying "
                     f"{r.bytes_per_rank / 1e3:,.1f} KB per rank{legacy}; modelled latency of those: {model}")
        step = sim.latency_model([("max", 32)], world)
        groups = sim.group_cost(world, cfg.strategy, cfg.factor)
        notes.append(f"{world:,} ranks: one agreement (a save step, or the async queue's poll per training step "
                     f"while a save is pending: all_reduce of 32 bytes) {step['gloo_tree_s'] * 1e3:,.1f} ms on "
                     f"tasd's tree of {sim.tree_levels(world)} levels of <= {sim.subgroups.TREE_FANOUT}-rank gloo "
                     f"groups ({step['gloo_ring_s']:,.2f} s on one world gloo group); creating tasd's groups: at "
                     f"most {groups.groups_per_rank} groups and {groups.connections_per_rank} connections per rank, "
                     f"{groups.store_requests:,} store requests in all, {groups.seconds:,.1f} s at "
                     f"{sim.STORE_OPS_PER_S:,} requests/s, once per process (one world gloo group: "
                     f"{groups.world_connections_per_rank:,} connections per rank, {groups.world_seconds:,.0f} s)")
        if world == 100_000:
            notes.append(f"target at 100,000 ranks: one agreement {step['gloo_tree_s'] * 1e3:.1f} ms < 50 ms: "
                         f"{'met' if step['gloo_tree_s'] < 0.05 else 'missed'}")
            notes.append(f"target at 100,000 ranks: payload {r.bytes_per_rank / 1e3:.1f} KB <= 64 KB per rank: "
                         f"{'met' if r.bytes_per_rank <= 64_000 else 'missed'}; planning "
                         f"{max(r.holder_s, r.lost_s) * 1e3:.1f} ms < 100 ms (1% of the ranks lost): "
                         f"{'met' if max(r.holder_s, r.lost_s) < 0.1 else 'missed'}")
    return _done(figures, "world", notes)


#: Every scenario, in the order ``tasd bench`` runs them.
SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("limits", LimitsConfig, limits, "the machine's limits: copy, write + fsync, read, gloo send/recv"),
    Scenario("save_stall", SaveStallConfig, save_stall, "training stall of back-to-back async saves"),
    Scenario("sync_save", SyncSaveConfig, sync_save, "synchronous save"),
    Scenario("restart", RestartConfig, restart, "fresh processes load their own parts (a restart)"),
    Scenario("restart_warm", RestartWarmConfig, restart_warm,
             "fresh processes load their own parts right after the save (page cache as the save left it)"),
    Scenario("recovery", RecoveryConfig, recovery, "restart after a lost node: its part from a replica"),
    Scenario("exchange", ExchangeConfig, exchange, "replica exchange of a save"),
    Scenario("tensor_sweep", TensorSweepConfig, tensor_sweep, "save stall and save time against tensor count"),
    Scenario("world_sweep", WorldSweepConfig, world_sweep, "save figures against world size"),
    Scenario("factor_sweep", FactorSweepConfig, factor_sweep, "save figures against replication factor"),
    Scenario("size_sweep", SizeSweepConfig, size_sweep, "save figures against state size"),
    Scenario("scale", ScaleConfig, scale, "find_latest and recovery planning simulated at 16k-1M ranks"),
    Scenario("megatron", MegatronConfig, megatron,
             "Megatron GPT with its distributed optimizer: async stall, save, resume, bytes, exchange operations"),
    Scenario("fsdp", FSDPConfig, fsdp, "FSDP2 model with Adam on 2 ranks: async save stall and resume against DCP"),
)}
