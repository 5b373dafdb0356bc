"""``tasd demo --backend megatron``: a megatron-core GPT trained on CPU ranks saves local checkpoints
through tasd's Megatron-LM adapter, loses a node, restarts and resumes bit-exactly.

Each rank is a process (``tasd.launch.run_ranks``, gloo); ``<root>/demo/<rank>`` stands for that
node's local disk. Ranks run a small megatron-core ``GPTModel`` with megatron-core's DDP and
distributed optimizer (``tasd.adapters.megatron_cpu.build_gpt``: tensor parallel ``tp``, data
parallel over the rest of the world), and do what Megatron-LM core_v0.16.1's training loop does for
``--non-persistent-ckpt-type local``:

- its flags are parsed by a parser that ``tasd.adapters.megatron.add_arguments`` completed, checked
  by ``validate_args``, and ``build_checkpoint_manager(args)`` builds the manager;
- every ``--non-persistent-save-interval`` steps the state dict Megatron-LM's ``generate_state_dict``
  builds (arguments, checkpoint version, iteration, the model's and the distributed optimizer's
  sharded state dicts, the RNG states as a ShardedObject; :func:`megatron_state_dict`) is saved
  with ``save_local_checkpoint``; with ``--async-save`` the returned request is scheduled on
  megatron-core's own ``AsyncCallsQueue`` (``persistent=--use-persistent-ckpt-worker``) and every
  step calls ``maybe_finalize_async_calls(blocking=False)``, as Megatron-LM's loop does (one
  difference: a save that finds the previous one unfinished finalizes it first, blocking, where
  Megatron-LM only warns, since tasd keeps one save in flight);
- a resume calls ``load_local_checkpoint`` twice, as Megatron-LM's ``load_checkpoint`` does: first
  without a sharded state dict (the common part: iteration and arguments, which are checked
  against the run's), then with the freshly built model's and optimizer's sharded state dict; the
  manager serves the second load from the first one's result, reading no file. The model, the
  optimizer (``load_state_dict``) and the RNG states (:func:`restore_rng_state`) are restored as
  Megatron-LM restores them.

Phases (:func:`train_phase`, :func:`restart_phase`): train ``steps + LOST_STEPS`` steps saving
every ``save_every`` (the last ``LOST_STEPS`` are lost in the "crash"); delete one rank's directory
(a lost node); restart in fresh processes, restore into a freshly built model and optimizer
(built from another seed, so that nothing matches unless the checkpoint restored it), check model
parameters, optimizer state and RNG states bitwise against the state at the checkpoint, redo the
lost steps and check their losses and the final state bitwise against the uninterrupted run (same
world, same data, gloo: megatron-core's training is deterministic here).

On CPU (this demo, the example, tests) a few things megatron-core assumes of a GPU job are
provided here: :func:`enable_cpu_async_worker` lets megatron-core's persistent worker start
without CUDA, and megatron-core 0.16.1's distributed optimizer, which falls back to torch's Adam
without Transformer Engine or Apex, needs :func:`init_optimizer_state_for_load` before a resume
builds its sharded state dict and :func:`load_optimizer_state` to load (see each for why).

:func:`run_megatron_demo` runs the phases and prints a report with rich. The example
``examples/megatron_local_ckpt.py`` makes the same calls in a script run by torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import logging
import os
import pickle
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tasd.demo import _mean, _mismatches, print_rank_failures
from tasd.launch import RankFailure, run_ranks

logger = logging.getLogger(__name__)

SESSION = "demo"
LOST_STEPS = 2  # steps trained after the last checkpoint, lost in the "crash"
#: Save modes of the demo: megatron-core's persistent worker (Megatron-LM requires it for
#: ``--async-save`` with distributed checkpoint formats) or synchronous saves.
SAVE_MODES = ("async-persistent", "sync")
#: Modules the fork server that starts the ranks imports once (megatron-core, quietly).
_PRELOAD = ("tasd._megatron_imports",)


# -- what Megatron-LM does, on CPU ----------------------------------------------------------------------
def enable_cpu_async_worker() -> None:
    """Let megatron-core's persistent checkpoint worker run on a machine without CUDA: its loop
    (``PersistentAsyncCaller.async_loop``) first calls ``torch.cuda.set_device(rank %
    torch.cuda.device_count())``, which fails there. The loop is replaced by
    :func:`_cpu_async_loop`, which makes that call harmless in the worker process and then runs
    megatron-core's own loop. Process-wide and idempotent; for CPU-only processes, like
    ``tasd.adapters.megatron_cpu.enable`` (which it calls). Local."""
    from tasd.adapters import megatron_cpu

    megatron_cpu.enable()
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    if PersistentAsyncCaller.__dict__["async_loop"].__func__ is not _cpu_async_loop:
        PersistentAsyncCaller.async_loop = staticmethod(_cpu_async_loop)
        logger.info("megatron-core's persistent checkpoint worker will run without CUDA in this process")


def _cpu_async_loop(*args: Any, **kwargs: Any) -> Any:
    """megatron-core's persistent worker loop in a spawned worker process without CUDA (see
    :func:`enable_cpu_async_worker`; the spawned process imports this module by name)."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    torch.cuda.set_device = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.device_count = lambda: 1  # type: ignore[assignment]
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    return PersistentAsyncCaller.async_loop(*args, **kwargs)


