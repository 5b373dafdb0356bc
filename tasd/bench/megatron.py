"""``tasd bench``'s ``megatron`` scenario, rank side: tasd's local checkpoints of a megatron-core
GPTModel with its distributed optimizer, saved and resumed as Megatron-LM does, next to
``torch.save``/``torch.load`` and megatron-core's own ``dist_checkpointing`` on the same state.

Every rank process builds the small GPT of :mod:`tasd.adapters.megatron_cpu` (megatron-core on CPU
and gloo: tensor parallel ``tp``, data parallel over the rest of the world), trains it one step
(so the optimizer has its Adam state) and builds Megatron-LM's sharded state dict of model and
optimizer. What is timed (see :data:`SAVES` and :data:`RESUMES`):

- an async save as Megatron-LM's ``save_checkpoint`` makes it with ``--non-persistent-ckpt-type
  local --async-save``: :func:`tasd.adapters.megatron.save_local_checkpoint`
  (``MCoreTensorAwareStateDict.from_state_dict`` + ``manager.save(is_async=True)``) and
  ``schedule_async_request`` on megatron-core's persistent ``AsyncCallsQueue``; the stall is until
  the schedule returns (the request's finalize runs after the clock);
- a synchronous save (the same without ``--async-save``);
- a resume in fresh processes: a new manager, Megatron-LM's two loads
  (:func:`tasd.adapters.megatron.load_local_checkpoint`: ``find_latest`` + ``load`` +
  ``to_state_dict``, first the common part, then everything), then the model's and the
  optimizer's ``load_state_dict``.

Each with ``--non-persistent-local-ckpt-algo`` ``fully_parallel`` and ``atomic``. Besides the times,
a rank reports what it keeps and writes per algorithm (:func:`describe_state`, own part files) and
the point-to-point operations of a fully parallel ``to_state_dict`` at two model sizes
(:func:`count_exchange`). The sharded state dict is built before the clock (Megatron-LM builds it
inside ``save_checkpoint``; it is the same for every method here).

megatron-core's model, DDP, optimizer and queue call CUDA unconditionally; this runs on CPU through
:func:`tasd.adapters.megatron_cpu.enable` (and, inside megatron-core's persistent worker, a stub for
the CUDA device it selects: :func:`_cpu_async_loop`), so it needs a machine without CUDA. Needs
megatron-core.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import xxhash

from tasd.bench.measure import Completion, Method, run_methods, timed_once
from tasd.bench.methods import SESSION, MethodInfo
from tasd.managers.partio import fsync_path
from tasd.managers.partnames import parse_part_name

logger = logging.getLogger(__name__)

ALGOS = {"fp": "fully_parallel", "atomic": "atomic"}

#: In-process methods: name -> how it is shown. ``needs`` "cuda": cannot run on this CPU path.
SAVES: dict[str, MethodInfo] = {
    "copy": MethodInfo("copy of every tensor the rank holds into preallocated host memory", "limit"),
    "tasd_fp_async": MethodInfo("tasd fully_parallel: from_state_dict + save(is_async=True) + schedule (stall)",
                                "tasd"),
    "tasd_atomic_async": MethodInfo("tasd atomic: from_state_dict + save(is_async=True) + schedule (stall)", "tasd"),
    "tasd_fp_sync": MethodInfo("tasd fully_parallel: from_state_dict + save (synchronous)", "tasd"),
    "tasd_atomic_sync": MethodInfo("tasd atomic: from_state_dict + save (synchronous)", "tasd"),
    "torch_save": MethodInfo("torch.save of the rank's state dict + fsync", "peer"),
    "mcore_dist_save": MethodInfo("megatron-core dist_checkpointing.save (torch_dist, fully parallel save)", "peer"),
    "mcore_dist_async": MethodInfo("megatron-core dist_checkpointing.save(async_sharded_save=True) + schedule "
                                   "(stall)", "peer", ("cuda",)),
}
#: Why megatron-core's async dist_checkpointing save has no row here.
MCORE_ASYNC_CUDA = ("needs CUDA: megatron-core's async writer calls torch.cuda.synchronize in its persistent "
                    "worker's preload, outside this CPU patch (not run)")
#: Resumes in fresh processes: name -> how it is shown.
RESUMES: dict[str, MethodInfo] = {
    "tasd_fp_resume": MethodInfo("tasd fully_parallel: new manager, 2x (find_latest + load + to_state_dict), "
                                 "load_state_dict", "tasd"),
    "tasd_atomic_resume": MethodInfo("tasd atomic: new manager, 2x (find_latest + load + to_state_dict), "
                                     "load_state_dict", "tasd"),
    "torch_resume": MethodInfo("torch.load (weights_only) + load_state_dict", "peer"),
    "mcore_dist_resume": MethodInfo("megatron-core dist_checkpointing.load + load_state_dict", "peer"),
}
#: What a resume loads: the in-process method whose last save it reads.
SAVED_BY = {"tasd_fp_resume": "tasd_fp_sync", "tasd_atomic_resume": "tasd_atomic_sync", "torch_resume": "torch_save",
            "mcore_dist_resume": "mcore_dist_save"}


@dataclass(frozen=True)
class GPTPoint:
    """One measurement point: ``world`` ranks, tensor parallel ``tp`` (data parallel ``world //
    tp``), a GPT of ``layers`` layers of width ``hidden`` with ``heads`` attention heads; tasd's
    clique replication with ``factor`` copies (1: none) and jump ``jump``;
    ``assume_constant_structure``: Megatron-LM's ``--ckpt-assume-constant-structure`` (fully
    parallel saves reuse the shard distribution of the first)."""

    world: int
    tp: int
    layers: int
    hidden: int
    heads: int
    factor: int = 2
    jump: int = 1
    assume_constant_structure: bool = False

    @property
    def dp(self) -> int:
        return self.world // self.tp


# -- building the model and Megatron-LM's arguments ------------------------------------------------------
def quiet_megatron() -> None:
    """Silence megatron-core's log warnings in this process (its RNG tracker warns on every
    forward on CPU). The rank functions also ignore Python warnings (deprecations, CPU-path notes)."""
    logging.getLogger("megatron").setLevel(logging.ERROR)


def build(point: GPTPoint, seed: int, layers: int | None = None, hidden: int | None = None) -> tuple:
    """(model, ddp, optimizer) of ``point`` on this rank (collective; see
    :func:`tasd.adapters.megatron_cpu.build_gpt`), at another size with ``layers``/``hidden``."""
    from tasd.adapters.megatron_cpu import build_gpt

    quiet_megatron()
    return build_gpt(point.tp, seed=seed, num_layers=layers or point.layers, hidden_size=hidden or point.hidden,
                     heads=point.heads)


def trained_state(model: Any, ddp: Any, opt: Any) -> dict:
    """Megatron-LM's sharded state dict after one training step (the optimizer's Adam state exists
    from the first step on). Collective."""
    from tasd.adapters.megatron_cpu import sharded_state_dict, train_step

    train_step(ddp, opt, 0)
    return sharded_state_dict(model, opt)


def loading_state(model: Any, ddp: Any, opt: Any) -> dict:
    """The sharded state dict Megatron-LM builds to load into (the optimizer's with
    ``is_loading``). Collective: megatron-core's distributed optimizer without Apex or Transformer
    Engine (this CPU path) cannot describe its state before it has one, so the new model is first
    trained one step (its parameters and Adam state are then overwritten by the load)."""
    from tasd.adapters.megatron_cpu import SHARDED_METADATA, train_step

    train_step(ddp, opt, 0)
    ssd = {"model": model.sharded_state_dict(metadata=SHARDED_METADATA)}
    with torch.no_grad():
        ssd["optimizer"] = opt.sharded_state_dict(ssd["model"], is_loading=True, metadata=SHARDED_METADATA)
    return ssd


def load_into(model: Any, opt: Any, state: dict) -> None:
    """``model.load_state_dict(state["model"])`` and ``opt.load_state_dict(state["optimizer"])`` as
    Megatron-LM's ``load_checkpoint`` calls them; the optimizer's under ``torch.no_grad()``: with
    float32 parameters (this CPU model) its main parameters are the model's leaf parameters, which
    its load copies into in place."""
    model.load_state_dict(state["model"])
    with torch.no_grad():
        opt.load_state_dict(state["optimizer"])


def megatron_args(root: Path, algo: str, point: GPTPoint, is_async: bool) -> argparse.Namespace:
    """Megatron-LM's arguments for tasd local checkpoints of ``algo`` under ``root/tasd_<algo>``,
    parsed by Megatron-LM's flags (:func:`tasd.adapters.megatron.add_arguments`) and checked by its
    rules (``validate_args(strict=True)``)."""
    from tasd.adapters import megatron as adapter

    argv = ["--non-persistent-ckpt-type", "local", "--non-persistent-local-ckpt-dir", str(root / f"tasd_{algo}"),
            "--non-persistent-local-ckpt-algo", algo, "--use-persistent-ckpt-worker",
            "--local-ckpt-session-id", SESSION]
    if is_async:
        argv.append("--async-save")
    if point.factor > 1:
        argv += ["--replication", "--replication-jump", str(point.jump), "--replication-factor", str(point.factor)]
    if point.assume_constant_structure:
        argv.append("--ckpt-assume-constant-structure")
    args = adapter.add_arguments(argparse.ArgumentParser()).parse_args(argv)
    return adapter.validate_args(args, world_size=point.world, strict=True)


def _noop() -> None:
    """An async call that does nothing (starts megatron-core's persistent worker before any clock)."""


def _cpu_async_loop(*args: Any, **kwargs: Any) -> Any:
    """megatron-core's persistent worker loop on a machine without CUDA: it first selects a CUDA
    device (``torch.cuda.set_device``); runs in the worker it spawns (found here by name)."""
    warnings.simplefilter("ignore")  # megatron-core's import-time notes (no Apex, no Transformer Engine)
    torch.cuda.set_device = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.device_count = lambda: 1  # type: ignore[assignment]
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    return PersistentAsyncCaller.async_loop(*args, **kwargs)


def mcore_queue() -> Any:
    """megatron-core's ``AsyncCallsQueue(persistent=True)`` (what Megatron-LM's async saves use
    with ``--use-persistent-ckpt-worker``) with its worker started. Collective (its finalize
    all_reduces)."""
    from megatron.core.dist_checkpointing.strategies import async_utils

    async_utils.PersistentAsyncCaller.async_loop = staticmethod(_cpu_async_loop)
    queue = async_utils.AsyncCallsQueue(persistent=True)
    queue.schedule_async_request(async_utils.AsyncRequest(_noop, (), []))
    queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
    return queue


# -- what a rank keeps and writes -------------------------------------------------------------------------
def shard_ids(ssd: dict) -> dict[tuple, int]:
    """This rank's ShardedTensors of ``ssd`` as {shard id: data bytes} (factories applied on a copy)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    from tasd.mcore import shard_id

    sharded, _ = save_preprocess(dict_list_map_outplace(lambda x: x, ssd), validate_access_integrity=False)
    return {shard_id(sh): sh.data.numel() * sh.data.element_size() for sh in nested_values(sharded)
            if isinstance(sh, ShardedTensor)}


def describe_state(ssd: dict) -> dict:
    """What this rank keeps of ``ssd`` with each algorithm: {"fp"/"atomic": {"tensors", "tensor_bytes",
    "shard_bytes", "replicated_bytes"}} plus "sharded_tensors" (its ShardedTensors). A shard is
    *replicated* when another rank holds one with the same identity (DP replicas). Collective
    (gathers every rank's shard ids; fully parallel distribution on the DP group)."""
    from megatron.core import parallel_state as ps

    from tasd.mcore import MCoreTensorAwareStateDict

    mine = shard_ids(ssd)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(mine))
    seen = Counter(sid for ids in everyone for sid in ids)
    out: dict[str, Any] = {"sharded_tensors": len(mine)}
    group = ps.get_data_parallel_group(with_context_parallel=True)
    for short, algo in ALGOS.items():
        sd, _ = MCoreTensorAwareStateDict.from_state_dict(ssd, algo=algo, parallelization_group=group)
        kept = [tuple(r[:3]) for r in sd.state_dict["shards"]]
        out[short] = {"tensors": sum(1 for _ in sd.tensors),
                      "tensor_bytes": sum(t.numel() * t.element_size() for t in sd.tensors),
                      "shard_bytes": sum(mine[s] for s in kept),
                      "replicated_bytes": sum(mine[s] for s in kept if seen[s] > 1)}
    return out


def own_part_bytes(directory: Path, rank: int) -> int | None:
    """Size of this rank's own part of the newest checkpoint under ``directory`` (None: none)."""
    parts = [(p.iteration, f) for f in directory.iterdir()
             if (p := parse_part_name(f.name)) and p.owner == rank and p.published] if directory.is_dir() else []
    return os.path.getsize(max(parts)[1]) if parts else None


def digest(ssd: dict) -> dict[str, str]:
    """A hash of every ShardedTensor's bytes in ``ssd``, by shard id (to check a resume)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from tasd.mcore import shard_id

    return {repr(shard_id(sh)): xxhash.xxh3_64_hexdigest(sh.data.detach().contiguous().view(torch.uint8).numpy())
            for sh in nested_values(ssd) if isinstance(sh, ShardedTensor)}


def _digest_path(root: Path, rank: int) -> Path:
    return root / "digest" / f"{rank}.json"


# -- the exchange's operations ----------------------------------------------------------------------------
def same_tensors(a: Any, b: Any, path: str = "state") -> None:
    """Raise AssertionError naming the first place where nested ``a`` and ``b`` hold tensors that
    differ in dtype, shape or any bit."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            raise AssertionError(f"{path}: keys differ: {sorted(map(str, set(a) ^ set(b)))[:4]}")
        for k in a:
            same_tensors(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            same_tensors(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))):
            raise AssertionError(f"{path}: tensors differ")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes (compared bit for bit: a NaN equals itself)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def count_exchange(point: GPTPoint, layers: int, hidden: int) -> dict:
    """Point-to-point operations of one fully parallel ``to_state_dict`` of a GPT of ``layers``
    layers and width ``hidden`` (built here, trained one step): every ``send``/``recv`` posted on
    tasd's Subgroups, by peer. Returns {"layers", "hidden", "sharded_tensors" (this rank's),
    "fetched" (shards it received), "ops_by_peer": {peer: operations}}. Collective; raises
    AssertionError when the result differs from an atomic to_state_dict of the same state."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace

    from tasd.adapters.megatron_cpu import sharded_state_dict
    from tasd.managers.subgroups import Subgroup
    from tasd.mcore import MCoreTensorAwareStateDict

    model, ddp, opt = build(point, seed=3, layers=layers, hidden=hidden)
    ssd = trained_state(model, ddp, opt)
    group = ps.get_data_parallel_group(with_context_parallel=True)
    sd, _ = MCoreTensorAwareStateDict.from_state_dict(ssd, algo="fully_parallel", parallelization_group=group)
    kept = len(sd.state_dict["shards"])
    ops: Counter = Counter()
    real = {"send": Subgroup.send, "recv": Subgroup.recv}

    def counting(name: str) -> Callable:
        def op(self: Subgroup, t: torch.Tensor, peer: int, tag: int) -> Any:
            ops[peer] += 1
            return real[name](self, t, peer, tag)
        return op

    # Both loads get copies of one sharded state dict (its containers; the same leaves): its
    # LocalNonpersistentObjects (e.g. the optimizer's per-parameter 'step', not checkpointed) come
    # back from it as they are.
    wanted = sharded_state_dict(model, opt)
    fresh = functools.partial(dict_list_map_outplace, lambda x: x, wanted)
    Subgroup.send, Subgroup.recv = counting("send"), counting("recv")  # type: ignore[method-assign]
    try:
        out = sd.to_state_dict(fresh(), algo="fully_parallel", parallelization_group=group)
    finally:
        Subgroup.send, Subgroup.recv = real["send"], real["recv"]  # type: ignore[method-assign]
    atomic, _ = MCoreTensorAwareStateDict.from_state_dict(ssd, algo="atomic")
    same_tensors(out, atomic.to_state_dict(fresh(), algo="atomic"))
    n = len(shard_ids(ssd))
    return {"layers": layers, "hidden": hidden, "sharded_tensors": n, "fetched": n - kept,
            "ops_by_peer": {int(p): c for p, c in sorted(ops.items())}}


# -- in-process methods ------------------------------------------------------------------------------------
class GPTRank:
    """One rank's side of a point: the trained GPT, its sharded state dict, tasd's managers (one
    per algorithm, as Megatron-LM builds it from its arguments), megatron-core's persistent async
    queue; :meth:`method` builds the timed :class:`~tasd.bench.measure.Method` of a name of
    :data:`SAVES`. Every method saves into ``root/<its directory>`` and removes what it superseded
    in its completion (outside the clock). Collective to build; call :meth:`close` (collective)."""

    def __init__(self, rank: int, point: GPTPoint, root: Path):
        from tasd.adapters import megatron as adapter

        self.rank, self.point, self.root = rank, point, Path(root)
        self.model, self.ddp, self.opt = build(point, seed=1)
        self.ssd = trained_state(self.model, self.ddp, self.opt)
        self.args = {(algo, is_async): megatron_args(self.root, algo, point, is_async)
                     for algo in ALGOS.values() for is_async in (False, True)}
        self.managers = {algo: adapter.build_checkpoint_manager(self.args[(algo, False)]) for algo in ALGOS.values()}
        self.contexts: dict[str, dict] = {algo: {} for algo in ALGOS.values()}
        self.queue = mcore_queue()
        self.iteration = 0

    def close(self) -> None:
        """Finalize and stop megatron-core's queue (collective)."""
        self.queue.close()
        # Dropped now, while torch.distributed is up: its __del__ logs the rank.
        self.queue.persistent_caller = None

    def next_iteration(self) -> int:
        self.iteration += 1
        return self.iteration

    def method(self, name: str) -> Method:
        if name.startswith("tasd_"):
            short, mode = name.removeprefix("tasd_").rsplit("_", 1)
            return self._tasd(name, ALGOS[short], mode == "async")
        return getattr(self, name)()

    def regular_state(self) -> dict:
        """This rank's state as a regular state dict (what ``to_state_dict`` returns to Megatron-LM
        and its ``load_state_dict`` calls take): every tensor it holds, the same objects."""
        from tasd.adapters.megatron_cpu import sharded_state_dict
        from tasd.mcore import MCoreTensorAwareStateDict

        sd, _ = MCoreTensorAwareStateDict.from_state_dict(self.ssd, algo="atomic")
        return sd.to_state_dict(sharded_state_dict(self.model, self.opt), algo="atomic")

    # -- methods ---------------------------------------------------------------------------------------
    def copy(self) -> Method:
        """Copy every tensor this rank holds (its atomic part) into preallocated host memory."""
        from tasd.mcore import MCoreTensorAwareStateDict

        src = list(MCoreTensorAwareStateDict.from_state_dict(self.ssd, algo="atomic")[0].tensors)
        dst = [torch.empty_like(t) for t in src]

        def call() -> None:
            torch._foreach_copy_(dst, src)
        return Method("copy", call)

    def _tasd(self, name: str, algo: str, is_async: bool) -> Method:
        """Megatron-LM's local save step (:func:`tasd.adapters.megatron.save_local_checkpoint`),
        async ones scheduled on megatron-core's queue as Megatron-LM's ``schedule_async_save``."""
        from tasd.adapters import megatron as adapter

        args, manager, context = self.args[(algo, is_async)], self.managers[algo], self.contexts[algo]

        def call() -> Completion:
            request = adapter.save_local_checkpoint(manager, self.ssd, self.next_iteration(), args, context)
            if request is not None:
                self.queue.schedule_async_request(request)

            def complete() -> None:
                self.queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
                manager.wait_for_cleanup()
            return complete
        return Method(name, call)

    def torch_save(self) -> Method:
        """torch.save of :meth:`regular_state` to a new file + fsync."""
        state, directory = self.regular_state(), self.root / "torch" / str(self.rank)
        directory.mkdir(parents=True, exist_ok=True)

        def call() -> Completion:
            path = directory / f"state_{self.next_iteration()}.pt"
            torch.save(state, path)
            fsync_path(path)
            return lambda: [p.unlink() for p in directory.glob("state_*.pt") if p != path]
        return Method("torch_save", call)

    def mcore_dist_save(self) -> Method:
        """megatron-core's ``dist_checkpointing.save`` of a new sharded state dict (built before
        the clock) into a new directory, with the fully parallel save wrapper over the DP group
        (Megatron-LM's default ``--ckpt-fully-parallel-save``); collective."""
        from megatron.core import dist_checkpointing
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        from tasd.adapters.megatron_cpu import sharded_state_dict

        strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(),
                                                    ps.get_data_parallel_group(with_context_parallel=True))
        top = self.root / "mcore_dist"
        pending = [sharded_state_dict(self.model, self.opt)]

        def call() -> Completion:
            path = top / f"iter_{self.next_iteration():07d}"
            path.mkdir(parents=True, exist_ok=True)
            dist_checkpointing.save(pending[0], str(path), sharded_strategy=strategy)

            def complete() -> None:
                pending[0] = sharded_state_dict(self.model, self.opt)
                dist.barrier()
                if self.rank == 0:
                    for old in top.glob("iter_*"):
                        if old != path:
                            shutil.rmtree(old)
                dist.barrier()
            return complete
        return Method("mcore_dist_save", call)


