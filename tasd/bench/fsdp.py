"""``tasd bench``'s ``fsdp`` scenario, rank side: tasd's local checkpoints of an FSDP2 model and its
Adam state against ``torch.distributed.checkpoint`` (DCP) on the same state dict, in the same rank
processes and under the same directory.

Every rank process builds an FSDP2 model (:func:`build`: a stack of ``nn.Linear(hidden, hidden)``
layers, each and the root ``fully_shard``'ed on ``init_device_mesh("cpu", (world,))``, Adam), trains
it one step (so the optimizer has its moments) and takes ``get_state_dict(model, optim)`` once,
before any clock, as ``{"model": msd, "optim": osd}``: every method below saves that one object.
What is timed (see :data:`SAVES` and :data:`RESUMES`):

- ``tasd_async``: ``LocalCheckpointManager.save(FSDPTensorAwareStateDict(state), it, is_async=True)``
  and ``schedule_async_request`` on tasd's persistent ``AsyncCallsQueue`` (started before any
  clock), clique replication; the stall ends when the schedule returns, the save completes
  (blocking finalize, removal of the superseded checkpoint) after the clock;
- ``dcp_async``: ``torch.distributed.checkpoint.async_save(state, checkpoint_id=dir,
  process_group=<a gloo group of its own>)``; the stall ends when it returns its future, which is
  waited for after the clock. DCP's background thread runs collectives (its save plan) while the
  caller goes on, so it gets a group of its own, never the one the training thread uses;
- ``copy``: every tensor of the state (each DTensor's local shard, the plain tensors) copied into
  preallocated host memory: the least a snapshot costs;
- resumes in fresh processes (:func:`resume_rank`): the new model and optimizer are built and the
  optimizer's state made (:func:`ready`) before the clock, which then holds what differs between
  the formats: ``tasd_resume`` = new manager, ``find_latest`` + ``load`` + ``attach_mesh`` +
  ``set_state_dict``; ``dcp_resume`` = ``get_state_dict`` (the tensors DCP loads into) +
  ``dcp.load`` + ``set_state_dict``.

Correctness: the saving ranks write a digest of the state they saved (:func:`digest`: a hash of
every tensor's local bytes, dtype and shape by key path) and check after the saves that the live
state is unchanged; every probed (first) resume compares the digest of the resumed model and
optimizer with it (:func:`compare`, AssertionError naming the keys), after checking that every
tensor of the fresh model and optimizer but the step counts differed from the save before the
load (so a load that left any of them as it was is caught too)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import xxhash

from tasd.bench.measure import Completion, Method, run_methods, timed_once
from tasd.bench.megatron import own_part_bytes
from tasd.bench.methods import SESSION, MethodInfo, Workers, dcp_path, newest_dcp, remove_dcp_but
from tasd.managers import LocalCheckpointManager
from tasd.managers.replication import CliqueReplicationStrategy

logger = logging.getLogger(__name__)

#: Modules every rank imports: the fork server imports them once when this scenario starts it.
PRELOAD = ("tasd.fsdp", "torch.distributed.fsdp", "torch.distributed.checkpoint",
           "torch.distributed.checkpoint.state_dict")

#: In-process methods: name -> how it is shown.
SAVES: dict[str, MethodInfo] = {
    "copy": MethodInfo("copy of every local shard and plain tensor of the state into preallocated host memory",
                       "limit"),
    "tasd_async": MethodInfo("tasd save(FSDPTensorAwareStateDict(state), is_async=True) + schedule on its "
                             "persistent AsyncCallsQueue (stall)", "tasd"),
    "dcp_async": MethodInfo("torch.distributed.checkpoint.async_save(state) on a gloo group of its own (stall)",
                            "peer"),
}
#: Resumes in fresh processes: name -> how it is shown.
RESUMES: dict[str, MethodInfo] = {
    "tasd_resume": MethodInfo("tasd: new manager, find_latest + load + attach_mesh + set_state_dict", "tasd"),
    "dcp_resume": MethodInfo("DCP: get_state_dict + dcp.load + set_state_dict", "peer"),
}
#: What a resume loads: the in-process method whose last save it reads.
SAVED_BY = {"tasd_resume": "tasd_async", "dcp_resume": "dcp_async"}


@dataclass(frozen=True)
class FSDPPoint:
    """One measurement point: ``world`` ranks, an FSDP2 stack of ``layers`` ``nn.Linear(hidden,
    hidden)`` (with bias) sharded over all of them, Adam; tasd's clique replication with
    ``factor`` copies (1: none) and jump ``jump``; ``batch`` rows in the training step."""

    world: int
    layers: int
    hidden: int
    factor: int = 2
    jump: int = 1
    batch: int = 8


# -- the model and its state ----------------------------------------------------------------------
def build(point: FSDPPoint, seed: int) -> tuple[Any, nn.Module, torch.optim.Optimizer]:
    """(mesh, model, optimizer) on this rank: the point's Linear stack (ReLU between layers),
    initialized from ``seed``, every Linear and the root ``fully_shard``'ed on a 1-D CPU mesh
    named ``("shard",)`` over the world, and Adam (no state yet). Collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.get_world_size() != point.world:
        raise ValueError(f"point is for world size {point.world}, not {dist.get_world_size()}")
    mesh = init_device_mesh("cpu", (point.world,), mesh_dim_names=("shard",))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(point.layers):
        layers += [nn.Linear(point.hidden, point.hidden)] + ([nn.ReLU()] if i < point.layers - 1 else [])
    model = nn.Sequential(*layers)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return mesh, model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train_step(point: FSDPPoint, model: nn.Module, optim: torch.optim.Optimizer, rank: int) -> float:
    """One forward, backward and Adam step on data of this rank's own. Collective."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(point.batch, point.hidden, generator=g)
    loss = (model(x) ** 2).mean()
    loss.backward()
    optim.step()
    optim.zero_grad()
    return loss.item()


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    """``{"model": msd, "optim": osd}`` from ``get_state_dict(model, optim)`` (DTensors; initializes
    the optimizer's state if it has none)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd}


def set_state(model: nn.Module, optim: torch.optim.Optimizer, state: dict) -> None:
    """``set_state_dict`` of ``state``'s model and optimizer parts."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(key path, tensor, whether it is a DTensor's local shard) for every tensor of nested ``obj``."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        yield path, obj.to_local(), True
    elif isinstance(obj, torch.Tensor):
        yield path, obj, False
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")


def local_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """Every tensor of nested ``obj`` (dicts, lists, tuples) by key path (``model.0.weight``,
    ``optim.state.0.weight.exp_avg``), a DTensor as its local shard (no communication)."""
    return {path: t for path, t, _ in _leaves(obj)}


def digest(obj: Any) -> dict[str, str]:
    """A hash of every tensor's local bytes with its dtype and shape, by key path
    (:func:`local_tensors`): what :func:`compare` checks a resume against. Local."""
    out = {}
    for path, t in local_tensors(obj).items():
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[path] = f"{t.dtype} {tuple(t.shape)} {xxhash.xxh3_64_hexdigest(data)}"
    return out


def compare(want: dict[str, str], got: dict[str, str], what: str) -> None:
    """Raise AssertionError saying ``what`` and naming the first key paths whose tensors differ
    (bytes, dtype or shape) or exist on one side only; nothing when ``got`` equals ``want``."""
    wrong = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if wrong:
        raise AssertionError(f"{what}: {len(wrong)} of {len(want)} tensor(s) differ from the save, e.g. {wrong[:3]}")


def describe(state: dict) -> dict:
    """This rank's share of ``state``: {"tensors", "dtensors", "tensor_bytes", "model_bytes",
    "optim_bytes"} (local shards and plain tensors; bytes per rank)."""
    leaves = list(_leaves(state))

    def nbytes(prefix: str) -> int:
        return sum(t.numel() * t.element_size() for p, t, _ in leaves if p.startswith(prefix))

    return {"tensors": len(leaves), "dtensors": sum(1 for *_, d in leaves if d), "tensor_bytes": nbytes(""),
            "model_bytes": nbytes("model."), "optim_bytes": nbytes("optim.")}


def strategy(point: FSDPPoint) -> CliqueReplicationStrategy | None:
    """tasd's clique strategy for ``point`` (collective over each clique), or None at factor 1."""
    return CliqueReplicationStrategy.from_replication_params(point.jump, point.factor) if point.factor > 1 else None