def parse_megatron_args(argv: Sequence[str], world_size: int) -> argparse.Namespace:
    """Megatron-style arguments: a few model flags under Megatron-LM's names
    (``--tensor-model-parallel-size``, ``--num-layers``, ``--hidden-size``,
    ``--num-attention-heads``, ``--seed``) and the local-checkpoint flags that
    ``tasd.adapters.megatron.add_arguments`` adds, checked by its ``validate_args`` against
    ``world_size``. Sets ``world_size``, ``data_parallel_size`` and ``ckpt_format`` ("torch_dist",
    Megatron-LM's default) as Megatron-LM's argument processing does. Raises ValueError naming the
    flag at fault (SystemExit for what argparse rejects). Local."""
    from tasd.adapters import megatron as tasd_megatron

    parser = argparse.ArgumentParser(prog="megatron-demo", allow_abbrev=False)
    model = parser.add_argument_group("model (Megatron-LM's flag names)")
    model.add_argument("--tensor-model-parallel-size", type=int, default=1)
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--hidden-size", type=int, default=64)
    model.add_argument("--num-attention-heads", type=int, default=4)
    model.add_argument("--seed", type=int, default=1234)
    tasd_megatron.add_arguments(parser)
    args = parser.parse_args(list(argv))
    tp = args.tensor_model_parallel_size
    if tp < 1 or world_size % tp:
        raise ValueError(f"--tensor-model-parallel-size {tp} must divide the world size {world_size}")
    args.world_size, args.data_parallel_size, args.ckpt_format = world_size, world_size // tp, "torch_dist"
    return tasd_megatron.validate_args(args)


def build_model(args: argparse.Namespace, seed: int | None = None) -> tuple[Any, Any, Any]:
    """(model, ddp, optimizer) that ``args`` describe (``tasd.adapters.megatron_cpu.build_gpt``),
    initialized from ``seed`` (default ``--seed``). Collective."""
    from tasd.adapters.megatron_cpu import build_gpt

    enable_cpu_async_worker()
    return build_gpt(args.tensor_model_parallel_size, seed=args.seed if seed is None else seed,
                     num_layers=args.num_layers, hidden_size=args.hidden_size, heads=args.num_attention_heads)