def methods_rank(rank: int, world: int, point: GPTPoint, root: str, names: list[str], repeats: int,
                 count_sizes: list[tuple[int, int]]) -> dict:
    """Rank function for run_ranks: time ``names`` (of :data:`SAVES`) interleaved
    (:func:`tasd.bench.measure.run_methods`), then describe what each algorithm keeps and writes,
    count the exchange's operations at each (layers, hidden) of ``count_sizes``, and write the
    digest of the saved state for the resumes' check. The newest save of every method stays under
    ``root`` for the resumes. Returns {"times": run_methods' result, "state": describe_state's,
    "part_bytes": {algo: own part bytes}, "counts": [count_exchange's]}."""
    if world != point.world:
        raise ValueError(f"point is for world size {point.world}, not {world}")
    warnings.simplefilter("ignore")
    bench = GPTRank(rank, point, Path(root))
    try:
        times = run_methods([bench.method(n) for n in names], repeats, between=os.sync)
        state = describe_state(bench.ssd)
        parts = {short: own_part_bytes(bench.managers[algo].local_ckpt_dir, rank) for short, algo in ALGOS.items()
                 if f"tasd_{short}_sync" in names or f"tasd_{short}_async" in names}
        path = _digest_path(Path(root), rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(digest(bench.ssd)))
    finally:
        bench.close()
    counts = [count_exchange(point, layers, hidden) for layers, hidden in count_sizes]
    os.sync()
    return {"times": times, "state": state, "part_bytes": parts, "counts": counts}


