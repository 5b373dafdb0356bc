"""FSDP2 training with tasd local checkpoints: train, save every few steps, resume after a restart.

The checkpointing is one import and three calls (``tasd.adapters.fsdp.FSDPCheckpointer``):

- ``start = ckpt.load(extra_state={...})`` once at start: the newest local checkpoint into the model,
  the optimizer, the LR scheduler and the data stream (in place), or -1 when there is none;
- ``ckpt.finalize()`` once per step: publishes asynchronous saves that finished;
- ``ckpt.save(step, extra_state={...})`` every ``--save-every`` steps: returns once the tensors are
  staged in host memory; the write, and the copy to a peer rank (``--replication``), run in the
  background while training goes on.

The model is a small MLP sharded with FSDP2 (``fully_shard``) on a CPU device mesh, with Adam, a
StepLR scheduler and a synthetic, stateful data stream (``tasd.fsdp_demo``: the same pieces
``tasd demo --backend fsdp`` trains). Run it with torchrun (gloo on CPU)::

    torchrun --standalone --nproc-per-node 2 examples/fsdp_train.py --dir /tmp/tasd-fsdp-example --steps 12

Run it again with more steps (``--steps 20``): it resumes from the newest local checkpoint. Delete
one rank's directory first (``rm -r /tmp/tasd-fsdp-example/fsdp-example/1``: a node and its local
disk lost) to see that rank's part come from its peer's replica. Without torchrun, ``--nproc 2``
starts the ranks as local processes with tasd's launcher (``tasd.launch.run_ranks``).

The checkpoints belong to session ``fsdp-example`` (``--session-id``): with tasd's default session
a job loads only its own checkpoints (its scheduler job id), and each ``torchrun --standalone`` is
a new job. A checkpoint is restored onto the world size (and device mesh) it was saved with;
another one is refused with a message saying so.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from tasd.adapters.fsdp import FSDPCheckpointer
from tasd.fsdp_demo import SyntheticBatches, build_model, train_step
from tasd.managers import ReplicationConfig


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--dir", default="/tmp/tasd-fsdp-example", help="node-local checkpoint root")
    parser.add_argument("--steps", type=int, default=12, help="train until this step")
    parser.add_argument("--save-every", type=int, default=4, help="steps between checkpoints")
    parser.add_argument("--session-id", default="fsdp-example", help="resume checkpoints of this session")
    parser.add_argument("--replication", choices=("ring", "clique", "none"), default="ring",
                        help="store each rank's part on a peer too (default: ring, factor 2)")
    parser.add_argument("--sync", action="store_true", help="synchronous saves (default: asynchronous)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="without torchrun: start this many ranks as local processes")
    return parser.parse_args(argv)


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def train(rank: int, world_size: int, argv: list[str]) -> dict[int, float]:
    """One rank's job (torch.distributed is initialized). Returns {step: this rank's loss}."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("shard",))
    model, optimizer, scheduler = build_model(mesh)
    data = SyntheticBatches(rank)
    stateful = {"scheduler": scheduler, "data": data}  # restored in place with the model and optimizer
    replication = None
    if args.replication != "none" and world_size > 1:
        replication = ReplicationConfig(strategy=args.replication, replication_jump=1, replication_factor=2)
    losses = {}
    with FSDPCheckpointer(model, optimizer, args.dir, replication, async_save=not args.sync,
                          session_id=args.session_id) as ckpt:
        start = ckpt.load(extra_state=stateful)
        log(f"resumed from the local checkpoint of step {start}" if start >= 0 else "no checkpoint: starting afresh")
        for step in range(max(start, 0) + 1, args.steps + 1):
            for saved in ckpt.finalize():  # publishes saves that finished (collective: every step, every rank)
                log(f"  checkpoint of step {saved.iteration} published (rank 0: {saved.file_bytes:,} bytes, "
                    f"training stalled {saved.stall_s:.3f}s)")
            losses[step] = train_step(model, optimizer, scheduler, next(data))
            log(f"step {step}: loss {losses[step]:.6f} (rank 0), lr {scheduler.get_last_lr()[0]:.5f}")
            if step % args.save_every == 0:
                ckpt.save(step, extra_state=stateful)  # returns once staged
        for saved in ckpt.finalize(blocking=True):  # the last save is published before the job ends
            log(f"  checkpoint of step {saved.iteration} published")
    log(f"done; checkpoints in {ckpt.manager.root / args.session_id}")
    return losses


def main(argv: list[str]) -> int:
    if "RANK" in os.environ:  # started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
        dist.init_process_group("gloo")
        try:
            train(dist.get_rank(), dist.get_world_size(), argv)
        finally:
            dist.destroy_process_group()
        return 0
    nproc = parse_args(argv).nproc
    if nproc is None:
        raise SystemExit("run under torchrun, or pass --nproc N to start N local ranks")
    from tasd.launch import run_ranks

    run_ranks(train, nproc, argv, timeout_s=600,
              preload=("torch.distributed.fsdp", "torch.distributed.checkpoint.state_dict", "tasd.adapters.fsdp"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