def _rng_state_object() -> Any:
    """Megatron-LM's ``get_rng_state`` (ckpt_format torch_dist, no expert parallelism, no
    ``--data-parallel-random-init``): this rank's RNG states as a ShardedObject per (PP, TP) rank,
    replicated across data-parallel ranks."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rng_state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                 "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.cuda.get_rng_state(),
                 "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    pp_rank, pp_size = mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()
    tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", [rng_state], (pp_size, tp_size), (pp_rank, tp_rank),
                         replica_id=mpu.get_data_parallel_rank(with_context_parallel=True))


def megatron_state_dict(args: argparse.Namespace, model: Any, optimizer: Any, iteration: int,
                        is_loading: bool = False) -> dict:
    """The state dict Megatron-LM core_v0.16.1's ``generate_state_dict`` builds for a local
    checkpoint (``--ckpt-format torch_dist``): ``args``, ``checkpoint_version``, ``iteration``,
    the model's sharded state dict, the distributed optimizer's (``dp_reshardable``, as Megatron-LM
    stores it for local checkpoints; ``is_loading=True`` for a load, which allocates the optimizer
    state to load into), the RNG states (a ShardedObject) and
    ``num_floating_point_operations_so_far``. Local."""
    from tasd.adapters.megatron_cpu import SHARDED_METADATA

    model_sd = model.sharded_state_dict(metadata=SHARDED_METADATA)
    return {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=SHARDED_METADATA),
            "rng_state": _rng_state_object(), "num_floating_point_operations_so_far": 0}


def init_optimizer_state_for_load(optimizer: Any) -> None:
    """Give a freshly built distributed optimizer the state a load fills in, where megatron-core
    falls back to torch's Adam (neither Transformer Engine nor Apex installed, as on CPU): there
    its ``state_dict()``, which ``sharded_state_dict(is_loading=True)`` calls first, requires the
    per-parameter Adam steps that only a step creates. Uses megatron-core's own
    ``_init_optimizer_states_with_dummy_values`` (one step with zero gradients; its values are
    all replaced by the load). Does nothing with Transformer Engine or Apex, or once the state
    exists. Local."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for opt in _distributed_optimizers(optimizer):
        if isinstance(opt, distrib_optimizer.DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _distributed_optimizers(optimizer: Any) -> list:
    """The DistributedOptimizers inside ``optimizer`` (a ChainedOptimizer or one of them)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def load_optimizer_state(optimizer: Any, state_dict: Any) -> None:
    """``optimizer.load_state_dict(state_dict)`` as Megatron-LM's ``load_checkpoint`` calls it, with
    two corrections that megatron-core 0.16.1's distributed optimizer needs where it falls back to
    torch's Adam (neither Transformer Engine nor Apex, as on CPU):

    - it runs under ``torch.no_grad()``: with fp32 parameters the main parameters are views of the
      model's (which require grad), and the ``dp_reshardable`` load copies into them in place;
    - Adam's per-parameter ``step`` is set again from the loaded parameter groups: megatron-core
      sets it from them, then its ``dp_reshardable`` load copies over it the step that the
      optimizer had when the sharded state dict was built (a LocalNonpersistentObject), which
      for a fresh optimizer is not the checkpoint's.

    ``state_dict``: the loaded ``state_dict["optimizer"]`` (a list for several chained
    optimizers). Local."""
    from megatron.core.optimizer import distrib_optimizer

    with torch.no_grad():
        optimizer.load_state_dict(state_dict)
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    opts = _distributed_optimizers(optimizer)
    loaded = [state_dict] if len(opts) == 1 else list(state_dict)
    for opt, sd in zip(opts, loaded):
        steps = {g["step"] for g in sd["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            raise ValueError(f"the loaded optimizer state has parameter groups at steps {sorted(steps)}; one expected")
        step = steps.pop()
        for state in opt.optimizer.state.values():
            state["step"] = torch.tensor(float(step), dtype=torch.float32)


def restore_rng_state(state_dict: dict) -> None:
    """Restore the RNG states of a loaded state dict as Megatron-LM's ``load_checkpoint`` does
    (Python, numpy, torch, CUDA when present, and the tensor-parallel tracker's states). Local."""
    from megatron.core import tensor_parallel

    rng_state = state_dict["rng_state"][0]  # one entry without --data-parallel-random-init
    random.setstate(rng_state["random_rng_state"])
    np.random.set_state(rng_state["np_rng_state"])
    torch.set_rng_state(rng_state["torch_rng_state"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(rng_state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng_state["rng_tracker_states"])


def check_checkpoint_args(saved: argparse.Namespace, args: argparse.Namespace) -> list[str]:
    """What differs between the checkpoint's arguments and this run's among those Megatron-LM's
    ``check_checkpoint_args`` compares (model shape and tensor parallelism), as messages."""
    names = ("num_layers", "hidden_size", "num_attention_heads", "tensor_model_parallel_size")
    return [f"--{n.replace('_', '-')}: checkpoint {getattr(saved, n, None)!r}, this run {getattr(args, n)!r}"
            for n in names if getattr(saved, n, None) != getattr(args, n)]


# -- snapshots and measurements ---------------------------------------------------------------------
def _clone(x: Any) -> Any:
    """``x`` with every tensor detached and copied (containers copied, other values kept)."""
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return copy.deepcopy(x)


def _snapshot(model: Any, optimizer: Any) -> dict:
    """Copies of what a restore must bring back: the model's parameters and buffers, the
    distributed optimizer's state as megatron-core defines it (``state_dict()``: parameter groups
    and steps; ``get_parameter_state_dp_reshardable()``: each parameter's main copy, Adam moments
    and step), and this process's RNG states (torch, Python, numpy)."""
    np_state = np.random.get_state()
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)},
            "optimizer": [_clone({"state_dict": opt.state_dict(),
                                  "param_state": opt.get_parameter_state_dp_reshardable()})
                          for opt in _distributed_optimizers(optimizer)],
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:])}}