# -- resumes in fresh processes ------------------------------------------------------------------------------
def _tasd_resume(algo: str) -> Callable[[GPTPoint, Path, Any, Any, dict], Callable[[], Any]]:
    def make(point: GPTPoint, root: Path, model: Any, opt: Any, ssd: dict) -> Callable[[], Any]:
        from tasd.adapters import megatron as adapter

        args = megatron_args(root, algo, point, is_async=False)

        def run() -> Any:
            manager = adapter.build_checkpoint_manager(args)
            if adapter.load_local_checkpoint(manager, None, args) is None:  # the common part and the arguments
                raise RuntimeError(f"rank {dist.get_rank()}: no local checkpoint under {args.non_persistent_local_ckpt_dir}")
            state, _ = adapter.load_local_checkpoint(manager, ssd, args)
            load_into(model, opt, state)
            return state
        return run
    return make


def _torch_resume(point: GPTPoint, root: Path, model: Any, opt: Any, ssd: dict) -> Callable[[], Any]:
    paths = sorted((root / "torch" / str(dist.get_rank())).glob("state_*.pt"), key=lambda p: int(p.stem[6:]))

    def run() -> Any:
        state = torch.load(paths[-1], weights_only=True)
        load_into(model, opt, state)
        return state
    return run


def _mcore_dist_resume(point: GPTPoint, root: Path, model: Any, opt: Any, ssd: dict) -> Callable[[], Any]:
    from megatron.core import dist_checkpointing

    path = max((root / "mcore_dist").glob("iter_*"))

    def run() -> Any:
        state = dist_checkpointing.load(ssd, str(path))
        load_into(model, opt, state)
        return state
    return run