def dcp_files_bytes(root: Path, rank: int) -> int | None:
    """Bytes of the data files rank ``rank`` wrote into the newest DCP checkpoint under ``root/dcp``
    (None: none)."""
    newest = newest_dcp(root)
    if newest is None:
        return None
    return sum(f.stat().st_size for f in newest.glob(f"__{rank}_*.distcp"))


def _digest_path(root: Path, rank: int) -> Path:
    return root / "digest" / f"{rank}.json"


# -- in-process methods ---------------------------------------------------------------------------
class FSDPRank:
    """One rank's side of a point: the trained FSDP2 model, its state dict (taken once), tasd's
    manager and persistent queue, DCP's gloo group; :meth:`method` builds the timed
    :class:`~tasd.bench.measure.Method` of a name of :data:`SAVES`. Every method saves under
    ``root/<its directory>`` and removes what it superseded in its completion (outside the clock).
    Collective to build; call :meth:`close` (collective)."""

    def __init__(self, rank: int, point: FSDPPoint, root: Path):
        self.rank, self.point, self.root = rank, point, Path(root)
        self.mesh, self.model, self.optim = build(point, seed=1)
        train_step(point, self.model, self.optim, rank)
        self.state = full_state(self.model, self.optim)
        self.workers = Workers()
        self.manager = LocalCheckpointManager(self.root / "tasd", SESSION, strategy(point))
        self.dcp_group = dist.new_group(backend="gloo")
        self.iteration = 0

    def close(self) -> None:
        """Finalize and stop tasd's queue (collective)."""
        self.workers.close()

    def next_iteration(self) -> int:
        self.iteration += 1
        return self.iteration

    def method(self, name: str) -> Method:
        if name not in SAVES:
            raise ValueError(f"unknown fsdp method {name!r}; known: {', '.join(SAVES)}")
        return getattr(self, name)()

    def copy(self) -> Method:
        """Copy every local shard and plain tensor of the state into preallocated host memory."""
        src = list(local_tensors(self.state).values())
        dst = [torch.empty_like(t) for t in src]

        def call() -> None:
            torch._foreach_copy_(dst, src)
        return Method("copy", call)

    def tasd_async(self) -> Method:
        """tasd's async save of the state, scheduled on the persistent queue (started here, before
        any clock); its completion finalizes and waits for the superseded checkpoint's removal."""
        from tasd.fsdp import FSDPTensorAwareStateDict

        queue = self.workers.tasd_queue()

        def call() -> Completion:
            queue.schedule_async_request(self.manager.save(FSDPTensorAwareStateDict(self.state),
                                                           self.next_iteration(), is_async=True))

            def complete() -> None:
                queue.maybe_finalize_async_calls(blocking=True)
                self.manager.wait_for_cleanup()
            return complete
        return Method("tasd_async", call)

    def dcp_async(self) -> Method:
        """``dcp.async_save`` of the state into a new directory (default stager, thread) on DCP's
        own gloo group; its completion waits for the future and removes the older directories."""
        import torch.distributed.checkpoint as dcp

        def call() -> Completion:
            it = self.next_iteration()
            future = dcp.async_save(self.state, checkpoint_id=str(dcp_path(self.root, it)), process_group=self.dcp_group)

            def complete() -> None:
                future.result()
                remove_dcp_but(self.root, it, self.rank)
            return complete
        return Method("dcp_async", call)