def state_digest(snapshot: dict) -> str:
    """SHA-256 over a snapshot (see ``_snapshot``) in a fixed order: every tensor's dtype, shape and
    bytes, every other value's repr. Equal digests: bitwise equal states."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if torch.is_tensor(x):
            t = x.detach().contiguous().cpu()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    feed(snapshot)
    return h.hexdigest()


@contextlib.contextmanager
def _count_opened(root: str) -> Iterator[list[str]]:
    """Record the paths under ``root`` that this process opens (``os.open``) in the block: how the
    demo shows which load reads files."""
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(root):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    os.open = counting_open  # type: ignore[assignment]
    try:
        yield opened
    finally:
        os.open = real_open  # type: ignore[assignment]


def quiet_cpu_run() -> None:
    """For a rank of a CPU run: one thread (the ranks share the machine's cores), no Python
    warnings (megatron-core's about optional accelerations that a CPU run lacks, torch's about
    deprecated collectives megatron-core calls) and megatron-core's log at error level only (its
    tensor-parallel RNG tracker, which on CPU shares the CPU generator, warns at every step).
    Process-wide. Local."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)


# -- the phases -------------------------------------------------------------------------------------
def train_phase(rank: int, world_size: int, argv: list[str], steps: int) -> dict:
    """Phase 1 on one rank (``argv``: the Megatron flags of :func:`demo_argv`): train ``steps +
    LOST_STEPS`` steps, saving local checkpoints as Megatron-LM does every
    ``--non-persistent-save-interval`` steps up to ``steps``. Returns the save statistics
    (``saves``: the manager's SaveStats of each published save plus the training stall), every
    step's loss (``losses``), and snapshots at the last checkpoint (``at_ckpt``) and at the end
    (``final``)."""
    quiet_cpu_run()
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from tasd.adapters import megatron as tasd_megatron
    from tasd.adapters.megatron_cpu import train_step

    args = parse_megatron_args(argv, world_size)
    model, ddp, optimizer = build_model(args)
    manager = tasd_megatron.build_checkpoint_manager(args)
    context = {"local_checkpoint_manager": manager}  # Megatron-LM's checkpointing_context
    queue = AsyncCallsQueue(persistent=bool(args.use_persistent_ckpt_worker)) if args.async_save else None
    if queue is not None and queue.persistent:
        # Start the persistent worker while the job sets up: a real job's saves are minutes apart,
        # here a few steps, and a worker still starting would hold the first save back.
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
        queue.schedule_async_request(AsyncRequest(time.sleep, (0,), []))
        queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
    saves: list[dict] = []
    losses: dict[int, float] = {}
    stalls: dict[int, float] = {}
    at_ckpt = None

    def record(iteration: int) -> None:  # a finalize function: runs when the save is published
        stats = asdict(manager.last_save)
        stats.pop("extra", None)
        saves.append({**stats, "stall_s": stalls[iteration]})

    interval = args.non_persistent_save_interval
    for step in range(1, steps + LOST_STEPS + 1):
        losses[step] = train_step(ddp, optimizer, step)
        if queue is not None:
            queue.maybe_finalize_async_calls(blocking=False, no_dist=False)
        if step <= steps and step % interval == 0:
            t0 = time.perf_counter()
            if queue is not None and queue.get_num_unfinalized_calls():
                # Megatron-LM only warns here; tasd keeps one save in flight, so finish the last one.
                queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
            state_dict = megatron_state_dict(args, model, optimizer, step)
            request = tasd_megatron.save_local_checkpoint(manager, state_dict, step, args, context)
            if queue is not None:
                request.add_finalize_fn(lambda it=step: record(it))
                queue.schedule_async_request(request)
            stalls[step] = time.perf_counter() - t0  # the time training waited for this save
            if queue is None:
                record(step)
            at_ckpt = {**_snapshot(model, optimizer), "iteration": step}
    if queue is not None:
        queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
        queue.close()
    return {"rank": rank, "saves": saves, "losses": losses, "at_ckpt": at_ckpt,
            "final": {**_snapshot(model, optimizer), "iteration": steps + LOST_STEPS},
            "ckpt_dir": str(manager.local_ckpt_dir)}