_RESUME_FNS = {"tasd_fp_resume": _tasd_resume("fully_parallel"), "tasd_atomic_resume": _tasd_resume("atomic"),
               "torch_resume": _torch_resume, "mcore_dist_resume": _mcore_dist_resume}


def resume_rank(rank: int, world: int, point: GPTPoint, root: str, name: str, probe: bool) -> dict:
    """Rank function for run_ranks: build a new GPT (another initialization, untimed) and its
    loading sharded state dict, then time resume ``name`` of :data:`RESUMES` once (collective;
    :func:`tasd.bench.measure.timed_once`). When ``probe``: with memory and disk probes, and the
    model and optimizer state after it checked against the digest the save left (AssertionError)."""
    warnings.simplefilter("ignore")
    model, ddp, opt = build(point, seed=2)
    ssd = loading_state(model, ddp, opt)
    fn = _RESUME_FNS[name](point, Path(root), model, opt, ssd)
    out = timed_once(fn, probe_memory=probe)
    if probe:
        from tasd.adapters.megatron_cpu import sharded_state_dict

        want = json.loads(_digest_path(Path(root), rank).read_text())
        got = digest(sharded_state_dict(model, opt))
        wrong = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if wrong:
            raise AssertionError(f"rank {rank}: after {name} {len(wrong)} tensor(s) differ from the save, e.g. {wrong[:3]}")
    return out