def methods_rank(rank: int, world: int, point: FSDPPoint, root: str, names: list[str], repeats: int) -> dict:
    """Rank function for run_ranks: time ``names`` (of :data:`SAVES`) interleaved
    (:func:`tasd.bench.measure.run_methods`), check that the live state is unchanged by the saves,
    and write the digest of the saved state for the resumes' check. The newest save of every
    method stays under ``root``. Returns {"times": run_methods' result, "state": describe's,
    "tasd_part_bytes", "dcp_bytes"}."""
    if world != point.world:
        raise ValueError(f"point is for world size {point.world}, not {world}")
    warnings.simplefilter("ignore")  # DCP's and FSDP's notes on CPU meshes
    bench = FSDPRank(rank, point, Path(root))
    try:
        want = digest(bench.state)
        times = run_methods([bench.method(n) for n in names], repeats, between=os.sync)
        compare(want, digest(bench.state), f"rank {rank}: the live state after the saves")
        path = _digest_path(Path(root), rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want))
        out = {"times": times, "state": describe(bench.state),
               "tasd_part_bytes": own_part_bytes(bench.manager.local_ckpt_dir, rank),
               "dcp_bytes": dcp_files_bytes(Path(root), rank)}
    finally:
        bench.close()
    os.sync()
    return out