def restart_phase(rank: int, world_size: int, argv: list[str], expected: list[bytes]) -> dict:
    """Phase 2 on one rank: a fresh process and manager load the newest local checkpoint as
    Megatron-LM's ``load_checkpoint`` does (two loads), restore a freshly built model and
    optimizer, compare them with phase 1's snapshot, redo the lost steps and compare their losses
    and the final state with phase 1's. ``expected``: phase 1's results by rank, each pickled
    (bytes: handing a process many tensors would pass each as a file descriptor).

    Returns ``found`` (the iteration loaded), ``from_peer`` (this rank's directory was gone at the
    restart, so its part came from a peer), each load's seconds and number of files opened under
    the checkpoint root, the redone steps' ``losses``, :func:`state_digest` of the restored and of
    the resumed state, and ``problems`` (empty when everything matched: ``verified``)."""
    quiet_cpu_run()
    from tasd.adapters import megatron as tasd_megatron
    from tasd.adapters.megatron_cpu import train_step

    mine = pickle.loads(expected[rank])  # phase 1's result, from the process that started this one
    args = parse_megatron_args(argv, world_size)
    model, ddp, optimizer = build_model(args, seed=args.seed + 1)  # anything but the trained state
    manager = tasd_megatron.build_checkpoint_manager(args)
    root = str(Path(args.non_persistent_local_ckpt_dir).resolve())
    from_peer = not manager.local_ckpt_dir.exists()
    problems: list[str] = []

    # Megatron-LM's first load: the common part (iteration, arguments) before the model's state.
    t0 = time.perf_counter()
    with _count_opened(root) as first_opened:
        loaded = tasd_megatron.load_local_checkpoint(manager, None, args)
    t1 = time.perf_counter()
    if loaded is None:
        raise RuntimeError(f"rank {rank}: no local checkpoint found under {manager.local_ckpt_dir.parent}")
    common, ckpt_id = loaded
    found = ckpt_id[0]
    problems += [f"checkpoint arguments differ: {m}" for m in check_checkpoint_args(common["args"], args)]
    # The second load: everything, into the sharded state dict of the model and optimizer just built.
    init_optimizer_state_for_load(optimizer)
    sharded = megatron_state_dict(args, model, optimizer, iteration=1, is_loading=True)
    t2 = time.perf_counter()
    with _count_opened(root) as second_opened:
        state_dict, again = tasd_megatron.load_local_checkpoint(manager, sharded, args)
    t3 = time.perf_counter()
    if second_opened:
        problems.append(f"Megatron's second load opened {len(second_opened)} file(s) (expected none: the manager "
                        f"keeps the first load's result): {second_opened[:3]}")
    ddp.load_state_dict(state_dict["model"])
    load_optimizer_state(optimizer, state_dict["optimizer"])
    restore_rng_state(state_dict)
    t4 = time.perf_counter()

    want = mine["at_ckpt"]["iteration"]
    if (found, again[0], state_dict["iteration"], common["iteration"]) != (want,) * 4:
        problems.append(f"expected iteration {want}; the first load gave {found} (iteration {common['iteration']}), "
                        f"the second {again[0]} (iteration {state_dict['iteration']})")
    restored = {**_snapshot(model, optimizer), "iteration": state_dict["iteration"]}
    problems += [f"restored {p} differs from the saved one" for p in _mismatches(restored, mine["at_ckpt"])]
    restored_digest = state_digest(restored)
    losses = {step: train_step(ddp, optimizer, step)
              for step in range(state_dict["iteration"] + 1, mine["final"]["iteration"] + 1)}
    lost_losses = {step: mine["losses"][step] for step in losses}
    if losses != lost_losses:
        problems.append(f"losses of the redone steps {losses} differ from the uninterrupted run's {lost_losses}")
    resumed = {**_snapshot(model, optimizer), "iteration": mine["final"]["iteration"]}
    problems += [f"after resuming, {p} differs from the uninterrupted run" for p in _mismatches(resumed, mine["final"])]
    return {"rank": rank, "found": found, "from_peer": from_peer, "first_load_s": t1 - t0,
            "second_load_s": t3 - t2, "restore_s": t4 - t3, "first_opened": len(first_opened),
            "second_opened": len(second_opened), "losses": losses, "restored_digest": restored_digest,
            "resumed_digest": state_digest(resumed), "verified": not problems,
            "problems": problems}


