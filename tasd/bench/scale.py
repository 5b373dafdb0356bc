"""Simulating find_latest and recovery planning at 16k to 1M ranks in one process.

The protocol of :mod:`tasd.managers.recovery` reaches every decision from reduced values. Here the
reductions come from a model of the whole world instead of collectives: every rank holds its own
part and its peers' (ring or clique placement, vectorized with numpy) of one save, and the ranks
of some lost nodes hold nothing. One rank's side then runs the real :func:`recovery.choose`,
timed; the model's own work is done before the clock starts (a first run records the reduced
values, a second replays them). ``tests/test_scale.py`` checks the model against real reductions
over threads at small world sizes.

Reported per world size: the Python time of one rank's planning (a holder and a lost rank), the
bytes each collective carries per rank, and a latency model of those collectives on the
transports in question (:func:`latency_model`); and, for comparison, the cost of gathering every
rank's advertisement as JSON (how find_latest worked before the census).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tasd.managers import subgroups
from tasd.managers.collectives import rank_bitmap
from tasd.managers.recovery import Holding, choose

#: Per-hop latency of a TCP (gloo) message between hosts, and of an NVLink/IB NCCL hop (seconds).
GLOO_HOP_S = 20e-6
NCCL_HOP_S = 10e-6
#: Bandwidth of one TCP connection, bytes per second.
GLOO_BYTES_PER_S = 5e9
#: Software cost of one gloo operation on the calling rank (Python call, gloo dispatch), seconds.
OP_OVERHEAD_S = 50e-6
#: Requests per second the job's TCPStore serves, all clients together: an assumption for a store on a
#: host of its own (one process; on the 2-core development VM, with 4 clients on the same cores, it
#: served 38,000 gets/s).
STORE_OPS_PER_S = 100_000


@dataclass(frozen=True)
class Case:
    """A world: ``world`` ranks, ``ranks_per_node`` per node, placement ``strategy`` ("ring" or
    "clique") with ``factor`` and ``jump``, and ``lost_fraction`` of the nodes lost (spread evenly,
    so that no ring neighbourhood or clique loses every copy)."""

    world: int
    factor: int = 2
    jump: int = 8
    strategy: str = "ring"
    lost_fraction: float = 0.01
    ranks_per_node: int = 8


def placement(case: Case) -> np.ndarray:
    """(world, factor) int64: row ``o`` lists the ranks holding owner ``o``'s part, ``o`` first."""
    o = np.arange(case.world, dtype=np.int64)[:, None]
    k = np.arange(case.factor, dtype=np.int64)[None, :]
    if case.strategy == "ring":
        return (o + k * case.jump) % case.world
    if case.strategy == "clique":
        m, i = o % case.jump, o // case.jump
        members = m + case.jump * ((i // case.factor) * case.factor + k)
        return np.concatenate([o, members[members != o].reshape(case.world, case.factor - 1)], axis=1)
    raise ValueError(f"unknown strategy {case.strategy!r}")


def alive_ranks(case: Case) -> np.ndarray:
    """(world,) bool: False for the ranks of the lost nodes."""
    nodes = case.world // case.ranks_per_node
    n_lost = int(round(case.lost_fraction * nodes))
    alive = np.ones(case.world, dtype=bool)
    if n_lost:
        lost_nodes = np.arange(n_lost, dtype=np.int64) * (nodes // n_lost)
        for r in range(case.ranks_per_node):
            alive[lost_nodes * case.ranks_per_node + r] = False
    return alive


class ModelWorld:
    """The reduced values of every census round for a world of ``case`` holding one save
    ``(iteration, save_id)``: each call of :meth:`reduce` returns what the collective would."""

    def __init__(self, case: Case, iteration: int = 100, save_id: int = 12345):
        self.case, self.key = case, (iteration, save_id)
        self.held = placement(case)
        self.alive = alive_ranks(case)
        self._next_max = "iteration"
        self._exhausted = not self.alive.any()

    def holdings(self, rank: int) -> dict:
        """What ``rank`` holds in this world (the input of recovery.choose on that rank)."""
        if not self.alive[rank]:
            return {}
        owners = np.flatnonzero((self.held == rank).any(axis=1))
        return {self.key: Holding({int(o): True for o in owners}, None)}

    def reduce(self, values: torch.Tensor, op: str) -> torch.Tensor:
        w = self.case.world
        if op == "max":
            stage, self._next_max = self._next_max, ("save_id" if self._next_max == "iteration" else "iteration")
            if self._exhausted:
                return torch.tensor([-1], dtype=torch.int64)
            return torch.tensor([self.key[0] if stage == "iteration" else self.key[1]], dtype=torch.int64)
        if op == "bor":
            held_somewhere = self.alive[self.held].any(axis=1)
            self._exhausted = not held_somewhere.all()
            return torch.cat([rank_bitmap(np.flatnonzero(held_somewhere), w),
                              rank_bitmap(np.flatnonzero(self.alive), w), torch.zeros(1, dtype=torch.int64)])
        if op == "min":
            needs = np.flatnonzero(~self.alive)
            if len(needs) != values.numel():
                raise AssertionError(f"model: {len(needs)} lost owners, the protocol asked about {values.numel()}")
            holders = self.held[needs]
            dist = (holders - needs[:, None]) % w
            dist = np.where(self.alive[holders] & (holders != needs[:, None]), dist, np.iinfo(np.int64).max)
            return torch.from_numpy(dist.min(axis=1))
        raise ValueError(f"unknown op {op!r}")


class _Replay:
    """Replays recorded reduced values; counts the bytes each call carries."""

    def __init__(self, results: list[torch.Tensor]):
        self.results, self.i, self.calls = results, 0, []

    def reduce(self, values: torch.Tensor, op: str) -> torch.Tensor:
        self.calls.append((op, values.numel() * values.element_size()))
        out = self.results[self.i]
        self.i += 1
        return out


def tree_levels(world: int, fanout: int | None = None) -> int:
    """Levels of :class:`tasd.managers.subgroups.GroupTree` over ``world`` ranks (at least one)."""
    return max(subgroups.tree_blocks(0, world, fanout or subgroups.TREE_FANOUT)[0], 1)


def tree_all_reduce_s(world: int, nbytes: int, fanout: int | None = None) -> float:
    """Modelled seconds of one all_reduce of ``nbytes`` on the agreement tree, for the rank that
    waits longest (a leaf): a gloo ring all_reduce per level up (2(f-1) hops, ~2 x nbytes per
    connection), then a broadcast per level down (the root sends to each of the others:
    counted as f-1 hops), plus :data:`OP_OVERHEAD_S` per operation."""
    f = fanout or subgroups.TREE_FANOUT
    levels = tree_levels(world, f)
    up = levels * (2 * (f - 1) * GLOO_HOP_S + 2 * nbytes / GLOO_BYTES_PER_S)
    down = (levels - 1) * (f - 1) * (GLOO_HOP_S + nbytes / GLOO_BYTES_PER_S)
    return up + down + (2 * levels - 1) * OP_OVERHEAD_S


def latency_model(calls: list[tuple[str, int]], world: int) -> dict[str, float]:
    """Modelled seconds for ``calls`` ((op, bytes) all_reduces) on three transports: a gloo ring
    over the world (2(W-1) hops), NCCL (about 2 log2 W hops, plus a device synchronization not
    counted here), and tasd's tree of gloo groups (:func:`tree_all_reduce_s`)."""
    out = {"gloo_ring_s": 0.0, "nccl_s": 0.0, "gloo_tree_s": 0.0}
    for _, nbytes in calls:
        out["gloo_ring_s"] += 2 * (world - 1) * GLOO_HOP_S + 2 * nbytes / GLOO_BYTES_PER_S + OP_OVERHEAD_S
        out["nccl_s"] += 2 * np.log2(max(world, 2)) * NCCL_HOP_S
        out["gloo_tree_s"] += tree_all_reduce_s(world, nbytes)
    return out


@dataclass
class GroupCost:
    """What creating tasd's groups costs at one world size: the most groups and connections any
    rank has (rank 0, in every level of the tree), the store requests of all ranks together and
    the seconds those take at :data:`STORE_OPS_PER_S`; and the same for one gloo group over the
    world (each member: a connection to every other one)."""

    groups_per_rank: int
    connections_per_rank: int
    store_requests: int
    seconds: float
    world_connections_per_rank: int
    world_store_requests: int
    world_seconds: float


#: Store requests one member makes to join a gloo group (torch 2.13: a new client connection, its
#: address set, the others' fetched with one multi_get, a wait) and, for a world group, the gets
#: of a store without multi_get: one per other member.
REQUESTS_PER_MEMBERSHIP = 4


def group_cost(world: int, strategy: str = "ring", factor: int = 2, fanout: int | None = None) -> GroupCost:
    """:class:`GroupCost` of the agreement tree plus the replication strategy's exchange groups
    (clique: one group of F per clique; ring: one 2-rank group per pair of peers)."""
    f = fanout or subgroups.TREE_FANOUT
    levels = tree_levels(world, f)
    memberships, participants = 0, world
    for _ in range(levels):  # blocks of f participants; a last block of one is no group
        memberships += participants - (1 if participants % f == 1 else 0)
        participants = -(-participants // f)
    if strategy == "clique":
        groups, conns = levels + 1, levels * (f - 1) + factor - 1
        memberships += world
    else:
        groups, conns = levels + 2 * (factor - 1), levels * (f - 1) + 2 * (factor - 1)
        memberships += 2 * world * (factor - 1)
    requests = memberships * REQUESTS_PER_MEMBERSHIP
    world_requests = world * (REQUESTS_PER_MEMBERSHIP + world - 1)
    return GroupCost(groups, conns, requests, requests / STORE_OPS_PER_S, world - 1, world_requests,
                     world_requests / STORE_OPS_PER_S)


@dataclass
class ScaleResult:
    case: Case
    lost_ranks: int
    iteration: int
    plan_len: int
    holder_s: float
    lost_s: float
    calls: list[tuple[str, int]] = field(default_factory=list)
    model: dict[str, float] = field(default_factory=dict)
    json_bytes_per_rank: int | None = None
    json_decode_s: float | None = None

    @property
    def bytes_per_rank(self) -> int:
        return sum(n for _, n in self.calls)


def _timed_choose(world: ModelWorld, rank: int, repeats: int) -> tuple[float, Any, list]:
    recorder = ModelWorld(world.case, *world.key)
    results: list[torch.Tensor] = []

    def record(values: torch.Tensor, op: str) -> torch.Tensor:
        out = recorder.reduce(values, op)
        results.append(out)
        return out
    holdings = world.holdings(rank)
    chosen = choose(holdings, rank, world.case.world, None, record)
    best, calls = float("inf"), []
    for _ in range(repeats):
        replay = _Replay(results)
        t = time.perf_counter()
        again = choose(holdings, rank, world.case.world, None, replay.reduce)
        best = min(best, time.perf_counter() - t)
        if again != chosen:
            raise AssertionError("replayed decision differs")
        calls = replay.calls
    return best, chosen, calls


def json_gather_cost(world: int, factor: int) -> tuple[int, float]:
    """Bytes each rank received, and Python seconds to decode them, when every rank's rows were
    gathered as JSON (the protocol before the census), for ``world`` ranks."""
    row = json.dumps({"error": None, "parts": [[100, "%016x" % 12345, list(range(factor)), [], None]]}).encode()
    blob = [row] * world
    t = time.perf_counter()
    decoded = [json.loads(b) for b in blob]
    spent = time.perf_counter() - t
    del decoded
    return len(row) * world, spent


def simulate(case: Case, repeats: int = 3, legacy: bool = False) -> ScaleResult:
    """One world: the planning of a holder rank and of a lost rank, timed; collectives counted."""
    world = ModelWorld(case)
    lost = np.flatnonzero(~world.alive)
    holder = int(np.flatnonzero(world.alive)[0])
    holder_s, chosen, calls = _timed_choose(world, holder, repeats)
    lost_s = _timed_choose(world, int(lost[0]), repeats)[0] if lost.size else 0.0
    result = ScaleResult(case, int(lost.size), chosen.iteration, len(chosen.plan), holder_s, lost_s, calls,
                         latency_model(calls, case.world))
    if legacy:
        result.json_bytes_per_rank, result.json_decode_s = json_gather_cost(case.world, case.factor)
    return result
