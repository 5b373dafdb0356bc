"""Megatron-LM local checkpoints on tasd: train, save every few steps, and resume after a restart.

This script makes the calls Megatron-LM core_v0.16.1's training loop makes for
``--non-persistent-ckpt-type local``, with tasd in place of nvidia-resiliency-ext, on a small
megatron-core GPT (tensor parallel, distributed optimizer) that runs on CPU with gloo:

1. Megatron's flags: ``tasd.adapters.megatron.add_arguments(parser)`` adds the local-checkpoint
   flags (Megatron-LM's names) and ``validate_args`` applies Megatron-LM's rules to them.
2. ``build_checkpoint_manager(args)`` builds the manager Megatron-LM keeps in
   ``checkpointing_context["local_checkpoint_manager"]``.
3. On start, ``load_checkpoint`` loads the newest local checkpoint as Megatron-LM does: a first
   ``load_local_checkpoint`` without a sharded state dict (iteration and arguments), a second one
   into the model's and optimizer's sharded state dict (served from the first: no file is read).
   A rank whose node lost its disk gets its part from a peer (``--replication``).
4. Every ``--non-persistent-save-interval`` steps ``save_checkpoint`` saves with
   ``save_local_checkpoint``; with ``--async-save`` the request runs on megatron-core's own
   ``AsyncCallsQueue`` and every step finalizes finished saves without blocking.

Run it with torchrun (4 CPU ranks: tensor parallel 2, data parallel 2)::

    torchrun --standalone --nproc-per-node 4 examples/megatron_local_ckpt.py --tp 2 --train-iters 20 \\
        --non-persistent-ckpt-type local --non-persistent-local-ckpt-dir /tmp/tasd-megatron-example \\
        --non-persistent-save-interval 5 --replication --replication-jump 1 --replication-factor 2 \\
        --async-save --use-persistent-ckpt-worker --ckpt-assume-constant-structure

Run the same command again (or with a larger ``--train-iters``): it resumes from the newest local
checkpoint. Delete one rank's directory (``/tmp/tasd-megatron-example/megatron-example/3``) first
to see that rank's part come from its peer. Without torchrun, ``--nproc 4`` starts the ranks as
local processes with tasd's launcher (``tasd.launch.run_ranks``, as ``tasd demo`` does).

The checkpoints of this example belong to session ``megatron-example`` (``--local-ckpt-session-id``):
with tasd's default session a job loads only its own checkpoints (its scheduler job id), and each
``torchrun --standalone`` is a new job.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch.distributed as dist

from tasd.adapters import megatron as tasd_megatron
from tasd.adapters.megatron_cpu import build_gpt, train_step
from tasd.megatron_demo import (check_checkpoint_args, enable_cpu_async_worker, init_optimizer_state_for_load,
                                load_optimizer_state, megatron_state_dict, quiet_cpu_run, restore_rng_state)

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")  # optional accelerations, absent on CPU


def parse_args(argv: list[str], world_size: int) -> argparse.Namespace:
    """Megatron-style arguments: a few model flags, and the local-checkpoint flags of Megatron-LM
    that tasd's adapter adds (Megatron-LM's own parser already has them; add_arguments skips those)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--tensor-model-parallel-size", "--tp", dest="tensor_model_parallel_size", type=int, default=1)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train-iters", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=None,
                        help="without torchrun: start this many ranks as local processes (tasd.launch.run_ranks)")
    tasd_megatron.add_arguments(parser)  # Megatron-LM: extra_args_provider=tasd_megatron.add_arguments
    parser.set_defaults(local_ckpt_session_id="megatron-example")  # one session across runs (see the docstring)
    args = parser.parse_args(argv)
    args.world_size, args.ckpt_format = world_size, "torch_dist"
    return tasd_megatron.validate_args(args)  # Megatron-LM's rules; a ValueError names the flag at fault


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def save_checkpoint(iteration: int, model, optimizer, args, checkpointing_context: dict, queue) -> None:
    """Megatron-LM's ``save_checkpoint(..., non_persistent_ckpt=True)`` for local checkpoints."""
    if args.async_save and queue.get_num_unfinalized_calls():
        # Megatron-LM warns that the last save has not finished; tasd keeps one save in flight.
        queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
    state_dict = megatron_state_dict(args, model, optimizer, iteration)  # Megatron-LM's generate_state_dict
    manager = checkpointing_context["local_checkpoint_manager"]
    request = tasd_megatron.save_local_checkpoint(manager, state_dict, iteration, args, checkpointing_context)
    if args.async_save:  # stalls only while tensors are staged; writing and replication run in the background
        request.add_finalize_fn(lambda: log(f"  saved local checkpoint of iteration {iteration} (async)"))
        queue.schedule_async_request(request)
    else:
        log(f"  saved local checkpoint of iteration {iteration}")