# -- the report -----------------------------------------------------------------------------------------
@dataclass
class MegatronDemoResult:
    """What :func:`run_megatron_demo` found: ``ok`` when every rank verified its restore and resume;
    ``trained`` and ``restarted``: the phases' per-rank results (empty when a phase did not run);
    ``lost_rank``: the rank whose directory was deleted (None: no node lost); ``error``: why the
    demo did not run or failed, when it did not verify."""

    ok: bool
    trained: list[dict] = field(default_factory=list)
    restarted: list[dict] = field(default_factory=list)
    lost_rank: int | None = None
    error: str = ""

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def _train_table(results: list[dict], save_mode: str) -> Table:
    t = Table(title=f"phase 1: train a megatron-core GPT and save local checkpoints ({save_mode})")
    for col in ("rank", "saved iterations", "bytes/ckpt (own + replicas)", "training stall s (mean)",
                "save total s (mean)", "exchange s (mean)", f"loss at step {len(results[0]['losses'])}"):
        t.add_column(col, justify="left" if col == "saved iterations" else "right")
    for r in results:
        s = r["saves"]
        t.add_row(str(r["rank"]), ", ".join(str(x["iteration"]) for x in s) or "-",
                  f"{s[-1]['file_bytes']:,}" if s else "-", f"{_mean([x['stall_s'] for x in s]):.4f}",
                  f"{_mean([x['total_s'] for x in s]):.4f}", f"{_mean([x['exchange_s'] for x in s]):.4f}",
                  f"{r['losses'][max(r['losses'])]:.6f}")
    return t


def _restart_table(results: list[dict]) -> Table:
    t = Table(title="phase 2: restart, load as Megatron-LM does (twice), resume")
    for col in ("rank", "found iteration", "1st load s", "files opened", "2nd load s", "files opened ",
                "part came from", "restored = saved", "redone losses equal"):
        t.add_column(col, justify="right")
    for r in results:
        restored_ok = not any(p.startswith("restored") or p.startswith("expected") for p in r["problems"])
        losses_ok = not any(p.startswith("losses") for p in r["problems"])
        t.add_row(str(r["rank"]), str(r["found"]), f"{r['first_load_s']:.4f}", str(r["first_opened"]),
                  f"{r['second_load_s']:.4f}", str(r["second_opened"]),
                  "[yellow]a peer[/]" if r["from_peer"] else "local disk",
                  "[green]yes[/]" if restored_ok else "[red]NO[/]", "[green]yes[/]" if losses_ok else "[red]NO[/]")
    return t