# -- resumes in fresh processes -------------------------------------------------------------------
def _tasd_resume(point: FSDPPoint, root: Path, mesh: Any, model: nn.Module,
                 optim: torch.optim.Optimizer) -> Callable[[], Any]:
    def run() -> Any:
        manager = LocalCheckpointManager(root / "tasd", SESSION, strategy(point))
        if manager.find_latest() < 0:
            raise RuntimeError(f"rank {dist.get_rank()}: tasd found no checkpoint under {root / 'tasd'}")
        sd, _ = manager.load()
        sd.attach_mesh(mesh)
        set_state(model, optim, sd.state_dict)
        return sd
    return run


def _dcp_resume(point: FSDPPoint, root: Path, mesh: Any, model: nn.Module,
                optim: torch.optim.Optimizer) -> Callable[[], Any]:
    import torch.distributed.checkpoint as dcp

    newest = newest_dcp(root)
    if newest is None:
        raise RuntimeError(f"rank {dist.get_rank()}: no DCP checkpoint under {root / 'dcp'}")

    def run() -> Any:  # DCP loads in place: the tensors it loads into are made in the clock
        state = full_state(model, optim)
        dcp.load(state, checkpoint_id=str(newest))
        set_state(model, optim, state)
        return state
    return run


_RESUME_FNS = {"tasd_resume": _tasd_resume, "dcp_resume": _dcp_resume}


def ready(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    """Make the new optimizer's state, as a job does before its first step, and return
    :func:`full_state`. Both resumes would otherwise make it inside their clock (``set_state_dict``
    and ``get_state_dict`` take a zero-gradient step when it has none), and in a fresh process that
    first step also imports ``torch._dynamo`` and fills DTensor's sharding caches: 0.1-0.5 s on the
    development machine, varying more than the loads themselves at small sizes, and paid by the
    job's first training step when a resume does not pay it."""
    return full_state(model, optim)


def resume_rank(rank: int, world: int, point: FSDPPoint, root: str, name: str, probe: bool) -> dict:
    """Rank function for run_ranks: build a new model and optimizer (another initialization) and
    make the optimizer's state (:func:`ready`), untimed, then time resume ``name`` of
    :data:`RESUMES` once (collective; :func:`tasd.bench.measure.timed_once`). When ``probe``: with
    memory and disk probes, and checked (AssertionError): before the load the new state has the
    saved keys and differs from the save at every tensor but the step counts; after it, the model
    and optimizer state equal the digest the save left."""
    if name not in _RESUME_FNS:
        raise ValueError(f"unknown fsdp resume {name!r}; known: {', '.join(RESUMES)}")
    warnings.simplefilter("ignore")
    mesh, model, optim = build(point, seed=2)
    state = ready(model, optim)
    fn = _RESUME_FNS[name](point, Path(root), mesh, model, optim)
    if not probe:
        del state
        return timed_once(fn, probe_memory=False)
    want = json.loads(_digest_path(Path(root), rank).read_text())
    before = digest(state)
    del state
    if set(before) != set(want):
        raise AssertionError(f"rank {rank}: before {name} the new state's keys are not the saved ones: "
                             f"{sorted(set(before) ^ set(want))[:3]}")
    same = sorted(k for k, v in before.items() if want[k] == v and not k.endswith(".step"))
    if same:
        raise AssertionError(f"rank {rank}: before {name} the new state already equals the save at {same[:3]}: "
                             "the check could not tell whether the load restored them")
    out = timed_once(fn, probe_memory=True)
    compare(want, digest(full_state(model, optim)), f"rank {rank}: after {name}")
    return out