def load_checkpoint(model, ddp, optimizer, args, checkpointing_context: dict) -> int:
    """Megatron-LM's ``load_checkpoint`` for local checkpoints; returns the iteration to resume after
    (0 without a checkpoint)."""
    manager = checkpointing_context["local_checkpoint_manager"]
    loaded = tasd_megatron.load_local_checkpoint(manager, None, args)  # 1st load: common part and arguments
    if loaded is None:
        log("no local checkpoint: training from scratch")
        return 0
    common, (iteration, _, _) = loaded
    problems = check_checkpoint_args(common["args"], args)
    if problems:
        raise SystemExit(f"the local checkpoint of iteration {iteration} was saved by another model: {problems}")
    init_optimizer_state_for_load(optimizer)  # megatron-core's torch-Adam fallback (CPU) needs its state first
    sharded_state_dict = megatron_state_dict(args, model, optimizer, iteration, is_loading=True)
    state_dict, _ = tasd_megatron.load_local_checkpoint(manager, sharded_state_dict, args)  # 2nd load: no file read
    ddp.load_state_dict(state_dict["model"])
    load_optimizer_state(optimizer, state_dict["optimizer"])
    restore_rng_state(state_dict)
    log(f"resumed from the local checkpoint of iteration {state_dict['iteration']}")
    return state_dict["iteration"]


def train(rank: int, world_size: int, argv: list[str]) -> list[float]:
    """One rank's job (torch.distributed is initialized). Returns the losses of the steps it trained."""
    args = parse_args(argv, world_size)
    # This example runs megatron-core on CPU (a Megatron-LM job on GPUs needs neither call):
    quiet_cpu_run()  # one thread per rank; no warnings about CUDA-only features a CPU run lacks
    enable_cpu_async_worker()  # megatron-core's CUDA-only calls (and its persistent worker) on CPU
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    model, ddp, optimizer = build_gpt(args.tensor_model_parallel_size, seed=args.seed, num_layers=args.num_layers,
                                      hidden_size=args.hidden_size, heads=args.num_attention_heads)
    manager = tasd_megatron.build_checkpoint_manager(args)
    if manager is None:
        raise SystemExit("pass --non-persistent-ckpt-type local and --non-persistent-local-ckpt-dir DIR")
    checkpointing_context = {"local_checkpoint_manager": manager}
    queue = AsyncCallsQueue(persistent=args.use_persistent_ckpt_worker)  # megatron-core's own queue
    start = load_checkpoint(model, ddp, optimizer, args, checkpointing_context)
    losses = []
    for iteration in range(start + 1, args.train_iters + 1):
        if args.async_save:
            queue.maybe_finalize_async_calls(blocking=False, no_dist=False)  # publishes finished saves
        losses.append(train_step(ddp, optimizer, iteration))
        log(f"iteration {iteration}: loss {losses[-1]:.6f}")
        if args.non_persistent_save_interval and iteration % args.non_persistent_save_interval == 0:
            save_checkpoint(iteration, model, optimizer, args, checkpointing_context, queue)
    queue.maybe_finalize_async_calls(blocking=True, no_dist=False)  # the last save is published before exit
    queue.close()
    return losses


def main(argv: list[str]) -> int:
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
        try:
            train(dist.get_rank(), dist.get_world_size(), argv)
        finally:
            dist.destroy_process_group()
        return 0
    launcher = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    launcher.add_argument("--nproc", type=int, default=None)
    nproc = launcher.parse_known_args(argv)[0].nproc  # every rank parses and checks all flags itself
    if nproc is None and ("-h" in argv or "--help" in argv):
        parse_args(argv, world_size=1)  # prints the help and exits
    if nproc is None:
        raise SystemExit("run under torchrun, or pass --nproc N to start N local ranks")
    from tasd.launch import run_ranks

    run_ranks(train, nproc, argv, timeout_s=600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