def demo_argv(root: str, tp: int, save_every: int, save_mode: str, replication: str | None,
              algo: str = "fully_parallel", replication_factor: int = 2, replication_jump: int = 1,
              extra: Sequence[str] = ()) -> list[str]:
    """The Megatron-LM command line the demo's ranks parse: local checkpoints under ``root`` in
    session ``demo``, every ``save_every`` steps, ``algo``, replication (``replication``: "clique",
    "ring" or None, with ``replication_factor`` and ``replication_jump``), async saves on
    megatron-core's persistent worker (``save_mode`` "async-persistent") or synchronous ones
    ("sync"), plus ``extra``."""
    argv = ["--tensor-model-parallel-size", str(tp), "--non-persistent-ckpt-type", "local",
            "--non-persistent-local-ckpt-dir", root, "--local-ckpt-session-id", SESSION,
            "--non-persistent-local-ckpt-algo", algo, "--non-persistent-save-interval", str(save_every),
            "--ckpt-assume-constant-structure"]
    if replication is not None:
        argv += ["--replication", "--replication-jump", str(replication_jump), "--replication-factor",
                 str(replication_factor), "--replication-strategy", replication]
    if save_mode == "async-persistent":
        argv += ["--async-save", "--use-persistent-ckpt-worker"]
    return argv + list(extra)


def run_megatron_demo(ranks: int = 4, tp: int = 2, steps: int = 12, save_every: int = 4,
                      directory: str | None = None, keep: bool = False, replication: str | None = "clique",
                      replication_factor: int = 2, replication_jump: int = 1, lose_rank: int | None = -1,
                      save_mode: str = "async-persistent", algo: str = "fully_parallel",
                      extra_args: Sequence[str] = (), console: Console | None = None,
                      timeout_s: float = 300.0) -> MegatronDemoResult:
    """Run both phases on ``ranks`` processes with tensor parallel ``tp`` and print the report.
    Between the phases the node of ``lose_rank`` is lost (its directory deleted; -1: the last
    rank when replicating, None: no loss). ``replication``: "clique" (Megatron-LM's, the default),
    "ring" or None, with ``replication_factor`` copies ``replication_jump`` ranks apart;
    ``save_mode``: one of SAVE_MODES; ``algo``: ``--non-persistent-local-ckpt-algo``;
    ``extra_args``: more Megatron flags for the ranks' parser (e.g. ``["--hidden-size", "32"]``);
    ``timeout_s``: limit of each phase. Checkpoints are removed afterwards unless ``keep`` or the
    run failed. Returns a :class:`MegatronDemoResult` (``exit_code`` 0 on success, else 1)."""
    console = console or Console()

    def refuse(message: str) -> MegatronDemoResult:
        console.print(f"[red]{message}[/]")
        return MegatronDemoResult(False, error=message)

    if save_mode not in SAVE_MODES:
        return refuse(f"save mode must be one of {', '.join(SAVE_MODES)} for the Megatron demo, got {save_mode!r} "
                      "(Megatron-LM requires --use-persistent-ckpt-worker for --async-save)")
    if ranks < 1 or tp < 1 or ranks % tp:
        return refuse(f"the tensor-parallel size {tp} must divide the number of ranks {ranks}")
    if save_every < 1 or steps < save_every:
        return refuse("the demo needs steps >= save-every >= 1")
    if replication is not None and ranks < 2:
        return refuse("replication needs at least 2 ranks (use --replication none)")
    if lose_rank == -1:
        lose_rank = ranks - 1 if replication is not None else None
    if lose_rank is not None and not 0 <= lose_rank < ranks:
        return refuse(f"--lose-rank {lose_rank} is not a rank of {ranks}")
    try:
        with warnings.catch_warnings():  # about optional accelerations (Transformer Engine, Apex)
            warnings.simplefilter("ignore")
            import megatron.core  # noqa: F401
    except ImportError:
        return refuse("the Megatron demo needs megatron-core: pip install 'tasd-checkpoint[megatron]'")
    if directory and (Path(directory) / SESSION).exists() and any((Path(directory) / SESSION).iterdir()):
        return refuse(f"{Path(directory) / SESSION} already holds files: remove it or choose another --dir")
    try:  # the ranks' own check, here first: a bad flag or placement is reported before any rank starts
        parse_megatron_args(demo_argv(directory or "<root>", tp, save_every, save_mode, replication, algo,
                                      replication_factor, replication_jump, extra_args), ranks)
    except ValueError as e:
        return refuse(str(e))
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="tasd-megatron-demo-"))
    session_dir = root / SESSION
    argv = demo_argv(str(root), tp, save_every, save_mode, replication, algo, replication_factor, replication_jump,
                     extra_args)
    described = f"{replication}, factor {replication_factor}, jump {replication_jump}" if replication else "none"
    console.print(f"tasd demo (Megatron): megatron-core GPT on {ranks} ranks (gloo, CPU), tensor parallel {tp}, "
                  f"data parallel {ranks // tp}, distributed optimizer; {steps} steps (+{LOST_STEPS} lost), local "
                  f"checkpoint every {save_every} steps ({save_mode} saves, {algo}), replication: "
                  f"{described}, in {session_dir}")
    console.print("Megatron-LM flags: " + " ".join(argv), markup=False, highlight=False, soft_wrap=True)
    result = MegatronDemoResult(False, lost_rank=lose_rank)
    try:
        t0 = time.perf_counter()
        result.trained = run_ranks(train_phase, ranks, argv, steps, timeout_s=timeout_s, preload=_PRELOAD)
        console.print(_train_table(result.trained, save_mode))
        last = result.trained[0]["saves"][-1]["iteration"] if result.trained[0]["saves"] else None
        console.print(f"phase 1 took {time.perf_counter() - t0:.1f}s; the job now \"crashes\": "
                      f"steps after iteration {last} are lost")
        if lose_rank is not None:
            shutil.rmtree(session_dir / str(lose_rank))
            console.print(f"[yellow]node of rank {lose_rank} lost[/]: deleted its local disk "
                          f"{session_dir / str(lose_rank)}")
        t0 = time.perf_counter()
        expected = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in result.trained]
        result.restarted = run_ranks(restart_phase, ranks, argv, expected, timeout_s=timeout_s, preload=_PRELOAD)
        console.print(_restart_table(result.restarted))
        console.print(f"phase 2 took {time.perf_counter() - t0:.1f}s (fresh processes: "
                      "model and optimizer built, checkpoint loaded twice, lost steps redone)")
        for r in result.restarted:
            for p in r["problems"]:
                console.print(f"rank {r['rank']}: {p}", style="red", markup=False, highlight=False)
        result.ok = all(r["verified"] for r in result.restarted)
        if result.ok:
            lost = f" (rank {lose_rank}'s part recovered from a peer)" if lose_rank is not None else ""
            console.print(f"[bold green]demo OK[/]: restored iteration {result.restarted[0]['found']} on {ranks} "
                          f"rank{'s' if ranks > 1 else ''}{lost}; model parameters, optimizer state and RNG states "
                          "equal the saved ones bit for bit, the redone steps' losses equal the uninterrupted "
                          "run's; Megatron's second load opened no file")
        else:
            result.error = "; ".join(f"rank {r['rank']}: {p}" for r in result.restarted for p in r["problems"])
            console.print("[bold red]demo FAILED[/]: the restored or resumed state differs (see above)")
    except RankFailure as e:
        result.error = str(e)
        console.print(f"[bold red]demo FAILED[/]: ranks {sorted(e.failures)} failed")
        print_rank_failures(console, e)
    finally:
        if result.ok and not keep:
            shutil.rmtree(session_dir if directory else root, ignore_errors=True)
        else:
            console.print(f"checkpoints kept in {session_dir}")
    return result
